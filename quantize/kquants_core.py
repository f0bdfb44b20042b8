"""Vectorised, bit-exact numpy ports of ggml's scale-search helpers (ggml-quants.c).

Every function works on many independent groups at once. Group data is laid out as
(element, group): ``x[i, g]`` is element i of group g, so a reduction over axis 0 with
``np.add.reduce`` adds the elements in C's sequential order (numpy's pairwise summation only
applies along the contiguous axis). All arithmetic stays float32 with C's association, no FMA
(the reference libggml-base is scalar C without contraction). Python-level loops run over search
steps and element positions only, never over groups or blocks.

Where the C code loops "until nothing changes" (at most 5 passes), groups that have converged keep
running with the others: a pass that changes nothing leaves the state as it was, so further passes
change nothing either. The loop stops early once a pass changes no group at all.
"""

from __future__ import annotations

import os

import numpy as np

from . import kquants_jit as _jit

F32 = np.float32


def use_jit() -> bool:
    """The compiled searches, unless $MINICPMV_KQUANTS_JIT=0 (the tests use it to hold the plain numpy
    code to ggml's bytes as well)."""
    return os.environ.get("MINICPMV_KQUANTS_JIT", "1") != "0"
GROUP_MAX_EPS = F32(1e-15)
_MAGIC = F32(12582912.0)


def seqsum(a: np.ndarray) -> np.ndarray:
    """Sequential float32 sum over axis 0 of a 2-D array, in C's order.

    np.add.reduce over axis 0 of a C-contiguous (n, G>=2) array adds row after row; with a single
    column numpy collapses it to a 1-D contiguous reduction, which is pairwise (8 accumulators),
    so that case goes through np.add.accumulate, which is sequential by definition.
    """
    if a.shape[1] >= 2 and a.flags.c_contiguous:
        return np.add.reduce(a, axis=0)
    return np.add.accumulate(a, axis=0)[-1]


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: the 12582912 bit trick, int32 (round-half-even; exact also out of range)."""
    i = np.add(v, _MAGIC, dtype=F32).view(np.int32)
    i &= 0x7FFFFF
    i -= 0x400000
    return i


def f16_bytes(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 (B,) -> (fp16 bytes uint8 (B, 2), the float32 value they hold)."""
    h = np.asarray(v, dtype=F32).astype(np.float16)
    return h.view(np.uint8).reshape(-1, 2), h.astype(F32)


def first_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """C's `if (ax > amax) { amax = ax; max = x[i]; }` from amax = max = 0: (max, amax) per column.

    np.argmax along axis 0 is slow, so the column max and min decide, and only columns where
    +a and -a tie for the largest magnitude look for the first occurrence. NaN never wins a `>`
    in C, hence fmax/fmin (which skip NaN).
    """
    hi = np.fmax.reduce(x, axis=0)
    nlo = -np.fmin.reduce(x, axis=0)
    amax = np.fmax(hi, nlo)
    mx = np.where(hi >= nlo, hi, -nlo)
    tie = np.flatnonzero((hi == nlo) & (amax > 0))
    if tie.size:
        sub = np.abs(x[:, tie])
        sub[np.isnan(sub)] = -1
        mx[tie] = x[:, tie][np.argmax(sub, axis=0), np.arange(tie.size)]
    pos = amax > 0
    return np.where(pos, mx, F32(0)), np.where(pos, amax, F32(0))


def c_min(x: np.ndarray, from_first: bool = True) -> np.ndarray:
    """C's `min = x[0]; if (x[i] < min) min = x[i];` per column, including the sign of a zero minimum
    (the first of equal zeros wins; np.minimum may pick -0.0 over 0.0; the sign reaches the bytes
    through Q4_1/Q5_1's stored min) and NaN (skipped, unless x[0] is NaN, which then stays).
    from_first=False: `min = FLT_MAX` as the start instead (the legacy _ref quantizers)."""
    mn = np.fmin.reduce(x, axis=0)
    z = np.flatnonzero(mn == 0)
    if z.size:
        sub = x[:, z]
        mn[z] = sub[np.argmin(np.where(np.isnan(sub), np.inf, sub), axis=0), np.arange(z.size)]
    if from_first:
        return np.where(np.isnan(x[0]), x[0], mn)
    return np.where(np.isnan(mn), np.finfo(F32).max, mn)


