"""Encoding float32 arrays into ggml tensor types, byte for byte as llama.cpp does.

F32/F16/BF16 come from numpy / gguf-py (numpy's float32->float16 cast is round-to-nearest-even,
as ggml's). The block types (Q8_0, Q4_0..Q5_1, Q2_K..Q6_K) go through quantize.kquants, a numpy port
of ggml_quantize_chunk that writes the same bytes, with or without an importance matrix.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf import quants as _q

from . import kquants as _kq

FLOAT_TYPES = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16}


def ggml_dims(shape) -> tuple[int, ...]:
    """A numpy shape as ggml counts it (ggml_n_dims): trailing ggml dims (leading numpy dims) of 1
    dropped. llama-quantize writes and quantizes by it; llama.cpp loads either form."""
    shape = tuple(shape)
    while len(shape) > 1 and shape[0] == 1:
        shape = shape[1:]
    return shape
# Types this module can write.
SUPPORTED = {T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1,
             T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K}


def block_size(qtype: T) -> int:
    return GGML_QUANT_SIZES[qtype][0]


def fits(qtype: T, row: int) -> bool:
    """Whether rows of this length can be stored in qtype (a whole number of blocks)."""
    return row % block_size(qtype) == 0


def nbytes(qtype: T, shape: tuple[int, ...]) -> int:
    bs, ts = GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape, dtype=np.int64))
    return n // bs * ts


def encode(a: np.ndarray, qtype: T, imatrix: np.ndarray | None = None) -> np.ndarray:
    """float32 array -> its stored form (float32/float16 arrays, or raw bytes as uint8).

    Block types quantize along the last axis (ggml rows), byte for byte as ggml_quantize_chunk;
    `imatrix` (float32, one value per element of a row) selects ggml's importance-weighted path
    (ignored for F32/F16/BF16 and, as in ggml, for Q8_0). The result keeps the leading axes.
    """
    a = np.ascontiguousarray(a, dtype=np.float32)
    if qtype == T.F32:
        return a
    if qtype == T.F16:
        return a.astype(np.float16)
    if qtype not in SUPPORTED:
        raise ValueError(f"ggml type {qtype.name} is not supported for writing")
    if qtype in _kq.TYPES:
        rows = a.reshape(-1, a.shape[-1]) if a.ndim else a.reshape(1, 1)
        q = _kq.quantize(rows, qtype, imatrix)
        return q.reshape(*a.shape[:-1], q.shape[-1])
    return _q.quantize(a, qtype)


def decode(data: np.ndarray, qtype: T, shape: tuple[int, ...]) -> np.ndarray:
    """Stored form -> float32 array of `shape` (numpy order)."""
    if qtype == T.F32:
        return np.asarray(data, dtype=np.float32).reshape(shape)
    if qtype == T.F16:
        return np.asarray(data).view(np.float16).astype(np.float32).reshape(shape)
    return _q.dequantize(np.asarray(data).view(np.uint8), qtype).reshape(shape).astype(np.float32)
