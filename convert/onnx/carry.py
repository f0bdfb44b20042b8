"""A GPTQ / AWQ / compressed-tensors folder's integers carried into MatMulNBits without re-quantizing.

MatMulNBits computes W[n, k] = scale[n, b] * (q[n, k] - zero[n, b]) with b = k // block_size, the
convention the project's QuantizedWeight uses (quantize/qweight.py) when g_idx is i // group_size: so
the codes, scales and zero points go into the node as they are (block_size = the group size), and
the node's dequantized weight equals the folder's own dequantization bit for bit. Weights it cannot
take (act-order g_idx, a group size that is not a power of two of at least 16) are left to the
int4 quantizer and listed.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

MS = "com.microsoft"


def _pack_u4(codes: np.ndarray) -> np.ndarray:
    """[..., 2m] values in 0..15 -> [..., m] bytes, low nibble first."""
    c = codes.astype(np.uint8)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8)


def carriable(qw) -> str | None:
    """Why `qw` (a QuantizedWeight) cannot be carried into MatMulNBits as it is, or None."""
    import torch

    s = qw.scheme
    if s.bits != 4:
        return f"{s.bits}-bit"
    gs = s.group_size if s.group_size > 0 else qw.shape[1]
    if gs < 16 or gs & (gs - 1):
        return f"group size {gs} (MatMulNBits blocks are powers of two >= 16)"
    if not torch.equal(qw.g_idx.long(), torch.arange(qw.shape[1]) // gs):
        return "act-order groups (g_idx)"
    return None


def matmulnbits_initializers(qw, base: str) -> tuple[list[onnx.TensorProto], dict]:
    """(B, scales, zero_points initializers, node attributes) holding `qw`'s own integers."""
    N, K = qw.shape
    gs = qw.scheme.group_size if qw.scheme.group_size > 0 else K
    nb = (K + gs - 1) // gs
    q = qw.q.numpy().astype(np.uint8)
    zeros = qw.zeros.numpy().astype(np.int64)[:, :nb]
    if nb * gs != K:  # pad the last block with its zero point (contributes 0)
        q = np.concatenate([q, np.repeat(zeros[:, -1:], nb * gs - K, axis=1).astype(np.uint8)], axis=1)
    b = _pack_u4(q.reshape(N, nb, gs))
    zp = zeros.astype(np.uint8)
    if nb % 2:
        zp = np.concatenate([zp, np.zeros((N, 1), np.uint8)], axis=1)
    inits = [numpy_helper.from_array(b, f"{base}_Q4"),
             numpy_helper.from_array(qw.scales.numpy().astype(np.float32)[:, :nb].reshape(-1), f"{base}_scales"),
             numpy_helper.from_array(_pack_u4(zp), f"{base}_zero_points")]
    return inits, {"K": K, "N": N, "bits": 4, "block_size": gs}


def carry_over(model: onnx.ModelProto, weights: dict, name_of, accuracy_level: int) -> tuple[list[str], dict[str, str]]:
    """Replace every MatMul whose weight initializer `name_of(init)` names a module in `weights`
    (HF module -> QuantizedWeight) by a MatMulNBits with that module's integers. Returns (carried
    initializer names, {initializer: why not carried})."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    carried, refused = [], {}
    drop: set[str] = set()
    nodes = []
    for n in g.node:
        hf = name_of(n.input[1]) if n.op_type == "MatMul" and n.input[1] in inits else None
        module = hf[: -len(".weight")] if hf and hf.endswith(".weight") else None
        qw = weights.get(module) if module else None
        why = carriable(qw) if qw is not None else None
        if qw is None or why:
            if why:
                refused[n.input[1]] = why
            nodes.append(n)
            continue
        base = n.input[1]
        new, attrs = matmulnbits_initializers(qw, base)
        g.initializer.extend(new)
        drop.add(base)
        nodes.append(helper.make_node("MatMulNBits", [n.input[0], *(t.name for t in new)], list(n.output),
                                      name=n.name + "_Q4", domain=MS, accuracy_level=accuracy_level, **attrs))
        carried.append(base)
    del g.node[:]
    g.node.extend(nodes)
    keep = [t for t in g.initializer if t.name not in drop]
    del g.initializer[:]
    g.initializer.extend(keep)
    if carried and not any(o.domain == MS for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS, 1))
    return carried, refused
