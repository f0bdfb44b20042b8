"""Importance matrices in llama.cpp's format, and their collection through the PyTorch reference.

An importance matrix holds, for every weight matrix llama.cpp's `llama-imatrix` watches, the sum
over calibration tokens of the squared input activation of each input column (`in_sum2`, in the
GGUF tensor's column order) and the number of tokens summed (`counts`, one per matrix). k-quants
weight their rounding error by `in_sum2 / counts`.

File format (llama-cpp-python 0.3.36's vendor/llama.cpp; line numbers from that tree)
---------------------------------------------------------------------------------------
GGUF (`tools/imatrix/imatrix.cpp` `IMatrixCollector::save_imatrix`, lines 532-640):

* KV pairs, in this order: `general.type` = "imatrix" (string, l. 603), `imatrix.datasets`
  (array of string, l. 605), `imatrix.chunk_count` (u32, l. 607), `imatrix.chunk_size` (u32,
  l. 608; `n_ctx / n_parallel`). No `general.architecture`. Key names: `common/imatrix-loader.h`
  lines 8-10.
* Per entry, names sorted bytewise (l. 583), two F32 tensors (l. 612-630): `<name>.in_sum2`,
  ggml shape `[n_per_row, n_mat]` (raw sums), then `<name>.counts`, ggml shape `[1, n_mat]`
  (token counts stored as float). gguf writes `ggml_n_dims` dimensions, trailing 1s dropped
  (`ggml/src/gguf.cpp` l. 1546), so a dense matrix's entry is `in_sum2` [n_per_row] and
  `counts` [1]. Default alignment 32, data padded per tensor (`gguf.cpp` l. 1419, 1642, 1671).

Legacy `.dat` (`save_imatrix_legacy`, l. 426-530; read by `common/imatrix-loader.cpp`
`common_imatrix_load_legacy`, l. 10-80): int32 n_entries, then per entry int32 name length,
name bytes, int32 ncall, int32 nval, nval float32 values `(sum / count) * ncall`; then,
optionally, int32 chunk count and int32 length + dataset name.

What llama-quantize hands the quantizer (`tools/quantize/quantize.cpp` `load_imatrix`,
l. 183-261): for GGUF, `in_sum2 / counts` per matrix in float32, and all 1.0 for a matrix whose
count is 0; for legacy files, `values / ncall` (or the values as stored when ncall is 0). The
loader rounds counts with `lround` (`imatrix-loader.cpp` l. 166) and rejects a GGUF file without
all three `imatrix.*` keys (`quantize.cpp` l. 190-193). `llama-quant.cpp` uses an entry only if its
size equals `ne[0] * ne[2]` of the tensor (l. 1281) and refuses non-finite values (l. 1006).

Collection (see `collect_imatrix`)
----------------------------------
llama-imatrix collects the `src1` of every `MUL_MAT` whose weight name starts with `blk.`
(and `output.weight` only with `--process-output`), l. 246-251; token embeddings are a row
lookup, not a matmul. Here forward pre-hooks on the matching decoder `nn.Linear`s of
transformers' float32 reference see the same inputs, image tokens included: calibration chats
carry images through MiniCPM-V's processor, which llama-imatrix (text only) cannot do. Where the
converter reorders a weight's input columns (`ssm_out`: `v_cols`), the sums are permuted the
same way. Sums are accumulated in float64 and rounded to float32 once (llama.cpp accumulates in
float32); counts are tokens per matrix, as llama.cpp counts them (l. 406-409). llama.cpp skips
matmuls over fewer than 16 rows (l. 249); here every token counts.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from convert.errors import ConvertError

__all__ = [
    "ImatrixEntry", "ImatrixData", "write_imatrix_gguf", "read_imatrix", "importance",
    "IMATRIX_KEYS",
]

KEY_TYPE = "general.type"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
IMATRIX_KEYS = (KEY_TYPE, KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE)
SUFFIX_SUM2, SUFFIX_COUNTS = ".in_sum2", ".counts"
GGML_MAX_NAME = 64  # ggml tensor names hold 63 bytes (ggml.h)
ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT

_GGUF_MAGIC = b"GGUF"
_GGUF_VERSION = 3
_T_UINT32, _T_STRING, _T_ARRAY = 4, 8, 9  # gguf_type
_GGML_F32 = 0


# ---------------------------------------------------------------------------------------------
# data


@dataclass
class ImatrixEntry:
    """One weight's statistics.

    in_sum2: float32, shape (n_per_row,) for a dense matrix, (n_mat, n_per_row) for stacked ones
             (experts); legacy files give the stored `(sum / count) * ncall` values, flat.
    counts:  int64, shape (n_mat,): tokens summed per matrix (legacy: `[ncall]`).
    """

    in_sum2: np.ndarray
    counts: np.ndarray

    def __post_init__(self):
        self.in_sum2 = np.asarray(self.in_sum2, dtype=np.float32)
        self.counts = np.atleast_1d(np.asarray(self.counts, dtype=np.int64))

    @property
    def n_mat(self) -> int:
        return int(self.counts.size)

    @property
    def n_per_row(self) -> int:
        return int(self.in_sum2.size // max(self.n_mat, 1))


@dataclass
class ImatrixData:
    """An importance matrix: entries by GGUF tensor name plus the file's metadata.

    chunk_size: tokens per chunk (llama.cpp: n_ctx / n_parallel; here: the --seqlen limit);
    chunk_count: chunks processed (here: calibration samples). `legacy` marks data read from a
    `.dat` file (values already divided by counts; see `importance`).
    """

    entries: dict[str, ImatrixEntry] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def __getitem__(self, name: str) -> ImatrixEntry:
        return self.entries[name]

    def __len__(self) -> int:
        return len(self.entries)

    def names(self) -> list[str]:
        return sorted(self.entries, key=lambda s: s.encode())

    @property
    def n_tokens(self) -> int:
        """The largest count of any matrix (tokens seen, for dense models)."""
        return max((int(e.counts.max()) for e in self.entries.values() if e.counts.size), default=0)


def importance(data: ImatrixData, name: str) -> np.ndarray | None:
    """What llama-quantize passes to the quantizer for tensor `name` (flat float32), or None.

    GGUF: `in_sum2 / count` per matrix in float32, all ones where the count is 0
    (quantize.cpp l. 199-214). Legacy: `values / ncall`, or the values when ncall is 0 (l. 228-237).
    """
    e = data.entries.get(name)
    if e is None:
        return None
    sums = e.in_sum2.reshape(-1).astype(np.float32)
    if data.legacy:
        ncall = int(e.counts[0]) if e.counts.size else 0
        return (sums / np.float32(ncall)).astype(np.float32) if ncall > 0 else sums.copy()
    n_mat = e.n_mat
    out = np.empty_like(sums)
    ne0 = sums.size // n_mat
    for j in range(n_mat):
        c = np.float32(e.counts[j])
        seg = sums[j * ne0:(j + 1) * ne0]
        out[j * ne0:(j + 1) * ne0] = (seg / c) if c > 0 else np.float32(1)
    return out


# ---------------------------------------------------------------------------------------------
# writing


def _gguf_writer(data: ImatrixData):
    """A gguf GGUFWriter holding the file llama-imatrix's `save_imatrix` writes for these statistics."""
    import gguf

    if data.legacy:
        raise ConvertError("this importance matrix was read from a legacy .dat file (values already averaged); "
                           "it cannot be written as GGUF raw sums")
    for what, v in (("chunk_count", data.chunk_count), ("chunk_size", data.chunk_size)):
        if not 0 <= int(v) < 2**32:
            raise ConvertError(f"imatrix {what} {v} does not fit a u32")
    if not data.datasets:
        raise ConvertError("an importance matrix needs at least one dataset name (gguf-py cannot write an empty list)")
    w = gguf.GGUFWriter(None, "imatrix")
    w.kv_data[0].clear()  # llama-imatrix writes no general.architecture
    w.add_string(KEY_TYPE, "imatrix")
    w.add_array(KEY_DATASETS, [str(d) for d in data.datasets])
    w.add_uint32(KEY_CHUNK_COUNT, int(data.chunk_count))
    w.add_uint32(KEY_CHUNK_SIZE, int(data.chunk_size))
    for name in data.names():
        e = data.entries[name]
        n_mat = e.n_mat
        sums = np.ascontiguousarray(e.in_sum2, dtype=np.float32).reshape(-1)
        if n_mat == 0 or sums.size == 0:
            continue  # save_imatrix skips entries without values (l. 615)
        if sums.size % n_mat:
            raise ConvertError(f"imatrix entry {name}: {sums.size} values do not split into {n_mat} matrices")
        if not np.isfinite(sums).all():
            raise ConvertError(f"imatrix entry {name} has non-finite values (llama-quantize refuses them)")
        if (e.counts < 0).any():
            raise ConvertError(f"imatrix entry {name} has a negative count")
        for suffix in (SUFFIX_SUM2, SUFFIX_COUNTS):
            if len((name + suffix).encode()) >= GGML_MAX_NAME:
                raise ConvertError(f"imatrix tensor name {name + suffix!r} is longer than ggml's {GGML_MAX_NAME - 1} bytes")
        # numpy order [n_mat, n_per_row]; gguf drops trailing 1-dims as ggml_n_dims does
        w.add_tensor(name + SUFFIX_SUM2, sums.reshape(n_mat, -1) if n_mat > 1 else sums)
        w.add_tensor(name + SUFFIX_COUNTS, e.counts.astype(np.float32).reshape(n_mat, 1) if n_mat > 1 else
                     e.counts.astype(np.float32).reshape(1))
    return w


