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


def source_tensor(ckpt: Checkpoint, p: TensorPlan, allow_nonfinite: bool = False) -> np.ndarray:
    """The float32 data of one planned tensor after its transforms, checked for NaN/Inf."""
    a = ckpt.tensor(p.source)
    if not allow_nonfinite and not np.isfinite(a).all():
        bad = int(a.size - np.isfinite(a).sum())
        raise ConvertError(f"tensor {p.source} has {bad} NaN/Inf value(s); refusing (use --allow-nonfinite to write anyway)")
    return transforms.apply(p.transforms, a, ckpt.spec)


def write_gguf(path: Path, arch: str, plans: list[TensorPlan], ckpt: Checkpoint,
               add_metadata: Callable[[gguf.GGUFWriter], None], *, quiet: bool = False,
               allow_nonfinite: bool = False, encode: Callable = ggml.encode, desc: str = "") -> None:
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
        bar = tqdm(plans, desc=desc or path.name, unit="tensor", disable=quiet, leave=False)
        for p in bar:
            data = encode(source_tensor(ckpt, p, allow_nonfinite), p.qtype)
            raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
            if raw.nbytes != p.nbytes:
                raise ConvertError(f"internal: {p.name} encoded to {raw.nbytes} bytes, planned {p.nbytes}")
            w.write_tensor_data(raw)
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
    return (*p.shape[:-1], p.shape[-1] // bs * ts)


def _cleanup(w: gguf.GGUFWriter, tmp: Path) -> None:
    try:
        if w.fout is not None:
            for f in w.fout:
                f.close()
    except Exception:
        pass
    tmp.unlink(missing_ok=True)
