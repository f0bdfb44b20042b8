"""Exporting one export module to an ONNX ModelProto with its weights under their transformers names."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
from onnx import numpy_helper


def fold_weight_transposes(model: onnx.ModelProto) -> int:
    """`Transpose(W)` of an initializer W used nowhere else becomes the transposed initializer, still
    named W (torch.onnx's own constant folding would name it `val_N`, losing which weight it is).
    Consumers (MatMulNBits quantization, the static checks) find every linear weight by name."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    uses: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    renames: dict[str, str] = {}
    keep = []
    folded = 0
    for n in g.node:
        if (n.op_type == "Transpose" and n.input[0] in inits and uses.get(n.input[0]) == 1
                and n.input[0] not in {o.name for o in g.output}):
            t = inits[n.input[0]]
            perm = list(n.attribute[0].ints) if n.attribute else None
            arr = np.ascontiguousarray(np.transpose(numpy_helper.to_array(t), perm))
            t.raw_data = arr.tobytes()  # in place: one transient copy of the weight, not three
            del t.dims[:]
            t.dims.extend(arr.shape)
            del arr
            renames[n.output[0]] = t.name
            folded += 1
            continue
        keep.append(n)
    for n in keep:
        for j, i in enumerate(n.input):
            if i in renames:
                n.input[j] = renames[i]
    for o in g.output:
        if o.name in renames:  # never happens for our modules; keep the graph valid if it did
            raise ValueError(f"graph output {o.name} is a folded weight")
    del g.node[:]
    g.node.extend(keep)
    stale = set(renames) | set(renames.values())  # recorded shapes of the folded values are the untransposed ones
    vi = [v for v in g.value_info if v.name not in stale]
    del g.value_info[:]
    g.value_info.extend(vi)
    return folded


STUB = "__weights_set_aside__"
SET_ASIDE_BYTES = 1 << 20  # initializers this large are weights, never constant-folded by the optimizer


class _weights_set_aside:
    """Within the block the model's large initializers are stubs (external data at a location that
    does not exist, so nothing reads or copies them); on exit the stubs get their data back by name.
    On the full-size model this keeps the optimizer's two model copies from holding 3 GB of weights each."""

    def __init__(self, model: onnx.ModelProto):
        self.model, self.kept = model, {}

    def __enter__(self):
        for t in self.model.graph.initializer:
            if t.HasField("raw_data") and len(t.raw_data) >= SET_ASIDE_BYTES:
                self.kept[t.name] = t.raw_data
                t.ClearField("raw_data")
                t.data_location = onnx.TensorProto.EXTERNAL
                del t.external_data[:]
                for k, v in (("location", STUB), ("length", str(len(self.kept[t.name])))):
                    t.external_data.add(key=k, value=v)
        return self

    def restore(self, model: onnx.ModelProto) -> onnx.ModelProto:
        for t in model.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL and any(e.value == STUB for e in t.external_data):
                del t.external_data[:]
                t.ClearField("data_location")
                t.raw_data = self.kept.pop(t.name)
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
            raise RuntimeError("the optimizer renamed a set-aside weight")
        return model

    def __exit__(self, *exc):
        return False


def export_module(module, args: tuple, *, dynamic_shapes, input_names: list[str], output_names: list[str],
                  table: dict | None = None) -> onnx.ModelProto:
    """torch.onnx (dynamo) export of `module`, weights named after its parameters, then optimized."""
    import logging

    import onnxscript.optimizer
    import torch

    for name in ("onnx_ir", "onnxscript"):  # their passes log every constant they deduplicate or fold
        logging.getLogger(name).setLevel(logging.WARNING)

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.export's notes on dynamic-shape renames, not the user's business
        prog = torch.onnx.export(module, args, dynamic_shapes=dynamic_shapes, input_names=input_names,
                                 output_names=output_names, custom_translation_table=table or {}, dynamo=True,
                                 optimize=False, verbose=False)
    model = prog.model_proto
    del prog  # its IR holds the graph a second time
    fold_weight_transposes(model)
    aside = _weights_set_aside(model).__enter__()  # the optimizer copies the model twice: not the weights
    model = aside.restore(onnxscript.optimizer.optimize(model))
    # the exporter's per-node provenance (stack traces with local paths) would make the bytes depend on
    # where the project is installed
    g = model.graph
    for item in [*g.node, *g.input, *g.output, *g.value_info, *g.initializer]:
        del item.metadata_props[:]
    for n in g.node:
        n.doc_string = ""
    del g.metadata_props[:]  # an export-time mapping whose order varies with the process's hash seed
    del model.metadata_props[:]
    return model
