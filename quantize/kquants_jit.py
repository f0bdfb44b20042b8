"""numba-compiled versions of the two scale searches that take most of a k-quant's time
(`qkx_quants`: Q2_K/Q4_K/Q5_K; `qx_quants`: Q3_K/Q6_K), bit-exact like their numpy twins.

ggml's C searches one group at a time, so its sums are chains of dependent float adds. Here the
group is the innermost loop over the (element, group) layout: every group is an independent SIMD
lane doing exactly C's scalar sequence of float32 operations (no reassociation, no fused
multiply-add: numba sets no fast-math flags), so the bytes stay ggml's and the compiler can use
the whole vector width. `nogil=True` lets the GGUF writer's threads run them in parallel.

Only finite data comes here (the callers fall back to numpy otherwise): NaN/Inf cases follow C's
bit-trick garbage, which the numpy code reproduces and these kernels do not try to.
Importing this module needs numba; `available()` says whether it is installed.
"""

from __future__ import annotations

import numpy as np

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; this keeps the numpy path usable without it
    numba = None

F32 = np.float32


def available() -> bool:
    return numba is not None


if numba is not None:
    from llvmlite import ir
    from numba.core import types
    from numba.extending import intrinsic

    _jit = numba.njit(cache=True, nogil=True, error_model="numpy")
    _MAGIC = np.float32(12582912.0)

    @intrinsic
    def _bits(typingctx, v):
        """The int32 holding a float32's bits (a register bitcast, so loops over it still vectorise)."""
        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], ir.IntType(32))
        return types.int32(types.float32), codegen

    @_jit
    def _nearest(t):
        # ggml's nearest_int: add 1.5*2^23, read the mantissa bits (round half to even; defined for any finite t)
        return (_bits(np.float32(t + _MAGIC)) & 0x7FFFFF) - 0x400000

    @_jit
    def _qx_sums(x, w, iscale, nmax, sumlx, suml2):
        """make_qx_quants' sums for one iscale per group (sumlx, suml2 reset here)."""
        n, G = x.shape
        sumlx[:] = np.float32(0)
        suml2[:] = np.float32(0)
        for i in range(n):
            for g in range(G):
                lf = np.float32(max(-nmax, min(nmax - 1, _nearest(iscale[g] * x[i, g]))))
                sumlx[g] += w[i, g] * x[i, g] * lf
                suml2[g] += w[i, g] * lf * lf

    @_jit
    def _qkx(x, w, nmax, rmin, rdelta, nstep, use_mad):
        n, G = x.shape
        fnmax = np.float32(nmax)
        zero = np.float32(0)
        one = np.float32(1)
        mn = x[0].copy()
        mx = x[0].copy()
        sum_w = w[0].copy()
        sum_x = np.empty(G, np.float32)
        for g in range(G):
            sum_x[g] = w[0, g] * x[0, g]
        for i in range(1, n):
            for g in range(G):
                xi = x[i, g]
                wi = w[i, g]
                if xi < mn[g]:
                    mn[g] = xi
                if xi > mx[g]:
                    mx[g] = xi
                sum_w[g] += wi
                sum_x[g] += wi * xi
        live = np.empty(G, np.bool_)
        iscale = np.empty(G, np.float32)
        scale = np.empty(G, np.float32)
        best = np.zeros(G, np.float32)
        for g in range(G):
            if mn[g] > zero:
                mn[g] = zero
            live[g] = mx[g] != mn[g]
            iscale[g] = fnmax / (mx[g] - mn[g])
            scale[g] = one / iscale[g]
        mn0 = mn.copy()
        best_is = iscale.copy()
        best_mn = mn.copy()
        for i in range(n):
            for g in range(G):
                l = _nearest(iscale[g] * (x[i, g] - mn[g]))
                lf = np.float32(max(0, min(nmax, l)))
                d = scale[g] * lf + mn[g] - x[i, g]
                d = abs(d) if use_mad else d * d
                best[g] += w[i, g] * d
        laux = np.empty((n, G), np.float32)
        s_l = np.empty(G, np.float32)
        s_l2 = np.empty(G, np.float32)
        s_xl = np.empty(G, np.float32)
        cur = np.empty(G, np.float32)
        t_scale = np.empty(G, np.float32)
        t_min = np.empty(G, np.float32)
        dets = np.empty(G, np.float32)
        frmin, frdelta = np.float32(rmin), np.float32(rdelta)
        for step in range(nstep + 1):
            num = frmin + frdelta * np.float32(step) + fnmax
            for g in range(G):
                iscale[g] = num / (mx[g] - mn[g])
                s_l[g] = zero
                s_l2[g] = zero
                s_xl[g] = zero
                cur[g] = zero
            for i in range(n):
                for g in range(G):
                    l = _nearest(iscale[g] * (x[i, g] - mn[g]))
                    lf = np.float32(max(0, min(nmax, l)))
                    laux[i, g] = lf
                    wl = w[i, g] * lf
                    s_l[g] += wl
                    s_l2[g] += wl * lf
                    s_xl[g] += wl * x[i, g]
            for g in range(G):
                D = sum_w[g] * s_l2[g] - s_l[g] * s_l[g]
                ts = (sum_w[g] * s_xl[g] - sum_x[g] * s_l[g]) / D
                tm = (s_l2[g] * sum_x[g] - s_l[g] * s_xl[g]) / D
                if tm > zero:
                    tm = zero
                    ts = s_xl[g] / s_l2[g]
                t_scale[g] = ts
                t_min[g] = tm
                dets[g] = D
            for i in range(n):
                for g in range(G):
                    d = t_scale[g] * laux[i, g] + t_min[g] - x[i, g]
                    d = abs(d) if use_mad else d * d
                    cur[g] += w[i, g] * d
            for g in range(G):
                if dets[g] > zero and cur[g] < best[g] and live[g]:
                    best[g] = cur[g]
                    best_is[g] = iscale[g]
                    best_mn[g] = mn[g]
                    scale[g] = t_scale[g]
                    mn[g] = t_min[g]
        L = np.empty((n, G), np.uint8)
        for i in range(n):
            for g in range(G):
                l = _nearest(best_is[g] * (x[i, g] - best_mn[g]))
                L[i, g] = max(0, min(nmax, l))
        for g in range(G):
            if not live[g]:
                scale[g] = zero
                mn[g] = mn0[g]
                for i in range(n):
                    L[i, g] = 0
        return L, scale, -mn

    @_jit
    def _qx(x, nmax, w):
        n, G = x.shape
        zero = np.float32(0)
        fnmax = np.float32(nmax)
        mx = np.zeros(G, np.float32)
        amax = np.zeros(G, np.float32)
        for i in range(n):
            for g in range(G):
                ax = abs(x[i, g])
                if ax > amax[g]:
                    amax[g] = ax
                    mx[g] = x[i, g]
        best_is = np.empty(G, np.float32)
        iscale = np.empty(G, np.float32)
        scale = np.empty(G, np.float32)
        best = np.empty(G, np.float32)
        sumlx = np.zeros(G, np.float32)
        suml2 = np.zeros(G, np.float32)
        for g in range(G):
            best_is[g] = np.float32(-nmax) / mx[g]
        _qx_sums(x, w, best_is, nmax, sumlx, suml2)
        for g in range(G):
            scale[g] = sumlx[g] / suml2[g] if suml2[g] != zero else zero
            best[g] = scale[g] * sumlx[g]
        for step in range(-9, 10):
            if step == 0:
                continue
            for g in range(G):
                iscale[g] = -(fnmax + np.float32(0.1) * np.float32(step)) / mx[g]
            _qx_sums(x, w, iscale, nmax, sumlx, suml2)
            for g in range(G):
                if suml2[g] > zero and sumlx[g] * sumlx[g] > best[g] * suml2[g]:
                    best_is[g] = iscale[g]
                    scale[g] = sumlx[g] / suml2[g]
                    best[g] = scale[g] * sumlx[g]
        L = np.empty((n, G), np.uint8)
        eps = np.float32(1e-15)
        for i in range(n):
            for g in range(G):
                l = _nearest(best_is[g] * x[i, g])
                L[i, g] = max(-nmax, min(nmax - 1, l)) + nmax
        for g in range(G):
            if amax[g] < eps:
                scale[g] = zero
                for i in range(n):
                    L[i, g] = 0
        return L, scale


def qkx_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool):
    """As kquants_core.qkx_quants, for finite float32 (n, G) x and w."""
    return _qkx(np.ascontiguousarray(x, F32), np.ascontiguousarray(w, F32), int(nmax), float(rmin), float(rdelta),
                int(nstep), bool(use_mad))


def qx_quants(x: np.ndarray, nmax: int, w: np.ndarray | None):
    """As kquants_core.qx_quants (w None: weights x*x), for finite float32 (n, G) x."""
    x = np.ascontiguousarray(x, F32)
    w = x * x if w is None else np.ascontiguousarray(w, F32)
    return _qx(x, int(nmax), w)