def c_max(x: np.ndarray, from_first: bool = True) -> np.ndarray:
    """C's `max = x[0]; if (x[i] > max) max = x[i];` per column (as c_min; start -FLT_MAX)."""
    mx = np.fmax.reduce(x, axis=0)
    z = np.flatnonzero(mx == 0)
    if z.size:
        sub = x[:, z]
        mx[z] = sub[np.argmax(np.where(np.isnan(sub), -np.inf, sub), axis=0), np.arange(z.size)]
    if from_first:
        return np.where(np.isnan(x[0]), x[0], mx)
    return np.where(np.isnan(mx), -np.finfo(F32).max, mx)


# |v| below this: nearest_int(v) == np.rint(v) (the bit trick is exact), so rounding and clamping can
# stay in float32 (rint, then clamp to integer bounds, equals clamp(nearest_int)). Beyond it the C
# result is "garbage" from the bit trick, reproduced only by nearest_int itself.
_RINT_SAFE = F32(4194303)


def _levels(t: np.ndarray, lo: int, hi: int, out: np.ndarray, exact: bool) -> None:
    """out = float32(clamp(nearest_int(t), lo, hi)). exact=False is allowed only when |t| <= 4194303."""
    if exact:
        out[...] = np.clip(nearest_int(t), lo, hi)
    else:
        np.rint(t, out=out)
        np.clip(out, F32(lo), F32(hi), out=out)


def _weighted_err(lf, scale, mn, x, w, use_mad: bool, out: np.ndarray) -> np.ndarray:
    """sum w * |scale*l + min - x| (or its square) per group, in C's operation order; `out` is scratch."""
    np.multiply(lf, scale, out=out)
    out += mn
    out -= x
    if use_mad:
        np.abs(out, out=out)
    else:
        out *= out
    out *= w
    return seqsum(out)


