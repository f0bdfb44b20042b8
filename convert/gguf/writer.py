"""Streaming GGUF writer: header and tensor infos first, then one tensor at a time.

The file is written under a temporary name in the target folder and renamed when complete,
so a failure (a bad tensor, a full disk, an interrupt) leaves nothing behind.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
from tqdm import tqdm

from quantize import ggml

from ..checkpoint import Checkpoint
from ..errors import ConvertError
from . import transforms
from .plan import TensorPlan


# Tensors without transforms are read, encoded and written this many float32 bytes at a time
# (whole rows), so the largest tensor (the 248k-row embedding) never sits in memory at once.
CHUNK_BYTES = 64 << 20


def source_chunks(ckpt: Checkpoint, p: TensorPlan, allow_nonfinite: bool = False):
    """The float32 data of one planned tensor after its transforms, in row chunks, checked for NaN/Inf."""
    row_bytes = 4 * int(np.prod(p.shape[1:], dtype=np.int64)) if len(p.shape) > 1 else 4 * p.n_params
    step = max(1, CHUNK_BYTES // max(row_bytes, 1))
    if p.transforms or len(p.shape) < 2 or p.shape[0] <= step:
        yield _checked(p, transforms.apply(p.transforms, ckpt.tensor(p.source), ckpt.spec), allow_nonfinite)
        return
    for r in range(0, p.shape[0], step):
        yield _checked(p, ckpt.tensor(p.source, slice(r, r + step)), allow_nonfinite)


def source_tensor(ckpt: Checkpoint, p: TensorPlan, allow_nonfinite: bool = False) -> np.ndarray:
    """The whole float32 tensor after its transforms (for checks and validation)."""
    chunks = list(source_chunks(ckpt, p, allow_nonfinite))
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks, axis=0)


def _checked(p: TensorPlan, a: np.ndarray, allow_nonfinite: bool) -> np.ndarray:
    if not allow_nonfinite and not np.isfinite(a).all():
        bad = int(a.size - np.isfinite(a).sum())
        raise ConvertError(f"tensor {p.source} has {bad} NaN/Inf value(s); refusing (use --allow-nonfinite to write anyway)")
    return a


def write_gguf(path: Path, arch: str, plans: list[TensorPlan], ckpt: Checkpoint,
               add_metadata: Callable[[gguf.GGUFWriter], None], *, quiet: bool = False,
               allow_nonfinite: bool = False, encode: Callable = ggml.encode, desc: str = "",
               imatrix_for: Callable[[TensorPlan], np.ndarray | None] = lambda p: None) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    w = gguf.GGUFWriter(None, arch)
    for p in plans:
        w.add_tensor_info(p.name, ggml_byte_shape(p), np.dtype(np.uint8), p.nbytes, raw_dtype=p.qtype)
    add_metadata(w)
    try:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        fout = w.fout[0]
        total = sum(p.nbytes for p in plans)
        with tqdm(total=total, desc=desc or path.name, unit="B", unit_scale=True, disable=quiet, leave=False) as bar:
            for p in plans:
                w.write_padding(fout, fout.tell())  # align the tensor's start, as GGUFWriter does
                written = 0
                imat = imatrix_for(p)
                for chunk in source_chunks(ckpt, p, allow_nonfinite):
                    raw = np.ascontiguousarray(encode(chunk, p.qtype, imat)).view(np.uint8).reshape(-1)
                    fout.write(raw.data)
                    written += raw.nbytes
                    bar.update(raw.nbytes)
                if written != p.nbytes:
                    raise ConvertError(f"internal: {p.name} encoded to {written} bytes, planned {p.nbytes}")
                w.write_padding(fout, p.nbytes)
        w.close()
        os.replace(tmp, path)
    except OSError as e:
        _cleanup(w, tmp)
        if e.errno == errno.ENOSPC:
            raise ConvertError(f"disk full while writing {path}") from None
        raise ConvertError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        _cleanup(w, tmp)
        raise


def ggml_byte_shape(p: TensorPlan) -> tuple[int, ...]:
    """The numpy shape of the tensor's bytes (last dim in bytes), as GGUFWriter expects for raw data."""
    bs, ts = gguf.GGML_QUANT_SIZES[p.qtype]
    shape = ggml.ggml_dims(p.shape) if p.squeeze else p.shape
    return (*shape[:-1], shape[-1] // bs * ts)


def _cleanup(w: gguf.GGUFWriter, tmp: Path) -> None:
    try:
        if w.fout is not None:
            for f in w.fout:
                f.close()
    except Exception:
        pass
    tmp.unlink(missing_ok=True)
