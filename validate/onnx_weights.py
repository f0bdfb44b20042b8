"""The weights an ONNX export holds, read back as transformers' tensors.

Each graph names a weight after its export module's parameter (convert/onnx/graph.py keeps the names
through transposes); convert/onnx/names.py maps those to transformers' names. MatMul weights are stored transposed
([in, out]); MatMulNBits (4-bit blocks, zero points packed or default 8) and GatherBlockQuantized
(signed int4 blocks) are dequantized exactly as ONNX Runtime's kernels do. Used by the fake-quant
reference (the model carrying the file's own weights) and by the static checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convert.onnx.names import hf_name

@dataclass
class Weight:
    """One weight as stored: `kind` float | matmulnbits | gatherblockquantized; `value` float32 in
    transformers' layout ([out, in] for linears)."""

    onnx_name: str
    hf_name: str
    kind: str
    dtype: str  # stored element type: float32, float16, int4
    value: np.ndarray
    block_size: int = 0


def _unpack_u4(b: np.ndarray) -> np.ndarray:
    """uint8 bytes -> 4-bit values, low nibble first."""
    out = np.empty(b.shape[:-1] + (b.shape[-1] * 2,), np.uint8)
    out[..., 0::2] = b & 0x0F
    out[..., 1::2] = b >> 4
    return out


def dequant_matmulnbits(node, inits: dict[str, np.ndarray]) -> np.ndarray:
    """W [N, K] (transformers' layout) of a 4-bit MatMulNBits node."""
    attrs = {a.name: a.i for a in node.attribute}
    if attrs.get("bits", 4) != 4:
        raise ValueError(f"{node.name}: {attrs.get('bits')}-bit MatMulNBits is not read")
    N, K, bs = attrs["N"], attrs["K"], attrs["block_size"]
    nb = (K + bs - 1) // bs
    q = _unpack_u4(inits[node.input[1]].reshape(N, nb, bs // 2)).astype(np.float32)  # [N, nb, bs]
    scales = inits[node.input[2]].astype(np.float32).reshape(N, nb, 1)
    zp_name = node.input[3] if len(node.input) > 3 else ""
    if zp_name:
        zp = inits[zp_name]
        if zp.dtype == np.uint8:
            zp = _unpack_u4(zp.reshape(N, -1))[:, :nb].astype(np.float32)
        zp = zp.astype(np.float32).reshape(N, nb, 1)
    else:
        zp = np.float32(8)
    return ((q - zp) * scales).reshape(N, nb * bs)[:, :K]


def dequant_gatherblockquantized(node, inits: dict[str, np.ndarray]) -> np.ndarray:
    """The table [rows, cols] of a GatherBlockQuantized node (quantized along axis 1; the last block
    may be partial)."""
    attrs = {a.name: a.i for a in node.attribute}
    bs = attrs["block_size"]
    data = inits[node.input[0]]
    has_zp = len(node.input) > 3 and bool(node.input[3])
    if data.dtype == np.uint8:  # unsigned 4-bit packed, default zero point 8
        data = _unpack_u4(data).astype(np.float32) - (0 if has_zp else 8)
    data = data.astype(np.float32)
    rows, cols = data.shape
    nb = (cols + bs - 1) // bs
    x = np.pad(data, ((0, 0), (0, nb * bs - cols))).reshape(rows, nb, bs)
    if has_zp:
        x = x - inits[node.input[3]].astype(np.float32).reshape(rows, nb, 1)
    out = x * inits[node.input[2]].astype(np.float32).reshape(rows, nb, 1)
    return out.reshape(rows, nb * bs)[:, :cols]


def read_weights(path: Path, role: str) -> list[Weight]:
    """Every parameter-named weight of one ONNX file, in transformers' names and layouts."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))  # external data is loaded from beside the file
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out: list[Weight] = []
    seen: set[str] = set()
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            base = node.input[1].rsplit("_Q4", 1)[0]
            hf = hf_name(role, base)
            if hf:
                out.append(Weight(node.input[1], hf, "matmulnbits", "int4", dequant_matmulnbits(node, inits),
                                  {a.name: a.i for a in node.attribute}["block_size"]))
                seen.update(node.input[1:])
        elif node.op_type == "GatherBlockQuantized":
            base = node.input[0].rsplit("_Q4", 1)[0]
            hf = hf_name(role, base)
            if hf:
                out.append(Weight(node.input[0], hf, "gatherblockquantized", "int4",
                                  dequant_gatherblockquantized(node, inits),
                                  {a.name: a.i for a in node.attribute}["block_size"]))
                seen.update(node.input)
        elif node.op_type == "MatMul" and node.input[1] in inits:
            seen.add(node.input[1])
            hf = hf_name(role, node.input[1])
            if hf:
                a = inits[node.input[1]]
                out.append(Weight(node.input[1], hf, "float", str(a.dtype), a.astype(np.float32).T.copy()))
    for name, a in inits.items():
        if name in seen or a.dtype.kind != "f":
            continue
        hf = hf_name(role, name)
        if hf and (hf.endswith(".weight") or hf.endswith(".bias") or hf.endswith("dt_bias") or hf.endswith("A_log")):
            out.append(Weight(name, hf, "float", str(a.dtype), a.astype(np.float32)))
    return out
