"""Checkpoint: a local HF folder (or a hub id already in the local cache), read lazily.

Tensors come from safetensors through mmap, one at a time, single-file or sharded
(`model.safetensors.index.json`). Nothing is ever downloaded.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import threading
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import ConvertError
from .spec import ModelSpec

# safetensors dtype -> (numpy dtype, itemsize); BF16 is read as raw uint16 and widened on demand.
_MAP_LOCK = threading.Lock()
_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset in the file
    nbytes: int


def resolve_model_path(src: str | os.PathLike) -> Path:
    """A folder on disk, or a hub id found in the local HF cache (never downloaded)."""
    p = Path(src).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ConvertError(f"--model {src}: not a folder")
        return p
    s = str(src)
    if s.count("/") == 1 and not s.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(s, local_files_only=True))
        except Exception:
            raise ConvertError(
                f"--model {src}: no such folder, and no copy of hub id {s!r} in the local Hugging Face cache "
                "(this tool never downloads; fetch it first, e.g. `hf download {s}`)".replace("{s}", s)
            ) from None
    raise ConvertError(f"--model {src}: no such folder")


def _read_header(path: Path) -> list[TensorInfo]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConvertError(f"{path.name}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 * 2**20:
                raise ConvertError(f"{path.name}: corrupt safetensors header (length {n}, file {size} bytes)")
            meta = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        if isinstance(e, ConvertError):
            raise
        raise ConvertError(f"{path.name}: corrupt safetensors header ({e.__class__.__name__})") from None
    base = 8 + n
    out = []
    for name, m in meta.items():
        if name == "__metadata__":
            continue
        try:
            dt, shape, (a, b) = m["dtype"], tuple(int(x) for x in m["shape"]), m["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ConvertError(f"{path.name}: corrupt safetensors entry for {name}") from None
        if dt not in _DTYPES:
            raise ConvertError(f"{path.name}: tensor {name} has unsupported dtype {dt}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[dt]).itemsize
        if b - a != nbytes or base + b > size:
            raise ConvertError(
                f"{path.name}: truncated or corrupt safetensors file (tensor {name} needs bytes "
                f"{base + a}..{base + b}, file has {size})"
            )
        out.append(TensorInfo(name, dt, shape, path, base + a, nbytes))
    return out


class Checkpoint:
    """A MiniCPM-V 4.6 checkpoint folder: config, spec, lazy tensors, tokenizer and processor."""

    def __init__(self, src: str | os.PathLike):
        self.path = resolve_model_path(src)
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise ConvertError(f"{self.path}: no config.json (not a Hugging Face checkpoint folder)")
        try:
            self.config = json.loads(cfg.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConvertError(f"{cfg}: unreadable config.json ({e})") from None
        self.spec = ModelSpec.from_config(self.config)
        self._infos = self._index()
        self._maps: dict[Path, mmap.mmap] = {}

    @property
    def name(self) -> str:
        return self.path.resolve().name

    def _index(self) -> dict[str, TensorInfo]:
        idx = self.path / "model.safetensors.index.json"
        if idx.is_file():
            try:
                wm = json.loads(idx.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError):
                raise ConvertError(f"{idx.name}: corrupt index (no weight_map)") from None
            files = sorted(set(wm.values()))
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
            wm = None
        if not files:
            raise ConvertError(f"{self.path}: no *.safetensors weights (only safetensors checkpoints are read)")
        infos: dict[str, TensorInfo] = {}
        for fn in files:
            p = self.path / fn
            if not p.is_file():
                raise ConvertError(f"{self.path}: shard {fn} listed in the index is missing")
            for ti in _read_header(p):
                if ti.name in infos:
                    raise ConvertError(f"{self.path}: tensor {ti.name} appears in two shards")
                infos[ti.name] = ti
        if wm is not None:
            missing = sorted(set(wm) - set(infos))
            if missing:
                raise ConvertError(f"{idx.name}: {len(missing)} tensor(s) listed but absent, e.g. {missing[0]}")
        return infos

    # -- tensors -----------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def _map(self, file: Path) -> mmap.mmap:
        mm = self._maps.get(file)
        if mm is None:
            with _MAP_LOCK:  # the GGUF writer reads from several threads
                mm = self._maps.get(file)
                if mm is None:
                    with open(file, "rb") as f:
                        mm = self._maps[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return mm

    def raw(self, name: str) -> np.ndarray:
        """A read-only view of the stored data on the file's mmap (bf16 as uint16)."""
        ti = self._infos[name]
        dt = np.dtype(_DTYPES[ti.dtype])
        a = np.frombuffer(self._map(ti.file), dtype=dt, count=ti.nbytes // dt.itemsize, offset=ti.offset)
        return a.reshape(ti.shape)

    def tensor(self, name: str, rows: slice | None = None) -> np.ndarray:
        """The tensor (or a range of its rows) as a fresh float32 array; the pages read are released."""
        ti = self._infos[name]
        a = self.raw(name)
        if rows is not None:
            a = a[rows]
        out = (a.astype(np.uint32) << 16).view(np.float32) if ti.dtype == "BF16" else a.astype(np.float32)
        self.release(name, rows)
        return out

    def rows_are_cheap(self, name: str) -> bool:
        """Whether reading a range of this tensor's rows costs only those rows (stored tensors: yes;
        subclasses that compute a tensor whole say no, and writers then read it in one piece)."""
        return True

    def release(self, name: str, rows: slice | None = None) -> None:
        """Drop this tensor's file pages (or those of a range of its rows) from the process (they
        stay in the page cache), so peak memory stays near the data in flight rather than the
        checkpoint's size. Only whole pages inside the range are dropped, so a neighbour being read
        by another thread keeps its pages."""
        ti = self._infos[name]
        mm = self._maps.get(ti.file)
        if mm is None or not hasattr(mm, "madvise"):
            return
        lo, hi = ti.offset, ti.offset + ti.nbytes
        if rows is not None and ti.shape:
            row = ti.nbytes // max(ti.shape[0], 1)
            r0, r1, _ = rows.indices(ti.shape[0])
            lo, hi = ti.offset + r0 * row, ti.offset + r1 * row
            lo += -lo % mmap.PAGESIZE  # round inwards
        else:
            lo -= lo % mmap.PAGESIZE
        hi -= hi % mmap.PAGESIZE if rows is not None else 0
        if hi <= lo:
            return
        try:
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
        except (OSError, ValueError):
            pass

    def copy_bytes(self, name: str, out, chunk: int = 64 << 20) -> None:
        """Write the tensor's stored bytes to the binary file `out`, read from the file in slices
        (not mapped, so the pages never count in this process)."""
        ti = self._infos[name]
        with open(ti.file, "rb") as src:
            src.seek(ti.offset)
            left = ti.nbytes
            while left:
                buf = src.read(min(left, chunk))
                if not buf:
                    raise ConvertError(f"{ti.file}: truncated while reading {name}")
                out.write(buf)
                left -= len(buf)

    def iter_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        for n in self._infos:
            yield n, self.tensor(n)

    # -- tokenizer / processor ---------------------------------------------------------------
    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            # some tokenizer_config.json values only break on use (a non-numeric model_max_length)
            tok.decode(tok.encode("MiniCPM-V 4.6 <|im_end|>"))
            return tok
        except Exception as e:  # transformers raises many types here
            raise ConvertError(f"{self.path}: cannot load the tokenizer ({e.__class__.__name__}: {str(e)[:200]})") from None

    @cached_property
    def processor(self):
        from transformers import AutoProcessor

        try:
            return AutoProcessor.from_pretrained(self.path, local_files_only=True)
        except Exception as e:
            raise ConvertError(f"{self.path}: cannot load the processor ({e.__class__.__name__}: {str(e)[:200]})") from None

    def json_file(self, name: str) -> dict:
        p = self.path / name
        if not p.is_file():
            return {}
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except ValueError:
            raise ConvertError(f"{p}: not valid JSON") from None

    @cached_property
    def preprocessor_config(self) -> dict:
        """Image preprocessing settings, from whichever processor file the folder has."""
        pp = self.json_file("preprocessor_config.json")
        proc = self.json_file("processor_config.json")
        if isinstance(proc.get("image_processor"), dict):
            pp = {**proc["image_processor"], **pp}
        return pp