def qkx_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
               use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2_quants / make_qkx3_quants (identical when weights are given).

    x, w: float32 (n, G). Returns L uint8 (n, G), scale (G,), the_min (G,) (= -min).
    The levels of a step are a function of that step's (iscale, min) only, so instead of copying
    levels on every improvement the winning (iscale, min) pair is kept and L recomputed once.
    Finite data goes to the compiled twin (kquants_jit) where numba is installed.
    """
    if _jit.available() and use_jit() and np.isfinite(x).all() and np.isfinite(w).all():
        return _jit.qkx_quants(x, w, nmax, rmin, rdelta, nstep, use_mad)
    mn = c_min(x)
    xmin = mn.copy()
    mx = c_max(x)
    sum_w = seqsum(w)
    sum_x = seqsum(w * x)
    mn = mn0 = np.where(mn > 0, F32(0), mn)
    degenerate = ~(mx > mn)  # C: max == min (qkx2), max <= min (qkx3); same without NaN
    live = ~degenerate
    # NaN/Inf give NaN levels where C's bit trick gives 0: such chunks always take the bit trick
    finite = bool(np.isfinite(x).all())
    fnmax = F32(nmax)
    t = np.empty_like(x)
    lf = np.empty_like(x)
    wl = np.empty_like(x)
    with np.errstate(all="ignore"):
        iscale = fnmax / (mx - mn)
        scale = F32(1) / iscale
        best_is, best_mn = iscale, mn
        np.subtract(x, mn, out=t)
        t *= iscale  # in [0, nmax] for live groups
        _levels(t, 0, nmax, lf, exact=not finite)
        best = _weighted_err(lf, scale, mn, x, w, use_mad, out=lf)
        for step in range(nstep + 1):
            num = F32(rmin) + F32(rdelta) * F32(step) + fnmax
            rng = mx - mn
            iscale = num / rng
            np.subtract(x, mn, out=t)
            t *= iscale
            # t is monotonic in x, so it lies between its values at mx (= rng*iscale ~ num, in range)
            # and at xmin, which can be far below 0 once min has moved above xmin: check that end.
            exact = not (finite and bool(np.all(((xmin - mn) * iscale >= -_RINT_SAFE) | degenerate)))
            _levels(t, 0, nmax, lf, exact)
            np.multiply(w, lf, out=wl)
            sum_l = seqsum(wl)
            np.multiply(wl, x, out=t)
            sum_xl = seqsum(t)
            wl *= lf
            sum_l2 = seqsum(wl)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            if pos.any():
                this_min = np.where(pos, F32(0), this_min)
                this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            cur = _weighted_err(lf, this_scale, this_min, x, w, use_mad, out=t)
            upd = (D > 0) & (cur < best) & live
            if upd.any():
                best_is = np.where(upd, iscale, best_is)
                best_mn = np.where(upd, mn, best_mn)
                best = np.where(upd, cur, best)
                scale = np.where(upd, this_scale, scale)
                mn = np.where(upd, this_min, mn)
        np.subtract(x, best_mn, out=t)
        t *= best_is
        L = np.clip(nearest_int(t), 0, nmax).astype(np.uint8)
    if degenerate.any():
        L[:, degenerate] = 0
        scale = np.where(degenerate, F32(0), scale)
        mn = np.where(degenerate, mn0, mn)
    return L, scale.astype(F32), -mn


def qx_quants(x: np.ndarray, nmax: int, w: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants with rmse_type = 1; w None means weights x*x. Returns L uint8 (n, G), scale (G,).

    As in qkx_quants, the winning iscale is kept and the levels recomputed once at the end.
    """
    if _jit.available() and use_jit() and np.isfinite(x).all() and (w is None or np.isfinite(w).all()):
        return _jit.qx_quants(x, nmax, w)
    mx, amax = first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    if w is None:
        w = x * x
    wx = w * x
    fnmax = F32(nmax)
    t = np.empty_like(x)
    lf = np.empty_like(x)
    # |iscale*x| <= (nmax + 0.9) * |x|/amax: within rint's exact range (zero groups give NaN here and
    # are overwritten below). NaN, or an infinite x (inf*0 = NaN), gives NaN where C's bit trick
    # gives 0: such chunks take the bit-trick path.
    exact = not bool(np.isfinite(x).all())
    with np.errstate(all="ignore"):
        def sums(iscale):
            np.multiply(x, iscale, out=t)
            _levels(t, -nmax, nmax - 1, lf, exact=exact)
            np.multiply(wx, lf, out=t)
            sumlx = seqsum(t)
            np.multiply(w, lf, out=t)
            np.multiply(t, lf, out=t)
            return sumlx, seqsum(t)

        best_is = F32(-nmax) / mx
        sumlx, suml2 = sums(best_is)
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            iscale = -(fnmax + F32(0.1) * F32(step)) / mx
            sumlx, suml2 = sums(iscale)
            upd = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            if upd.any():
                best_is = np.where(upd, iscale, best_is)
                scale = np.where(upd, sumlx / suml2, scale)
                best = np.where(upd, scale * sumlx, best)
        np.multiply(x, best_is, out=t)
        L = (np.clip(nearest_int(t), -nmax, nmax - 1) + nmax).astype(np.uint8)
    if zero.any():
        L[:, zero] = 0
        scale = np.where(zero, F32(0), scale)
    return L, scale


