"""Block quantizers for Q2_K..Q6_K, ported from ggml-quants.c (quantize_row_*_ref without an
importance matrix, quantize_row_*_impl with one).

Each function takes float32 blocks x (B, block) (and the matching imatrix values qw (B, block)) and
returns uint8 (B, type_size) in ggml's block layout. See kquants_core for the exactness rules.
"""

from __future__ import annotations

import numpy as np

from .kquants_core import (
    F32,
    first_absmax,
    nearest_int,
    q3_quants,
    qkx_quants,
    qp_quants,
    qx_quants,
    seqsum,
)
from .kquants_core import f16_bytes as _f16

QK_K = 256
U8 = np.uint8


def _groups(x: np.ndarray, gs: int) -> np.ndarray:
    """(B, n) -> (gs, B*n/gs): column g = b*(n/gs) + j is group j of block b."""
    return np.ascontiguousarray(x.reshape(-1, gs).T)


def _blocks(L: np.ndarray, B: int) -> np.ndarray:
    return L.T.reshape(B, -1)


def _sigma2(x: np.ndarray, factor: float) -> np.ndarray:
    """factor*sum_x2/QK_K per super-block, sum_x2 in C's sequential order."""
    xt = np.ascontiguousarray(x.T)
    s = seqsum(xt * xt)
    return (F32(factor) * s if factor != 1 else s) / F32(QK_K)


def _running_max(a: np.ndarray) -> np.ndarray:
    """C's `m = 0; if (v > m) m = v;` along axis 1: +0.0 unless something is positive
    (np.maximum(0, -0.0) may return -0.0, which would reach the fp16 bytes); NaN is skipped."""
    m = np.fmax.reduce(a, axis=1)
    return np.where(m > 0, m, F32(0))


