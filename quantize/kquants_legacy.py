"""Q4_0, Q4_1, Q5_0, Q5_1 (32-value blocks), ported from ggml-quants.c.

Without an importance matrix: quantize_row_q*_ref. gguf-py's numpy versions agree with these except
for the sign of zero in d/m (an all-zero block: ggml writes d = +0/-8 = -0.0 for Q4_0/Q5_0 and takes
the first minimum for Q4_1/Q5_1), so they are re-implemented here. Q8_0 stays with gguf-py (exact).
With an importance matrix: quantize_row_q*_impl, whose weights use sigma2 = sum_x2/n_per_row of
the whole row.

Blocks are (B, 32) here; there are no sums in the _ref paths, so the row layout is fine.
"""

from __future__ import annotations

import numpy as np

from .kquants_core import (
    F32,
    c_max,
    c_min,
    f16_bytes,
    first_absmax,
    qkx_quants,
    qx_quants,
)

U8 = np.uint8


def _pack(L: np.ndarray, five_bits: bool) -> list[np.ndarray]:
    """L (B, 32) small ints -> [qh (B, 4)] + [qs (B, 16)] as the C writes them."""
    B = L.shape[0]
    parts = []
    if five_bits:
        bits = ((L >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
        parts.append(np.bitwise_or.reduce(bits, axis=1).astype("<u4").view(U8).reshape(B, 4))
    parts.append(((L[:, :16] & 0xF) | ((L[:, 16:] & 0xF) << 4)).astype(U8))
    return parts


def _to_int(v: np.ndarray) -> np.ndarray:
    """C's (int8_t)/(uint8_t) cast of a float (truncation; x86 takes the low byte of the int32)."""
    with np.errstate(invalid="ignore"):
        return v.astype(np.int32)


def legacy_ref(x: np.ndarray, name: str) -> np.ndarray:
    """quantize_row_q{4_0,4_1,5_0,5_1}_ref on blocks x (B, 32) -> uint8 (B, type_size)."""
    if name in ("Q4_0", "Q5_0"):
        nq = 8 if name == "Q4_0" else 16
        mx, _ = first_absmax(np.ascontiguousarray(x.T))  # +0 for an all-zero block, as the C's init
        d = mx / F32(-nq)
        with np.errstate(divide="ignore"):
            idv = np.where(d != 0, F32(1) / d, F32(0))
        q = _to_int(x * idv[:, None] + F32(nq + 0.5))
        q = ((q + 128) & 0xFF) - 128  # int8_t
        L = np.minimum(q, 2 * nq - 1) & 0xFF  # MIN(15|31, .) stored as uint8
        return np.concatenate([f16_bytes(d)[0]] + _pack(L, name == "Q5_0"), axis=1)
    nq = 15 if name == "Q4_1" else 31
    xt = np.ascontiguousarray(x.T)
    mn, mx = c_min(xt, from_first=False), c_max(xt, from_first=False)
    d = (mx - mn) / F32(nq)
    with np.errstate(divide="ignore"):
        idv = np.where(d != 0, F32(1) / d, F32(0))
    q = _to_int((x - mn[:, None]) * idv[:, None] + F32(0.5))
    if name == "Q4_1":
        q = np.minimum(((q + 128) & 0xFF) - 128, 15)  # MIN(15, (int8_t)(x0 + 0.5f))
    L = q & 0xFF
    return np.concatenate([f16_bytes(d)[0], f16_bytes(mn)[0]] + _pack(L, name == "Q5_1"), axis=1)


def legacy_imatrix(x: np.ndarray, qw: np.ndarray, sigma2: np.ndarray, name: str) -> np.ndarray:
    """quantize_row_q{4_0,4_1,5_0,5_1}_impl. x, qw: (B, 32); sigma2: (B,) = sum_x2/n_per_row of the block's row."""
    xg = np.ascontiguousarray(x.T)
    w = np.ascontiguousarray(qw.T) * np.sqrt(sigma2 + xg * xg)
    if name in ("Q4_0", "Q5_0"):
        L, d = qx_quants(xg, 8 if name == "Q4_0" else 16, w)
        parts = [f16_bytes(d)[0]]
    else:
        L, d, the_min = qkx_quants(xg, w, 15 if name == "Q4_1" else 31, -0.9, 0.05, 36, False)
        parts = [f16_bytes(d)[0], f16_bytes(-the_min)[0]]
    return np.concatenate(parts + _pack(L.T.astype(np.int32), name in ("Q5_0", "Q5_1")), axis=1)
