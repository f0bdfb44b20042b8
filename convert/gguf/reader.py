"""A GGUF file's key-value metadata and tensor table, read fast.

gguf-py's GGUFReader builds a numpy view for every element of every array field: opening a
decoder with a 248k-token vocabulary (tokens and merges) takes 8 s, and the validation harness
opens each file several times. This reads the same header (GGUF v2/v3, little-endian) with
`struct` in a fraction of a second; tests/test_gguf_reader.py checks it against GGUFReader
field by field and tensor by tensor. Tensor data are numpy views of one read-only memmap, in
GGUFReader's layout (float types in numpy order, block types as uint8 rows of bytes).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

_MAGIC = 0x46554747  # "GGUF" read as a little-endian uint32
_SCALAR = {GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
           GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
           GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
           GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d"}
_NUMPY = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
          GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
          GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
          GGMLQuantizationType.I64: np.int64}


@dataclass
class GGUFTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: np.ndarray  # ggml order (innermost first), as GGUFReader's
    n_elements: int
    n_bytes: int
    data_offset: int
    _map: "_Map"

    @property
    def data(self) -> np.ndarray:
        dims = tuple(int(d) for d in reversed(self.shape.tolist()))
        mm = self._map.get()
        if self.tensor_type in _NUMPY:
            dt = np.dtype(_NUMPY[self.tensor_type])
            return mm[self.data_offset:self.data_offset + self.n_bytes].view(dt).reshape(dims)
        block, size = GGML_QUANT_SIZES[self.tensor_type]
        return mm[self.data_offset:self.data_offset + self.n_bytes].reshape(*dims[:-1], dims[-1] // block * size)


class _Map:
    """The file's read-only memmap, opened on first use. Tensors point here, not at their GGUFFile:
    a reference cycle would keep the map, and every page read through it, alive until the cyclic
    garbage collector ran (a gigabyte after checking a full-size decoder)."""

    def __init__(self, path: Path):
        self.path, self._mm = path, None

    def get(self) -> np.memmap:
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._mm


class GGUFFile:
    """kv: key -> value (strings decoded, arrays as tuples, numbers as Python numbers; the same
    values as validate.gguf_diff.read_kv of a GGUFReader); tensors in file order."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._map = _Map(self.path)
        with open(self.path, "rb") as f:
            self.file_size = os.fstat(f.fileno()).st_size
            buf = f.read(1 << 20)
            self.version, n_tensors, n_kv = 0, 0, 0
            try:
                magic, self.version, n_tensors, n_kv = struct.unpack_from("<IIQQ", buf, 0)
            except struct.error:
                raise ValueError("too short for a GGUF header") from None
            if magic != _MAGIC:
                raise ValueError("not a GGUF file (bad magic)")
            if self.version not in (2, 3):
                raise ValueError(f"GGUF version {self.version} is not supported")
            if (n_kv + n_tensors) * 12 > self.file_size:  # each entry takes at least 12 bytes
                raise ValueError(f"truncated or damaged GGUF header ({n_kv} keys and {n_tensors} tensors "
                                 f"in {self.file_size} bytes)")
            self._f, self._buf, self._off, self._pos = f, buf, 24, 0
            self.kv: dict[str, object] = {}
            for _ in range(n_kv):
                key = self._str()
                vt = GGUFValueType(self._unpack("<I")[0])
                if vt == GGUFValueType.ARRAY:
                    it = GGUFValueType(self._unpack("<I")[0])
                    n = self._unpack("<Q")[0]
                    self.kv[key] = self._array(it, n)
                else:
                    self.kv[key] = self._value(vt)
            infos = []
            for _ in range(n_tensors):
                name = self._str()
                nd = self._unpack("<I")[0]
                dims = np.array(self._unpack(f"<{nd}Q"), dtype=np.uint64)
                qt = GGMLQuantizationType(self._unpack("<I")[0])
                infos.append((name, dims, qt, self._unpack("<Q")[0]))
            align = int(self.kv.get("general.alignment", 32))
            end = self._pos + self._off
            start = -(-end // align) * align
            del self._f, self._buf
        self.tensors: list[GGUFTensor] = []
        seen = set()
        for name, dims, qt, off in infos:
            if name in seen:
                raise ValueError(f"duplicated tensor {name}")
            seen.add(name)
            n = int(np.prod([int(d) for d in dims])) if len(dims) else 1
            block, size = GGML_QUANT_SIZES[qt]
            if n % block or start + int(off) + n * size // block > self.file_size:
                raise ValueError(f"truncated or damaged GGUF: tensor {name}'s data ({n} values of {qt.name}) does not "
                                 f"fit in the file's {self.file_size} bytes")
            self.tensors.append(GGUFTensor(name, qt, dims, n, n * size // block, start + int(off), self._map))

    # -- header parsing --------------------------------------------------------------------------

    def _need(self, n: int) -> None:
        """Make sure `n` bytes from the read offset are in the buffer (the header is read in 1 MiB steps)."""
        if self._pos + self._off + n > self.file_size:
            raise ValueError("truncated GGUF header")
        if self._off + n > len(self._buf):
            self._buf = self._buf[self._off:]
            self._pos += self._off  # file offset of the buffer's first byte
            self._off = 0
            while len(self._buf) < n:
                more = self._f.read(max(n - len(self._buf), 1 << 20))
                if not more:
                    raise ValueError("truncated GGUF header")
                self._buf += more

    def _unpack(self, fmt: str) -> tuple:
        n = struct.calcsize(fmt)
        self._need(n)
        v = struct.unpack_from(fmt, self._buf, self._off)
        self._off += n
        return v

    def _str(self) -> str:
        n = self._unpack("<Q")[0]
        self._need(n)
        s = self._buf[self._off:self._off + n].decode("utf-8", "surrogateescape")
        self._off += n
        return s

    def _value(self, vt: GGUFValueType):
        if vt == GGUFValueType.STRING:
            return self._str()
        v = self._unpack(_SCALAR[vt])[0]
        return v

    def _array(self, it: GGUFValueType, n: int) -> tuple:
        if it == GGUFValueType.STRING:
            return tuple(self._str() for _ in range(n))
        if it == GGUFValueType.ARRAY:
            raise ValueError("nested arrays are not supported")
        fmt = _SCALAR[it]
        size = struct.calcsize(fmt) * n
        self._need(size)
        a = np.frombuffer(self._buf, dtype=np.dtype(fmt), count=n, offset=self._off)
        self._off += size
        return tuple(a.tolist())
