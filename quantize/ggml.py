"""Encoding float32 arrays into ggml tensor types, byte for byte as llama.cpp does.

F32/F16/BF16 come from numpy / gguf-py (numpy's float32->float16 cast is round-to-nearest-even,
as ggml's). The block types (Q8_0, Q4_0..Q5_1, Q2_K..Q6_K) go through one of two quantizers that write the same
bytes, with or without an importance matrix:

* "kquants": this project's port (quantize/kquants*.py): numpy, with the k-quant scale searches
  compiled by numba (kquants_jit.py: every group an independent SIMD lane doing C's exact scalar
  sequence), which makes it 2-3x faster than ggml's own C per thread; plain numpy where numba is
  missing. The tests hold both forms to ggml's bytes.
* "ggml": llama.cpp's own `ggml_quantize_chunk`, from the libggml-base that llama-cpp-python installs
  (quantize.ggml_ref), the code `llama_model_quantize` runs (ctypes releases the GIL, so threads
  quantize in parallel).

"auto" (the default; $MINICPMV_QUANTIZER overrides): kquants where numba is installed, else ggml
where it loads, else kquants in plain numpy.
"""

from __future__ import annotations

import functools
import os

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
QUANTIZERS = ("auto", "kquants", "ggml")


def resolve_quantizer(name: str | None = None) -> str:
    """"kquants" or "ggml" for a requested name (None: $MINICPMV_QUANTIZER, else auto)."""
    from . import ggml_ref, kquants_jit

    name = (name or os.environ.get("MINICPMV_QUANTIZER") or "auto").lower()
    if name not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {name!r} (choose from {', '.join(QUANTIZERS)})")
    if name == "auto":
        return "kquants" if kquants_jit.available() or not ggml_ref.available() else "ggml"
    if name == "ggml":
        ggml_ref.library_path()  # raises GgmlRefUnavailable with the reason
        if not ggml_ref.available():
            raise ggml_ref.GgmlRefUnavailable(f"cannot load {ggml_ref.library_path()}")
    return name


def describe_quantizer(name: str) -> dict:
    """What the manifest records about the quantizer that ran."""
    from . import ggml_ref

    if name == "ggml":
        from importlib.metadata import version

        return {"name": "ggml", "function": "ggml_quantize_chunk", "library": ggml_ref.library_path().name,
                "from": f"llama-cpp-python {version('llama-cpp-python')}"}
    from . import kquants_core, kquants_jit

    if kquants_jit.available() and kquants_core.use_jit():
        from importlib.metadata import version

        return {"name": "kquants", "function": "quantize.kquants.quantize", "searches": f"numba {version('numba')}"}
    return {"name": "kquants", "function": "quantize.kquants.quantize", "searches": "numpy"}


def default_threads(quantizer: str) -> int:
    """Quantizing threads: $MINICPMV_QUANT_THREADS if set; else every core for ggml's C and the
    numba-compiled searches (both run outside the GIL), one for plain numpy (its small ufunc calls
    contend for the GIL)."""
    from . import kquants_core, kquants_jit

    env = os.environ.get("MINICPMV_QUANT_THREADS")
    if env:
        return max(1, int(env))
    if quantizer == "ggml" or (kquants_jit.available() and kquants_core.use_jit()):
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # pragma: no cover - not Linux
            return max(1, os.cpu_count() or 1)
    return 1


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


def encode(a: np.ndarray, qtype: T, imatrix: np.ndarray | None = None, *, quantizer: str | None = None,
           threads: int | None = None) -> np.ndarray:
    """float32 array -> its stored form (float32/float16 arrays, or raw bytes as uint8).

    Block types quantize along the last axis (ggml rows), byte for byte as ggml_quantize_chunk;
    `imatrix` (float32, one value per element of a row) selects ggml's importance-weighted path
    (ignored for F32/F16/BF16 and, as in ggml, for Q8_0). The result keeps the leading axes.
    quantizer: "kquants", "ggml" or "auto"/None (resolve_quantizer); threads: kquants' worker threads (ggml's runs in the calling thread; the GGUF writer parallelises over chunks).
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
        if resolve_quantizer(quantizer) == "ggml":
            from . import ggml_ref

            q = ggml_ref.quantize_chunk(rows, qtype, None if qtype == T.Q8_0 else imatrix)
        else:
            q = _kq.quantize(rows, qtype, imatrix, threads=threads)
        return q.reshape(*a.shape[:-1], q.shape[-1])
    return _q.quantize(a, qtype)


def decode(data: np.ndarray, qtype: T, shape: tuple[int, ...]) -> np.ndarray:
    """Stored form -> float32 array of `shape` (numpy order)."""
    if qtype == T.F32:
        return np.asarray(data, dtype=np.float32).reshape(shape)
    if qtype == T.F16:
        return np.asarray(data).view(np.float16).astype(np.float32).reshape(shape)
    if _ggml_decodes(qtype):  # ggml's own to_float: the same floats (tests/test_kquants.py), 5-10x faster
        from . import ggml_ref

        return ggml_ref.dequantize_rows(data, qtype, shape[-1]).reshape(shape)
    return _q.dequantize(np.asarray(data).view(np.uint8), qtype).reshape(shape).astype(np.float32)


def _ggml_decodes(qtype: T) -> bool:
    return qtype in SUPPORTED and _have_ggml()


@functools.lru_cache(maxsize=1)
def _have_ggml() -> bool:
    from . import ggml_ref

    return ggml_ref.available()
