"""The pipelined GGUF writer: the bytes do not depend on the quantizer, the thread count or the work
unit size; the manifest says which quantizer ran; a failing unit leaves nothing behind."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from convert.checkpoint import Checkpoint
from convert.errors import ConvertError
from convert.gguf import writer
from convert.gguf.export import export_gguf
from quantize import ggml, ggml_ref

pytestmark = pytest.mark.skipif(not ggml_ref.available(), reason="llama-cpp-python's libggml-base is not installed")


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.gguf"))}


def test_bytes_independent_of_quantizer_threads_and_units(tiny_alt_dir, tmp_path, monkeypatch):
    ckpt = Checkpoint(tiny_alt_dir)
    export_gguf(ckpt, tmp_path / "numpy", quant="Q4_K_M", mode="both", quiet=True, quantizer="kquants", threads=1)
    # units of a few rows: every tensor is cut into many, written by 3 threads out of order
    monkeypatch.setattr(writer, "UNIT_BYTES", 4096)
    prof = writer.WriteProfile()
    export_gguf(ckpt, tmp_path / "ggml", quant="Q4_K_M", mode="both", quiet=True, quantizer="ggml", threads=3,
                profile=prof)
    a, b = _digests(tmp_path / "numpy"), _digests(tmp_path / "ggml")
    assert len(a) == 3 and a == b
    man = {e["file"]: e for e in json.loads((tmp_path / "ggml" / "manifest.json").read_text())["artifacts"]}
    assert man["MiniCPM-V-4.6-Q4_K_M.gguf"]["quantizer"]["name"] == "ggml"
    assert "quantizer" not in man["mmproj-MiniCPM-V-4.6-F16-16x.gguf"]  # all floats: no block quantizer ran
    numpy_man = json.loads((tmp_path / "numpy" / "manifest.json").read_text())["artifacts"]
    assert numpy_man[0]["quantizer"]["name"] == "kquants"
    # the profile saw every phase and every type written (tiny-alt's widths take Q5_0/Q8_0 fallbacks)
    from convert.gguf.export import plan_outputs

    types = {p.qtype.name for o in plan_outputs(ckpt, tmp_path / "x", "Q4_K_M", "both") for p in o.plans}
    assert {"read", "check", "encode", "write"} <= set(prof.seconds)
    assert set(prof.as_dict()["by_type"]) == types and any(t.startswith("Q") for t in types)


def test_imatrix_path_same_bytes(tiny_dir, tmp_path, monkeypatch):
    """The importance-weighted quantizers through the writer: ggml's and numpy's bytes agree."""
    ckpt = Checkpoint(tiny_dir)
    rng = np.random.default_rng(3)
    imats = {}

    def imatrix_for(p):
        if p.qtype.name.startswith("Q") and len(p.shape) == 2:
            return imats.setdefault(p.name, np.exp(rng.standard_normal(p.shape[-1])).astype(np.float32))
        return None

    from convert.gguf.export import plan_outputs

    plans = plan_outputs(ckpt, tmp_path, "Q4_K_M", "16x")[0].plans
    monkeypatch.setattr(writer, "UNIT_BYTES", 8192)
    for q, nt in (("kquants", 1), ("ggml", 2)):
        writer.write_gguf(tmp_path / f"{q}.gguf", "qwen35", plans, ckpt, lambda w: None, quiet=True,
                          imatrix_for=imatrix_for, quantizer=q, threads=nt)
    assert (tmp_path / "kquants.gguf").read_bytes() == (tmp_path / "ggml.gguf").read_bytes()


def test_failing_unit_leaves_nothing(tiny_dir, tmp_path, monkeypatch):
    ckpt = Checkpoint(tiny_dir)
    calls = {"n": 0}
    real = ggml.encode

    def flaky(a, qtype, imat=None, **kw):
        calls["n"] += 1
        if calls["n"] == 7:
            raise ConvertError("planted failure in unit 7")
        return real(a, qtype, imat, **kw)

    monkeypatch.setattr(writer.ggml, "encode", flaky)
    with pytest.raises(ConvertError, match="planted failure"):
        export_gguf(ckpt, tmp_path / "out", quant="Q4_K_M", quiet=True, threads=2)
    assert not (tmp_path / "out").exists()


def test_unknown_quantizer_is_an_error(tiny_dir, tmp_path, monkeypatch):
    with pytest.raises(ConvertError, match="unknown quantizer"):
        export_gguf(Checkpoint(tiny_dir), tmp_path / "o", quant="Q8_0", quantizer="fast")
    from quantize import kquants_jit

    assert ggml.resolve_quantizer("auto") == ("kquants" if kquants_jit.available() else "ggml")
    monkeypatch.setattr(ggml_ref, "available", lambda: False)
    assert ggml.resolve_quantizer("auto") == "kquants"
    with pytest.raises(RuntimeError, match="cannot load"):
        ggml.resolve_quantizer("ggml")