def qp_quants(x: np.ndarray, nmax: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """make_qp_quants (quantize non-negative sub-block scales). x, w: float32 (n, B).

    Returns L (n, B) int32 holding the stored uint8 values (0..255), and the scale (B,).
    """
    n = x.shape[0]
    mx = np.maximum.reduce(x, axis=0, initial=F32(0))
    zero = mx < GROUP_MAX_EPS
    fnmax = F32(nmax)
    with np.errstate(all="ignore"):
        iscale = fnmax / mx
        scale = F32(1) / iscale
        d = x - scale * (nearest_int(iscale * x) & 0xFF).astype(F32)  # L is uint8 in C
        best = seqsum((w * d) * d)
        for step in range(-4, 5):
            if step == 0:
                continue
            iscale_is = (F32(0.1) * F32(step) + fnmax) / mx
            scale_is = F32(1) / iscale_is
            l = np.minimum(nearest_int(iscale_is * x), nmax)
            d = x - scale_is * l.astype(F32)
            mse = seqsum((w * d) * d)
            upd = mse < best
            best = np.where(upd, mse, best)
            iscale = np.where(upd, iscale_is, iscale)
        l = np.minimum(nearest_int(iscale * x), nmax)
        lf = l.astype(F32)
        wx = w * x
        sumlx = seqsum(wx * lf)
        suml2 = seqsum((w * lf) * lf)
        L = l & 0xFF
        for _ in range(5):
            changed = False
            for i in range(n):
                wi, wxi, Li = w[i], wx[i], L[i]
                Lif = Li.astype(F32)
                slx = sumlx - wxi * Lif
                sl2 = suml2 - (wi * Lif) * Lif
                new_l = np.minimum(nearest_int((x[i] * sl2) / slx), nmax)
                ok = (slx > 0) & (sl2 > 0) & (new_l != Li)
                nf = new_l.astype(F32)
                slx += wxi * nf
                sl2 += (wi * nf) * nf
                ok &= (slx * slx) * suml2 > (sumlx * sumlx) * sl2
                if ok.any():
                    changed = True
                    L[i] = np.where(ok, new_l & 0xFF, Li)
                    sumlx = np.where(ok, slx, sumlx)
                    suml2 = np.where(ok, sl2, suml2)
            if not changed:  # every group has converged (C: `if (!n_changed) break;`)
                break
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    if zero.any():
        L[:, zero] = 0
        scale = np.where(zero, F32(0), scale)
    return L, scale


def q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_q3_quants(n, nmax, x, L, do_rmse=true). Returns L uint8 (n, G) (0..2*nmax-1), scale (G,)."""
    n = x.shape[0]
    mx, amax = first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    w = x * x
    wx = w * x
    with np.errstate(all="ignore"):
        L = nearest_int((F32(-nmax) / mx) * x)
        np.clip(L, -nmax, nmax - 1, out=L)
        lf = L.astype(F32)
        sumlx = seqsum(wx * lf)
        suml2 = seqsum((w * lf) * lf)
        for _ in range(5):
            changed = False
            for i in range(n):
                wi, wxi, Li = w[i], wx[i], L[i]
                Lif = Li.astype(F32)
                slx = sumlx - wxi * Lif
                sl2 = suml2 - (wi * Lif) * Lif
                new_l = nearest_int((x[i] * sl2) / slx)
                np.clip(new_l, -nmax, nmax - 1, out=new_l)
                nf = new_l.astype(F32)
                ok = (slx > 0) & (new_l != Li)
                slx += wxi * nf
                sl2 += (wi * nf) * nf
                ok &= (sl2 > 0) & ((slx * slx) * suml2 > (sumlx * sumlx) * sl2)
                if ok.any():
                    changed = True
                    L[i] = np.where(ok, new_l, Li)
                    sumlx = np.where(ok, slx, sumlx)
                    suml2 = np.where(ok, sl2, suml2)
            if not changed:  # every group has converged (C: `if (!n_changed) break;`)
                break
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    L = (L + nmax).astype(np.uint8)
    if zero.any():
        L[:, zero] = 0
        scale = np.where(zero, F32(0), scale)
    return L, scale