def _requant(xg, L, d, dm, nmax, signed):
    """Final pass: l = nearest_int((x + dm)/d) (or x/d if signed), clamped; groups with d == 0 keep L."""
    with np.errstate(all="ignore"):
        t = xg + dm if dm is not None else xg.copy()
        t /= d
        l = nearest_int(t)
    lo, hi = (-(nmax + 1) // 2, nmax // 2) if signed else (0, nmax)
    np.clip(l, lo, hi, out=l)
    if signed:
        l -= lo
    return np.where(d != 0, l.astype(U8), L)


# ---------------------------------------------------------------- Q4_K / Q5_K

def _pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """6-bit scales and mins (uint8 (B, 8)) -> the 12 bytes of block_q4_K/q5_K, as the C writes them."""
    sc = np.empty((ls.shape[0], 12), U8)
    sc[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    sc[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    sc[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return sc


def _unpack_scales_k4(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """get_scale_min_k4 for j = 0..7."""
    d = np.concatenate([q[:, 0:4] & 63, (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)], axis=1)
    m = np.concatenate([q[:, 4:8] & 63, (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)], axis=1)
    return d, m


def _q45k(x, qw, nmax):
    B = x.shape[0]
    xg = _groups(x, 32)
    if qw is None:  # quantize_row_q{4,5}_K_ref
        s = seqsum(xg * xg)
        w = np.sqrt(s / F32(32)) + np.abs(xg)
        rmin, nstep = (-1.0, 20) if nmax == 15 else (-0.5, 15)
        L, scales, mins = qkx_quants(xg, w, nmax, rmin, 0.1, nstep, False)
        scales, mins = scales.reshape(B, 8), mins.reshape(B, 8)
        max_scale = _running_max(scales)
        max_min = _running_max(mins)
        with np.errstate(all="ignore"):
            inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
            inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
        ls = np.minimum((nearest_int(inv_scale[:, None] * scales) & 0xFF).astype(U8), 63)
        lm = np.minimum((nearest_int(inv_min[:, None] * mins) & 0xFF).astype(U8), 63)
        d_block, m_block = max_scale / F32(63), max_min / F32(63)
    else:  # quantize_row_q{4,5}_K_impl
        sigma2 = np.repeat(_sigma2(x, 2), 8)
        w = _groups(qw, 32) * np.sqrt(sigma2 + xg * xg)
        sw = seqsum(w)
        L, scales, mins = qkx_quants(xg, w, nmax, -0.9, 0.05, 36, False)
        # scales and mins go through make_qp_quants side by side (one call, half the Python overhead)
        swt = _groups(sw, 8)
        Lsm, dm_block = qp_quants(np.concatenate([_groups(scales, 8), _groups(mins, 8)], axis=1), 63,
                                  np.concatenate([swt, swt], axis=1))
        ls, lm = Lsm[:, :B].T.astype(U8), Lsm[:, B:].T.astype(U8)
        d_block, m_block = dm_block[:B], dm_block[B:]
        if nmax == 31:  # Q5_K clamps here, Q4_K does not
            ls, lm = np.minimum(ls, 63), np.minimum(lm, 63)
    sc = _pack_scales_k4(ls, lm)
    dbytes, dval = _f16(d_block)
    mbytes, mval = _f16(m_block)
    s6, m6 = _unpack_scales_k4(sc)
    d = (dval[:, None] * s6).reshape(-1)
    dm = (mval[:, None] * m6).reshape(-1)
    L = _blocks(_requant(xg, L, d, dm, nmax, False), B).reshape(B, 4, 2, 32)
    if nmax == 15:
        qs = L[:, :, 0] | (L[:, :, 1] << 4)
        return np.concatenate([dbytes, mbytes, sc, qs.reshape(B, 128)], axis=1)
    qs = (L[:, :, 0] & 0xF) | ((L[:, :, 1] & 0xF) << 4)
    hi = L >> 4
    qh = np.zeros((B, 32), U8)
    for n in range(4):
        qh |= (hi[:, n, 0] << (2 * n)) | (hi[:, n, 1] << (2 * n + 1))
    return np.concatenate([dbytes, mbytes, sc, qh, qs.reshape(B, 128)], axis=1)


def q4_k(x, qw=None):
    return _q45k(x, qw, 15)


def q5_k(x, qw=None):
    return _q45k(x, qw, 31)


# ---------------------------------------------------------------- Q6_K

def q6_k(x, qw=None):
    B = x.shape[0]
    xg = _groups(x, 16)
    L, scales = qx_quants(xg, 32, None if qw is None else _groups(qw, 16))
    scales = scales.reshape(B, 16)
    max_scale, max_abs = first_absmax(np.ascontiguousarray(scales.T))
    zero = max_abs < F32(1e-15)
    with np.errstate(all="ignore"):
        iscale = F32(-128) / max_scale
        dbytes, dval = _f16(F32(1) / iscale)
        sc = (np.minimum(nearest_int(iscale[:, None] * scales), 127) & 0xFF).astype(U8)
    d = (dval[:, None] * sc.view(np.int8)).reshape(-1)
    L = _blocks(_requant(xg, L, d, None, 63, True), B).reshape(B, 2, 4, 32)
    ql = np.concatenate([(L[:, :, 0] & 0xF) | ((L[:, :, 2] & 0xF) << 4),
                         (L[:, :, 1] & 0xF) | ((L[:, :, 3] & 0xF) << 4)], axis=2)
    hi = L >> 4
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    out = np.concatenate([ql.reshape(B, 128), qh.reshape(B, 64), sc, dbytes], axis=1)
    out[zero] = 0
    return out


# ---------------------------------------------------------------- Q2_K / Q3_K

def _pack_2bit(L, B):
    L = L.reshape(B, 2, 4, 32)
    return (L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)).reshape(B, 64)


def q2_k(x, qw=None):
    B = x.shape[0]
    xg = _groups(x, 16)
    if qw is None:  # quantize_row_q2_K_ref
        L, scales, mins = qkx_quants(xg, np.abs(xg), 3, -0.5, 0.1, 15, True)
        scales, mins = scales.reshape(B, 16), mins.reshape(B, 16)
        max_scale = _running_max(scales)
        max_min = _running_max(mins)
        with np.errstate(all="ignore"):
            ls = np.where(max_scale[:, None] > 0, nearest_int((F32(15) / max_scale)[:, None] * scales), 0)
            lm = np.where(max_min[:, None] > 0, nearest_int((F32(15) / max_min)[:, None] * mins) << 4, 0)
        sc = ((ls | lm) & 0xFF).astype(U8)
        dbytes, dval = _f16(np.where(max_scale > 0, max_scale / F32(15), F32(0)))
        mbytes, mval = _f16(np.where(max_min > 0, max_min / F32(15), F32(0)))
    else:  # quantize_row_q2_K_impl
        sigma2 = np.repeat(_sigma2(x, 1), 16)
        w = _groups(qw, 16) * np.sqrt(sigma2 + xg * xg)
        sw = seqsum(w)
        L, scales, mins = qkx_quants(xg, w, 3, -0.9, 0.05, 36, False)
        swt = _groups(sw, 16)
        Lsm, dmm = qp_quants(np.concatenate([_groups(scales, 16), _groups(mins, 16)], axis=1), 15,
                             np.concatenate([swt, swt], axis=1))
        Ls, Lm, dm, mm = Lsm[:, :B], Lsm[:, B:], dmm[:B], dmm[B:]
        sc = ((Ls | (Lm << 4)) & 0xFF).T.astype(U8)
        dbytes, dval = _f16(dm)
        mbytes, mval = _f16(mm)
    d = (dval[:, None] * (sc & 0xF)).reshape(-1)
    dm = (mval[:, None] * (sc >> 4)).reshape(-1)
    L = _blocks(_requant(xg, L, d, dm, 3, False), B)
    return np.concatenate([sc, _pack_2bit(L, B), dbytes, mbytes], axis=1)


def q3_k(x, qw=None):
    B = x.shape[0]
    xg = _groups(x, 16)
    if qw is None:  # quantize_row_q3_K_ref
        L, scales = q3_quants(xg, 4)
        scales = scales.reshape(B, 16)
        max_scale, _ = first_absmax(np.ascontiguousarray(scales.T))
        nz = max_scale != 0
        with np.errstate(all="ignore"):
            iscale = F32(-32) / max_scale
            l = ((nearest_int(iscale[:, None] * scales) + 128) & 0xFF) - 128  # int8_t l
        ls = np.where(nz[:, None], np.clip(l, -32, 31) + 32, 0).astype(U8)
        dbytes, dval = _f16(np.where(nz, F32(1) / iscale, F32(0)))
    else:  # quantize_row_q3_K_impl
        sigma2 = np.repeat(_sigma2(x, 2), 16)
        w = _groups(qw, 16) * np.sqrt(sigma2 + xg * xg)
        sw = seqsum(w)
        L, scales = qx_quants(xg, 4, w)
        Ls, d_block = qx_quants(_groups(scales, 16), 32, _groups(sw, 16))
        ls = Ls.T.astype(U8)
        dbytes, dval = _f16(d_block)
    sc = np.zeros((B, 12), U8)
    sc[:, 0:8] = (ls[:, 0:8] & 0xF) | ((ls[:, 8:16] & 0xF) << 4)
    hi = ls >> 4
    for k in range(4):
        sc[:, 8:12] |= hi[:, 4 * k:4 * k + 4] << (2 * k)
    # what the C reads back: sc = (packed 6 bits) - 32 as int8
    lo = np.concatenate([sc[:, 0:8] & 0xF, sc[:, 0:8] >> 4], axis=1)
    top = np.concatenate([(sc[:, 8:12] >> (2 * k)) & 3 for k in range(4)], axis=1)
    s = (lo | (top << 4)).astype(np.int8) - np.int8(32)
    d = (dval[:, None] * s).reshape(-1)
    L = _blocks(_requant(xg, L, d, None, 7, True), B)
    hmask = np.zeros((B, 32), U8)
    hb = (L > 3).astype(U8).reshape(B, 8, 32)
    for k in range(8):
        hmask |= hb[:, k] << k
    L = L & 3
    return np.concatenate([hmask, _pack_2bit(L, B), sc, dbytes], axis=1)
