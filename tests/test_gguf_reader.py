"""convert.gguf.reader.GGUFFile reads what gguf-py's GGUFReader reads, and refuses what is not GGUF."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader

from convert.gguf.reader import GGUFFile
from validate.gguf_diff import read_kv


@pytest.mark.parametrize("quant", ["Q4_K_M", "f16", "Q8_0"])
def test_same_as_gguf_reader(tiny_gguf, quant):
    dec, mm = tiny_gguf(quant)
    for path in [dec, *mm.values()]:
        ours, theirs = GGUFFile(path), GGUFReader(path)
        kv = read_kv(theirs)
        assert list(ours.kv) == list(kv) and ours.kv == kv
        assert all(type(a) is type(b) for a, b in zip(ours.kv.values(), kv.values()))
        assert len(ours.tensors) == len(theirs.tensors)
        for a, b in zip(ours.tensors, theirs.tensors):
            assert (a.name, a.tensor_type, a.n_elements, a.n_bytes, a.data_offset) == \
                   (b.name, b.tensor_type, b.n_elements, b.n_bytes, b.data_offset)
            assert np.array_equal(a.shape, b.shape)
            assert a.data.shape == b.data.shape and a.data.dtype == b.data.dtype and np.array_equal(a.data, b.data)


def test_header_longer_than_a_read(tiny_gguf, monkeypatch):
    """The header is read in steps; a step boundary inside a string or an array changes nothing."""
    import convert.gguf.reader as reader

    dec, _ = tiny_gguf("Q4_K_M")
    whole = GGUFFile(dec)
    real_open = open

    class Small:
        def __init__(self, f):
            self.f = f

        def read(self, n):
            return self.f.read(min(n, 997))

        def fileno(self):
            return self.f.fileno()

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    monkeypatch.setattr(reader, "open", lambda p, m: Small(real_open(p, m)), raising=False)
    small = GGUFFile(dec)
    assert small.kv == whole.kv and [t.data_offset for t in small.tensors] == [t.data_offset for t in whole.tensors]


def test_not_gguf(tmp_path, tiny_gguf):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(ValueError, match="bad magic"):
        GGUFFile(bad)
    dec, _ = tiny_gguf("Q4_K_M")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(dec.read_bytes()[:5000])
    with pytest.raises(ValueError, match="truncated"):
        GGUFFile(cut)
    short = tmp_path / "short.gguf"
    short.write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="too short"):
        GGUFFile(short)
