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
            arr = numpy_helper.to_array(t)
            t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(np.transpose(arr, perm)), t.name))
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
    fold_weight_transposes(model)
    model = onnxscript.optimizer.optimize(model)
    # the exporter's per-node provenance (stack traces with local paths) would make the bytes depend on
    # where the project is installed
    for n in model.graph.node:
        del n.metadata_props[:]
        n.doc_string = ""
    del model.metadata_props[:]
    return model
