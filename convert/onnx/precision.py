"""fp16 and int4 forms of an exported graph, by ONNX Runtime's own converters.

fp16: `onnxruntime.transformers.float16`, graph inputs and outputs kept float32 (the state carried
between calls stays exact), the normalisations kept float32 (x^2 of a large residual overflows fp16;
transformers computes them in float32 too) and the fused Gated DeltaNet operators, whose CPU kernels
are float32 only.
int4: `MatMulNBitsQuantizer`: every MatMul with a constant weight becomes MatMulNBits (4 bit, block
32, symmetric); the token embedding becomes GatherBlockQuantized. `algo` picks k_quant, HQQ or RTN.
"""

from __future__ import annotations

import contextlib
import logging

import onnx

FP32_OPS = ["Pow", "ReduceMean", "ReduceSum", "Sqrt", "Reciprocal", "Softmax", "Exp", "Softplus",
            "CausalConv", "GatedDeltaRule", "Cos", "Sin", "Range"]
INT4_ALGOS = ("k_quant", "hqq", "rtn")
ACCURACY_LEVEL = 4  # int8 activations in MatMulNBits: ORT's fast CPU path for int4 weights


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    logging.getLogger("onnxruntime.transformers.float16").setLevel(logging.ERROR)
    infer = True
    if _too_large(model):
        # the converter's own shape inference serializes the model, which protobuf refuses past 2 GB:
        # infer through a file with external data instead, then convert with the shapes known
        model = _infer_shapes_via_file(model)
        infer = False
    return convert_float_to_float16(model, keep_io_types=True, op_block_list=FP32_OPS, disable_shape_infer=not infer)


def _too_large(model: onnx.ModelProto) -> bool:
    return sum(t.ByteSize() for t in model.graph.initializer) > 1_800_000_000


def _infer_shapes_via_file(model: onnx.ModelProto) -> onnx.ModelProto:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "in.onnx", Path(d) / "out.onnx"
        onnx.save(model, str(src), save_as_external_data=True, location="in.onnx_data", size_threshold=1024)
        del model
        onnx.shape_inference.infer_shapes_path(str(src), str(dst))
        return onnx.load(str(dst), load_external_data=True) if dst.exists() else onnx.load(str(src))


def to_int4(model: onnx.ModelProto, *, algo: str = "k_quant", block_size: int = 32,
            gather: bool = False) -> tuple[onnx.ModelProto, list[str]]:
    """MatMul weights (or, gather=True, the Gather of an embedding table) as 4-bit blocks; returns the
    model and the weights quantized by RTN instead of `algo` (onnxruntime's k_quant and HQQ need the
    input width to be a multiple of the block: the others fall back to RTN, which pads)."""
    inits = {t.name: t for t in model.graph.initializer}
    odd_nodes = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits
                 and inits[n.input[1]].dims[0] % block_size]
    odd, odd_weights = [n.name for n in odd_nodes], sorted(n.input[1] for n in odd_nodes)
    if gather:
        return _gather_as_uint8(_quantize(model, "rtn", block_size, True, None)), []
    if algo == "rtn":
        return _quantize(model, "rtn", block_size, False, None), []
    model = _quantize(model, algo, block_size, gather, exclude=odd)
    if odd:
        model = _quantize(model, "rtn", block_size, gather, include=odd)
    return model, odd_weights


def _gather_as_uint8(model: onnx.ModelProto) -> onnx.ModelProto:
    """GatherBlockQuantized's signed int4 table as unsigned 4-bit codes packed two per uint8 (bits=4,
    implicit zero point 8): the same values, in the element type ONNX Runtime's .ort format can hold."""
    import numpy as np
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "GatherBlockQuantized" or inits[node.input[0]].data_type != onnx.TensorProto.INT4:
            continue
        t = inits[node.input[0]]
        if t.dims[-1] % 2:  # an odd width cannot be packed in whole bytes: left as int4
            continue
        u = (numpy_helper.to_array(t).astype(np.int16) + 8).astype(np.uint8)
        t.CopyFrom(numpy_helper.from_array((u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8), t.name))
        node.attribute.append(helper.make_attribute("bits", 4))
    return model


def _quantize(model, algo: str, block_size: int, gather: bool, exclude=None, include=None) -> onnx.ModelProto:
    from onnxruntime.quantization import matmul_nbits_quantizer as q

    for name in ("onnxruntime.quantization", "onnxruntime.quantization.matmul_nbits_quantizer"):
        logging.getLogger(name).setLevel(logging.ERROR)
    ops = ("Gather",) if gather else ("MatMul",)
    axes = (("MatMul", 0), ("Gather", 1))
    if algo == "rtn":
        cfg = q.DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, accuracy_level=ACCURACY_LEVEL,
                                             op_types_to_quantize=ops, quant_axes=axes)
    elif algo == "k_quant":
        cfg = q.KQuantWeightOnlyQuantConfig(op_types_to_quantize=ops)
    elif algo == "hqq":
        cfg = q.HQQWeightOnlyQuantConfig(block_size=block_size, bits=4, op_types_to_quantize=ops, quant_axes=axes)
    else:
        raise ValueError(algo)
    quant = q.MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=True,
                                   accuracy_level=ACCURACY_LEVEL, nodes_to_exclude=exclude, nodes_to_include=include,
                                   op_types_to_quantize=ops, quant_axes=axes, algo_config=cfg)
    with _silenced():  # the quantizers print progress bars and INFO lines of their own
        quant.process()
    return quant.model.model


@contextlib.contextmanager
def _silenced():
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, s in zip((1, 2), saved):
            os.dup2(s, fd)
            os.close(s)