def imatrix_gguf_bytes(data: ImatrixData) -> bytes:
    """The file llama-imatrix's `save_imatrix` writes for these statistics, byte for byte."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return write_imatrix_gguf(Path(tmp) / "imatrix.gguf", data).read_bytes()


def write_imatrix_gguf(path: str | os.PathLike, data: ImatrixData) -> Path:
    """Write `data` as llama.cpp's GGUF imatrix (see the module docstring), atomically."""
    path = Path(path)
    w = _gguf_writer(data)
    if path.is_dir():
        raise ConvertError(f"--out {path}: is a folder (give a file name, e.g. {path / 'imatrix.gguf'})")
    tmp = path.with_name(f".{path.name}.partial")
    try:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=False)
        w.close()
        os.replace(tmp, path)
    except BaseException as e:
        try:
            if w.fout is not None:
                for f in w.fout:
                    f.close()
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise ConvertError(f"cannot write {path}: {e.strerror or e}") from None
        raise
    return path


# ---------------------------------------------------------------------------------------------
# reading


def read_imatrix(path: str | os.PathLike) -> ImatrixData:
    """Read a GGUF imatrix (llama-imatrix's default) or a legacy `.dat` file, as llama.cpp does."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path}: no such imatrix file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == _GGUF_MAGIC:
        return _read_gguf(path)
    return _read_legacy(path)


def _field_value(fld):
    from gguf import GGUFValueType

    if fld.types and fld.types[0] == GGUFValueType.ARRAY and not fld.data:
        return []
    return fld.contents()


def _read_gguf(path: Path) -> ImatrixData:
    from gguf import GGMLQuantizationType, GGUFReader

    try:
        r = GGUFReader(path, "r")
    except Exception as e:  # gguf-py raises ValueError and others on corrupt files
        raise ConvertError(f"{path}: not a readable GGUF file ({e.__class__.__name__}: {str(e)[:120]})") from None
    fields = r.fields
    if not all(k in fields for k in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE)):
        # quantize.cpp l. 190-193: llama-quantize refuses such a file
        raise ConvertError(f"{path}: missing imatrix metadata ({KEY_DATASETS}, {KEY_CHUNK_COUNT}, {KEY_CHUNK_SIZE}); "
                           "not an importance matrix")
    datasets = _field_value(fields[KEY_DATASETS])
    if not isinstance(datasets, list) or not all(isinstance(d, str) for d in datasets):
        datasets = []  # the loader ignores a datasets key of another type (imatrix-loader.cpp l. 105)
    data = ImatrixData(datasets=list(datasets), chunk_count=int(_field_value(fields[KEY_CHUNK_COUNT])),
                       chunk_size=int(_field_value(fields[KEY_CHUNK_SIZE])))
    pairs: dict[str, list] = {}
    for t in r.tensors:
        for i, suffix in enumerate((SUFFIX_SUM2, SUFFIX_COUNTS)):
            if t.name.endswith(suffix) and t.name != suffix:
                pairs.setdefault(t.name[: -len(suffix)], [None, None])[i] = t
    if not r.tensors:
        raise ConvertError(f"{path}: no data in the imatrix file")
    for name, (s, c) in pairs.items():
        if s is None or c is None:
            raise ConvertError(f"{path}: mismatched sums and counts for {name}")
        if s.tensor_type != GGMLQuantizationType.F32 or c.tensor_type != GGMLQuantizationType.F32:
            raise ConvertError(f"{path}: sums and counts for {name} must be F32")
        sums = np.array(s.data, dtype=np.float32).reshape(-1)
        counts = np.rint(np.array(c.data, dtype=np.float64).reshape(-1)).astype(np.int64)  # lround
        n_mat = counts.size
        if n_mat == 0 or sums.size % n_mat:
            raise ConvertError(f"{path}: {name} has {sums.size} sums for {n_mat} counts")
        data.entries[name] = ImatrixEntry(sums if n_mat == 1 else sums.reshape(n_mat, -1), counts)
    return data


def _read_legacy(path: Path) -> ImatrixData:
    raw = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        n = struct.calcsize(fmt)
        if pos + n > len(raw):
            raise ConvertError(f"{path}: neither GGUF nor a complete legacy imatrix (.dat) file")
        v = struct.unpack_from(fmt, raw, pos)
        pos += n
        return v

    (n_entries,) = take("<i")
    if n_entries < 1:
        raise ConvertError(f"{path}: no data in the imatrix file")
    data = ImatrixData(legacy=True)
    for _ in range(n_entries):
        (ln,) = take("<i")
        if ln < 0 or pos + ln > len(raw):
            raise ConvertError(f"{path}: neither GGUF nor a complete legacy imatrix (.dat) file")
        name = raw[pos:pos + ln].split(b"\0", 1)[0].decode("utf-8", "replace")
        pos += ln
        ncall, nval = take("<ii")
        if nval < 1 or pos + 4 * nval > len(raw):
            raise ConvertError(f"{path}: failed reading the values of {name}")
        vals = np.frombuffer(raw, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        data.entries[name] = ImatrixEntry(vals, [ncall])
    if pos + 4 <= len(raw):  # the trailing chunk count and dataset name are optional
        (data.chunk_count,) = take("<i")
        if pos + 4 <= len(raw):
            (ln,) = take("<i")
            if 0 < ln <= len(raw) - pos:
                data.datasets.append(raw[pos:pos + ln].split(b"\0", 1)[0].decode("utf-8", "replace"))
    return data


