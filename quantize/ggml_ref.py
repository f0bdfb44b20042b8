"""ctypes access to llama.cpp's own quantizer (`ggml_quantize_chunk` in libggml-base).

This is the reference the numpy quantizers in `quantize.kquants` are checked against, byte for
byte. The library is the one llama-cpp-python installs (``llama_cpp/lib/libggml-base.so``); there
the quantizers are plain scalar C (no FMA, no SIMD), so their output is reproducible.

ggml's type enum has the same numbers as ``gguf.GGMLQuantizationType``.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from pathlib import Path

import numpy as np

__all__ = ["GgmlRefUnavailable", "blck_size", "dequantize_rows", "library_path", "quantize_chunk", "row_size",
           "type_size"]


class GgmlRefUnavailable(RuntimeError):
    """llama-cpp-python (and the libggml-base it ships) is not installed or cannot be loaded."""


def _lib_names() -> list[str]:
    if sys.platform == "darwin":
        return ["libggml-base.dylib"]
    if sys.platform == "win32":
        return ["ggml-base.dll"]
    return ["libggml-base.so", "libggml-base.so.0"]


def library_path() -> Path:
    """Path of the libggml-base that the installed llama_cpp package carries."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("llama_cpp")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise GgmlRefUnavailable(
            "llama_cpp (llama-cpp-python) is not installed; it is needed for ggml's reference quantizer "
            "(pip install 'llama-cpp-python==0.3.36')"
        )
    pkg = Path(next(iter(spec.submodule_search_locations)))
    for sub in ("lib", "."):
        for name in _lib_names():
            p = pkg / sub / name
            if p.exists():
                return p
    raise GgmlRefUnavailable(f"no libggml-base found under {pkg}/lib (llama-cpp-python installation incomplete?)")


@functools.lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL:
    path = library_path()
    try:
        lib = ctypes.CDLL(os.fspath(path))
    except OSError as e:  # pragma: no cover - depends on the installation
        raise GgmlRefUnavailable(f"cannot load {path}: {e}") from e
    # size_t ggml_quantize_chunk(enum ggml_type type, const float * src, void * dst,
    #                            int64_t start, int64_t nrows, int64_t n_per_row, const float * imatrix);
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
    ]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_type_size.restype = ctypes.c_size_t
    lib.ggml_type_size.argtypes = [ctypes.c_int]
    lib.ggml_blck_size.restype = ctypes.c_int64
    lib.ggml_blck_size.argtypes = [ctypes.c_int]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    return lib


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class _TypeTraits(ctypes.Structure):
    """ggml.h's struct ggml_type_traits (its first fields, in order)."""

    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", _TO_FLOAT), ("from_float_ref", ctypes.c_void_p)]


def available() -> bool:
    try:
        _lib()
    except GgmlRefUnavailable:
        return False
    return True


def type_size(qtype: int) -> int:
    """Bytes per block (ggml_type_size)."""
    return int(_lib().ggml_type_size(int(qtype)))


def blck_size(qtype: int) -> int:
    """Elements per block (ggml_blck_size)."""
    return int(_lib().ggml_blck_size(int(qtype)))


def row_size(qtype: int, n_per_row: int) -> int:
    return int(_lib().ggml_row_size(int(qtype), int(n_per_row)))


def quantize_chunk(rows: np.ndarray, qtype: int, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Quantize float32 rows [n_rows, n_per_row] with ggml's own code; returns uint8 [n_rows, row_bytes].

    `imatrix` (float32 [n_per_row]) is passed as ggml's `quant_weights`; None takes the no-imatrix
    path. ggml_quantize_chunk calls ggml_quantize_init itself (a no-op for non-IQ types).
    Single-threaded: this is one call over all rows.
    """
    lib = _lib()
    x = np.ascontiguousarray(rows, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"rows must be 2-D [n_rows, n_per_row], got shape {rows.shape}")
    nrows, n_per_row = x.shape
    t = int(qtype)
    bs = blck_size(t)
    if n_per_row % bs:
        raise ValueError(f"n_per_row={n_per_row} is not a multiple of the block size {bs}")
    if lib.ggml_quantize_requires_imatrix(t) and imatrix is None:
        raise ValueError(f"ggml type {t} requires an importance matrix")
    rs = row_size(t, n_per_row)
    out = np.zeros((nrows, rs), dtype=np.uint8)
    imp = None
    if imatrix is not None:
        imp = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
        if imp.shape[0] != n_per_row:
            raise ValueError(f"imatrix has {imp.shape[0]} values, rows have {n_per_row}")
    if nrows == 0:
        return out
    n = lib.ggml_quantize_chunk(
        t, x.ctypes.data, out.ctypes.data, 0, nrows, n_per_row,
        None if imp is None else imp.ctypes.data,
    )
    if n != nrows * rs:  # pragma: no cover - ggml asserts this itself
        raise RuntimeError(f"ggml_quantize_chunk wrote {n} bytes, expected {nrows * rs}")
    return out


def dequantize_rows(data: np.ndarray, qtype: int, n_per_row: int) -> np.ndarray:
    """ggml's own dequantizer (the type's `to_float`): stored rows (uint8 [n_rows, row_bytes], or
    flat) -> float32 [n_rows, n_per_row]. ctypes drops the GIL for the call, so threads can split
    a tensor's rows."""
    t = int(qtype)
    fn = _lib().ggml_get_type_traits(t).contents.to_float
    if not fn:
        raise ValueError(f"ggml type {t} has no dequantizer")
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    rs = row_size(t, n_per_row)
    if raw.size % rs:
        raise ValueError(f"{raw.size} bytes are not whole rows of {rs} bytes")
    out = np.empty((raw.size // rs, n_per_row), np.float32)
    if out.size:
        fn(raw.ctypes.data, out.ctypes.data, out.size)
    return out
