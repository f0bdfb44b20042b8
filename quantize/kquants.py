"""Bit-exact numpy ports of llama.cpp's quantizers (what `ggml_quantize_chunk` writes).

    quantize(rows, qtype, imatrix=None) -> uint8 [n_rows, bytes_per_row]

Types: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, each without an importance matrix (ggml's
`quantize_row_*_ref`) and with one (`quantize_row_*_impl`: make_qkx3_quants + make_qp_quants for
Q2_K/Q4_K/Q5_K, make_qx_quants with weights for Q3_K/Q6_K); Q4_0, Q4_1, Q5_0, Q5_1 (without an
imatrix ggml's `_ref`; with one ggml's `_impl`, whose weights use statistics of the whole row);
Q8_0 (ggml ignores the imatrix for it; gguf-py's numpy Q8_0 is exact). Without an imatrix Q4_0..Q5_1
are re-implemented too: gguf-py's numpy versions write -0.0 where ggml writes +0.0 (or the reverse)
in the fp16 d/m of all-zero blocks holding -0.0 (sparse data).

The reference is the x86 libggml-base that llama-cpp-python ships: scalar float32 C without FMA.
An ARM build (FMA contraction) may differ in rare blocks.
Non-finite input: ±Inf gives ggml's bytes (checked). NaN is not supported (the converter refuses
it): blocks without NaN are unaffected, blocks holding a NaN (for the legacy imatrix paths, rows
holding one) get deterministic bytes that usually but not always equal ggml's.

The scale searches, most of the time, run compiled by numba where it is installed (kquants_jit.py,
same bytes, GIL released). Work is split into chunks of a few hundred super-blocks (they stay in L2
cache, faster than large chunks) and, optionally, spread over threads (numpy releases the GIL
inside ufuncs); the bytes do not depend on the chunking or the thread count (every block is
independent). The GGUF writer calls this with one thread per work unit and parallelises over units.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf import quants as _gq

from . import kquants_legacy as _kl
from . import kquants_types as _kt
from .kquants_core import F32, seqsum

__all__ = ["KQUANT_TYPES", "TYPES", "default_threads", "quantize"]

KQUANT_TYPES = {T.Q2_K: _kt.q2_k, T.Q3_K: _kt.q3_k, T.Q4_K: _kt.q4_k, T.Q5_K: _kt.q5_k, T.Q6_K: _kt.q6_k}
LEGACY_TYPES = {T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0}
TYPES = frozenset(KQUANT_TYPES) | LEGACY_TYPES

# Super-blocks (256 values) per work chunk; the search arrays of a chunk stay within L2.
CHUNK_SUPERBLOCKS = 256
# The legacy imatrix paths work on 32-value blocks.
CHUNK_BLOCKS_LEGACY = 4096


def default_threads() -> int:
    """Worker threads: $MINICPMV_QUANT_THREADS if set, else 1.

    Threads over chunks are exact (blocks are independent) but numpy's small ufunc calls contend
    for the GIL: on a 2-core machine shared with other work, 2 threads gave anything from no gain
    to ~1.5x, so more than one is opt-in.
    """
    env = os.environ.get("MINICPMV_QUANT_THREADS")
    if env:
        return max(1, int(env))
    return 1


def _check(rows: np.ndarray, qtype: T, imatrix: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    if qtype not in TYPES:
        raise ValueError(f"kquants does not implement {T(qtype).name}")
    x = np.ascontiguousarray(rows, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"rows must be 2-D [n_rows, n_per_row], got shape {x.shape}")
    bs = GGML_QUANT_SIZES[qtype][0]
    if x.shape[1] % bs:
        raise ValueError(f"n_per_row={x.shape[1]} is not a multiple of {T(qtype).name}'s block size {bs}")
    qw = None
    if imatrix is not None and qtype != T.Q8_0:  # quantize_q8_0 ignores quant_weights
        qw = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
        if qw.shape[0] != x.shape[1]:
            raise ValueError(f"imatrix has {qw.shape[0]} values, rows have {x.shape[1]}")
    return x, qw


def quantize(rows: np.ndarray, qtype: T, imatrix: np.ndarray | None = None, *,
             threads: int | None = None) -> np.ndarray:
    """Quantize float32 rows [n_rows, n_per_row] to ggml's block layout, byte for byte as
    `ggml_quantize_chunk(qtype, rows, ..., imatrix)`; returns uint8 [n_rows, bytes_per_row].

    imatrix: float32 [n_per_row] importance weights (llama.cpp's per-column imatrix), or None.
    threads: worker threads (default: default_threads()); the output does not depend on it.
    """
    qtype = T(qtype)
    x, qw = _check(rows, qtype, imatrix)
    nrows, n_per_row = x.shape
    bs, ts = GGML_QUANT_SIZES[qtype]
    out = np.empty((nrows, n_per_row // bs * ts), dtype=np.uint8)
    if nrows == 0 or n_per_row == 0:
        return out

    if qtype in KQUANT_TYPES:
        fn = KQUANT_TYPES[qtype]
        nb_row = n_per_row // bs
        xb = x.reshape(-1, bs)
        ob = out.reshape(-1, ts)
        qwb = None if qw is None else qw.reshape(nb_row, bs)

        def work(a: int, b: int) -> None:
            w = None
            if qwb is not None:
                w = qwb[np.arange(a, b) % nb_row]
            ob[a:b] = fn(xb[a:b], w)

        _run(work, xb.shape[0], CHUNK_SUPERBLOCKS, threads)
    elif qtype == T.Q8_0:
        # quantize_q8_0 ignores the imatrix; gguf-py's numpy Q8_0 is bit-exact with quantize_row_q8_0_ref.
        def work(a: int, b: int) -> None:
            out[a:b] = _gq.quantize(x[a:b], qtype)

        _run(work, nrows, max(1, (CHUNK_BLOCKS_LEGACY * bs) // n_per_row), threads)
    elif qw is None:
        def work(a: int, b: int) -> None:
            out[a:b] = _kl.legacy_ref(x[a:b].reshape(-1, bs), qtype.name).reshape(b - a, -1)

        _run(work, nrows, max(1, (CHUNK_BLOCKS_LEGACY * bs) // n_per_row), threads)
    else:
        nb_row = n_per_row // bs
        qwb = qw.reshape(nb_row, bs)

        def work(a: int, b: int) -> None:
            xr = x[a:b]
            # sigma2 = sum_x2/n_per_row over the whole row, summed sequentially as in C
            xt = np.ascontiguousarray(xr.T)
            sigma2 = seqsum(xt * xt) / F32(n_per_row)
            res = _kl.legacy_imatrix(xr.reshape(-1, bs), np.tile(qwb, (b - a, 1)),
                                     np.repeat(sigma2, nb_row), qtype.name)
            out[a:b] = res.reshape(b - a, -1)

        _run(work, nrows, max(1, CHUNK_BLOCKS_LEGACY // nb_row), threads)
    return out


def _run(work, n: int, chunk: int, threads: int | None) -> None:
    bounds = [(a, min(n, a + chunk)) for a in range(0, n, chunk)]
    inner = work

    def work(a: int, b: int) -> None:
        # inf/NaN intermediates (1/0 on zero groups, ...) are part of the C semantics; numpy's error
        # state is per thread (contextvars), so it is set here, in the worker.
        with np.errstate(all="ignore"):
            inner(a, b)

    nt = default_threads() if threads is None else max(1, int(threads))
    nt = min(nt, len(bounds))
    if nt <= 1:
        for a, b in bounds:
            work(a, b)
        return
    with ThreadPoolExecutor(max_workers=nt, thread_name_prefix="kquants") as ex:
        for f in [ex.submit(work, a, b) for a, b in bounds]:
            f.result()
