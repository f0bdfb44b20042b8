"""Streaming GGUF writer: header and tensor infos first, then the tensors in order.

The tensors are cut into work units (row ranges of a few MiB, or a whole tensor that has
transforms); a pool of threads reads, transforms, checks and encodes units while the calling thread
writes the finished ones in file order, so reading, quantizing and writing overlap and ggml's C
quantizer (which runs outside the GIL) keeps every core busy. At most a few units per thread are in
flight, so memory stays near threads x unit size whatever the model's size. The bytes do not depend
on the thread count or the unit size (ggml blocks are independent).

The file is written under a temporary name in the target folder and renamed when complete,
so a failure (a bad tensor, a full disk, an interrupt) leaves nothing behind.
"""

from __future__ import annotations

import collections
import errno
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
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
# The writer's work unit: small enough that a few per thread stay cheap and the last tensor's
# units spread over the threads, large enough that per-call overheads vanish.
UNIT_BYTES = 8 << 20
# Units in flight per thread (queued or done but not yet written).
UNITS_PER_THREAD = 3


@dataclass
class WriteProfile:
    """Seconds per phase (summed over threads) and per ggml type, for bench/gguf_speed.py."""
    seconds: dict = field(default_factory=lambda: collections.defaultdict(float))
    by_type: dict = field(default_factory=lambda: collections.defaultdict(lambda: collections.defaultdict(float)))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, phase: str, qtype: str, dt: float, nbytes: int = 0) -> None:
        with self.lock:
            self._add(phase, qtype, dt, nbytes)

    def _add(self, phase: str, qtype: str, dt: float, nbytes: int) -> None:
        self.seconds[phase] += dt
        self.by_type[qtype][phase] += dt
        if nbytes:
            self.by_type[qtype][f"{phase}_bytes"] += nbytes

    def as_dict(self) -> dict:
        return {"seconds": dict(self.seconds), "by_type": {k: dict(v) for k, v in self.by_type.items()}}


def source_chunks(ckpt: Checkpoint, p: TensorPlan, allow_nonfinite: bool = False):
    """The float32 data of one planned tensor after its transforms, in row chunks, checked for NaN/Inf."""
    row_bytes = 4 * int(np.prod(p.shape[1:], dtype=np.int64)) if len(p.shape) > 1 else 4 * p.n_params
    step = max(1, CHUNK_BYTES // max(row_bytes, 1))
    if p.transforms or len(p.shape) < 2 or p.shape[0] <= step or not ckpt.rows_are_cheap(p.source):
        yield _checked(p, transforms.apply(p.transforms, ckpt.tensor(p.source), ckpt.spec), allow_nonfinite)
        return
    for r in range(0, p.shape[0], step):
        yield _checked(p, ckpt.tensor(p.source, slice(r, r + step)), allow_nonfinite)


def _units(ckpt: Checkpoint, p: TensorPlan) -> list[slice | None]:
    """Row ranges a plan is read and encoded in (None: the whole tensor, transforms applied)."""
    if p.transforms or len(p.shape) < 2 or not ckpt.rows_are_cheap(p.source):
        return [None]
    row_bytes = 4 * int(np.prod(p.shape[1:], dtype=np.int64))
    step = max(1, UNIT_BYTES // max(row_bytes, 1))
    if p.shape[0] <= step:
        return [None]
    return [slice(r, min(r + step, p.shape[0])) for r in range(0, p.shape[0], step)]


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
               allow_nonfinite: bool = False, desc: str = "",
               imatrix_for: Callable[[TensorPlan], np.ndarray | None] = lambda p: None,
               quantizer: str | None = None, threads: int | None = None,
               profile: WriteProfile | None = None) -> None:
    """Write `plans` from `ckpt` to `path` (atomically). quantizer: "kquants", "ggml" or None/"auto"
    (ggml.resolve_quantizer); threads: worker threads (default ggml.default_threads)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    quantizer = ggml.resolve_quantizer(quantizer)
    nt = max(1, threads or ggml.default_threads(quantizer))
    prof = profile

    def timed(phase, qtype, fn, *a, nbytes=0):
        t0 = time.perf_counter()
        r = fn(*a)
        if prof is not None:
            prof.add(phase, qtype, time.perf_counter() - t0, nbytes)
        return r

    def work(p: TensorPlan, rows: slice | None, imat) -> np.ndarray:
        tn = p.qtype.name
        a = timed("read", tn, ckpt.tensor, p.source, rows)
        if p.transforms:
            a = timed("transform", tn, transforms.apply, p.transforms, a, ckpt.spec)
        a = timed("check", tn, _checked, p, a, allow_nonfinite)
        raw = timed("encode", tn, lambda: np.ascontiguousarray(
            ggml.encode(a, p.qtype, imat, quantizer=quantizer, threads=1)).view(np.uint8).reshape(-1),
            nbytes=a.nbytes)
        return raw

    w = gguf.GGUFWriter(None, arch)
    for p in plans:
        w.add_tensor_info(p.name, ggml_byte_shape(p), np.dtype(np.uint8), p.nbytes, raw_dtype=p.qtype)
    add_metadata(w)
    ex = ThreadPoolExecutor(max_workers=nt, thread_name_prefix="gguf-encode")
    pending: collections.deque = collections.deque()
    try:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        fout = w.fout[0]
        total = sum(p.nbytes for p in plans)
        jobs = ((i, p, rows, last) for i, p in enumerate(plans)
                for rows, last in _with_last(_units(ckpt, p)))
        written = [0] * len(plans)
        with tqdm(total=total, desc=desc or path.name, unit="B", unit_scale=True, disable=quiet, leave=False) as bar:
            def drain_one():
                i, p, last, fut = pending.popleft()
                raw = fut.result()
                if written[i] == 0:
                    w.write_padding(fout, fout.tell())  # align the tensor's start, as GGUFWriter does
                timed("write", p.qtype.name, fout.write, raw.data)
                written[i] += raw.nbytes
                bar.update(raw.nbytes)
                if last:
                    if written[i] != p.nbytes:
                        raise ConvertError(f"internal: {p.name} encoded to {written[i]} bytes, planned {p.nbytes}")
                    w.write_padding(fout, p.nbytes)
                    ckpt.release(p.source)

            imats: dict[int, np.ndarray | None] = {}
            for i, p, rows, last in jobs:
                if i not in imats:
                    imats = {i: imatrix_for(p)}
                pending.append((i, p, last, ex.submit(work, p, rows, imats[i])))
                while len(pending) >= nt * UNITS_PER_THREAD:
                    drain_one()
            while pending:
                drain_one()
        w.close()
        os.replace(tmp, path)
    except OSError as e:
        _abandon(ex, pending)
        _cleanup(w, tmp)
        if e.errno == errno.ENOSPC:
            raise ConvertError(f"disk full while writing {path}") from None
        raise ConvertError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        _abandon(ex, pending)
        _cleanup(w, tmp)
        raise
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def _with_last(units: list):
    for k, u in enumerate(units):
        yield u, k == len(units) - 1


def _abandon(ex: ThreadPoolExecutor, pending: collections.deque) -> None:
    """Cancel what has not started, so an error or an interrupt stops quickly."""
    for *_, fut in pending:
        fut.cancel()
    pending.clear()
    ex.shutdown(wait=True, cancel_futures=True)


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
