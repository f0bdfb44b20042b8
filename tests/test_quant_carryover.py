"""GGUF carry-over from quantized HF folders (convert/quantized_source.py): an AWQ folder exports its
folded full-precision model (exact: the original model's logits), other folders their dequantized
int4 weights (the fake-quant model's logits), and the CLI exports and validates such folders."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader

from convert.errors import ConvertError
from convert.gguf import transforms
from convert.gguf.export import export_gguf
from convert.gguf.plan import build_plan
from convert.hf_quant import write_quantized_checkpoint
from convert.quantized_source import AWQ_SCALES, QuantizedCheckpoint, open_checkpoint
from quantize.packing import UNPACKERS, pack
from quantize.qweight import Scheme

ROOT = Path(__file__).resolve().parents[1]
SEQLEN = 256
PACKED_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx", ".in_scale", ".out_scale")


@pytest.fixture(scope="module")
def calib(tiny_ckpt):
    from quantize.calibration import load_calibration

    return load_calibration("default", tokenizer=tiny_ckpt.tokenizer, n=16, seqlen=SEQLEN)[0]


@pytest.fixture(scope="module")
def awq(tiny_ckpt, calib, tmp_path_factory):
    """(AWQ result, folder with awq_scales.safetensors, as `python -m quantize awq` writes it)."""
    from quantize.sequential import quantize_model

    r = quantize_model(tiny_ckpt, "awq", Scheme(4, 128, sym=False), calib, seqlen=SEQLEN, quiet=True)
    extra = {AWQ_SCALES: r.scale_tensors()}
    out = write_quantized_checkpoint(tiny_ckpt, r.weights, tmp_path_factory.mktemp("awq") / "awq", "awq",
                                     dense_updates=r.dense_for_checkpoint(), extra_tensors=extra, quiet=True)
    return r, out


@pytest.fixture(scope="module")
def prompt(reference):
    """The fixed chat conversations through the chat template (as tests/test_gguf_llamacpp.py)."""
    from recipes import load as load_recipe

    tok = reference.tokenizer
    return [t for conv in load_recipe("chat_prompts")["conversations"]
            for t in reference.tokenize(tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True))]


@pytest.fixture(scope="module")
def ref_logits(reference, prompt):
    return reference.logits(prompt)


def _llama_logits(path, ids):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[llama]')")
    from runtimes.llamacpp import LlamaCppRuntime

    with LlamaCppRuntime(path, n_ctx=2048) as rt:
        return rt.logits(ids)


def _copy_with_source(folder: Path, dst: Path, source_path: str) -> Path:
    shutil.copytree(folder, dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["source"]["path"] = source_path
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def _dequantized(qw, fmt: str) -> np.ndarray:
    """What the folder holds for one result: packed (fp16 scales) and unpacked again."""
    return UNPACKERS[fmt](pack(qw, fmt), qw.scheme, qw.name).dequantize().numpy()


def test_awq_folded_export_is_the_original_model(tmp_path, awq, tiny_ckpt, reference, prompt, ref_logits):
    from runtimes.reference import ReferenceRuntime
    from validate.metrics import logits_agreement
    from validate.weights import check_tensors

    r, folder = awq
    q = open_checkpoint(folder)
    assert isinstance(q, QuantizedCheckpoint) and q.dense_kind == "awq-folded" and q.method == "awq"
    assert sorted(q.names()) == sorted(tiny_ckpt.names())  # packed tensors and scales replaced by .weight
    assert not [n for n in q.names() if n.endswith(PACKED_SUFFIXES)]
    m = next(iter(r.weights))
    assert q.info(f"{m}.weight").dtype == "F32" and q.info(f"{m}.weight").shape == r.weights[m].shape

    dec = export_gguf(q, tmp_path / "gguf", quant="f32", quiet=True)[0]
    # every decoder tensor is the folded float model (the quantizer's own dense updates) after the
    # exporter's transforms, bit for bit
    data = {t.name: np.asarray(t.data) for t in GGUFReader(dec).tensors}
    plans = build_plan(tiny_ckpt, "decoder", T.F32)
    folded = 0
    for p in plans:
        src = r.dense_updates[p.source].numpy() if p.source in r.dense_updates else tiny_ckpt.tensor(p.source)
        folded += p.source in r.dense_updates
        want = transforms.apply(p.transforms, src, tiny_ckpt.spec)
        assert np.array_equal(data[p.name].reshape(want.shape), want), p.name
    assert folded >= len(r.weights)
    assert {c.status for c in check_tensors(q, dec)} == {"pass"}  # the static checks read the view too

    # the fold is exact: llama.cpp computes the original fp32 model, as does the reference on the view
    got = logits_agreement(ref_logits, _llama_logits(dec, prompt))
    print("AWQ-folded F32 vs original", got)
    assert got["rel_err"] <= 1e-3 and got["top1_agreement"] >= 0.995, got
    view = ReferenceRuntime(q)
    try:
        same = logits_agreement(ref_logits, view.logits(prompt))
    finally:
        view.close()
    assert same["rel_err"] <= 1e-4, same


def test_awq_without_source_is_dequantized(tmp_path, awq, tiny_dir, tiny_alt_dir, capsys):
    r, folder = awq
    moved = _copy_with_source(folder, tmp_path / "moved", str(tmp_path / "no-such-source"))
    capsys.readouterr()
    q = QuantizedCheckpoint(moved)
    note = capsys.readouterr().out
    assert q.dense_kind == "dequantized" and note.count("\n") == 1
    assert "folded full-precision weights are unavailable" in note and "dequantized" in note
    for m, qw in list(r.weights.items())[:6]:
        assert np.array_equal(q.tensor(f"{m}.weight"), _dequantized(qw, "awq")), m
        assert np.array_equal(q.tensor(f"{m}.weight", slice(3, 9)), _dequantized(qw, "awq")[3:9])
    norm = next(n for n in r.dense_for_checkpoint() if n.endswith("input_layernorm.weight"))
    assert q.info(norm).dtype == "BF16"  # the folder's own (folded, stored) tensors

    # --awq-source (or source=) points to the source again; a wrong one is the user's error
    from convert.cli import build_parser, open_model

    args = build_parser().parse_args(["gguf", "--model", str(moved), "--awq-source", str(tiny_dir)])
    assert open_model(args).dense_kind == "awq-folded"
    with pytest.raises(ConvertError, match="not quantized"):
        open_checkpoint(tiny_dir, awq_source=tiny_dir)
    with pytest.raises(ConvertError, match="differ"):
        QuantizedCheckpoint(moved, source=tiny_alt_dir)
    with pytest.raises(ConvertError, match="no such folder"):
        QuantizedCheckpoint(moved, source=tmp_path / "nowhere")

    # scales that do not belong to the folder's folded tensors: refused, dequantized with the note
    from safetensors.torch import load_file, save_file

    bad = _copy_with_source(folder, tmp_path / "bad", str(tiny_dir))
    sc = load_file(str(bad / AWQ_SCALES))
    key = next(k for k in sc if k.endswith("mlp.gate_proj.in_scale"))
    sc[key] = sc[key] * 2
    sc[key.replace("gate_proj", "up_proj")] = sc[key].clone()
    save_file(sc, str(bad / AWQ_SCALES))
    capsys.readouterr()
    assert QuantizedCheckpoint(bad).dense_kind == "dequantized"
    assert "does not give the folder's" in capsys.readouterr().out


def test_gptq_export_is_the_fake_quant_model(tmp_path, tiny_ckpt, calib, reference, prompt, ref_logits):
    from quantize.sequential import quantize_model
    from runtimes.reference import ReferenceRuntime
    from validate.metrics import logits_agreement

    # 6 samples keep the token count above the widest in-features (512) at a third of the time
    r = quantize_model(tiny_ckpt, "gptq", Scheme(4, 128, sym=True), calib[:6], seqlen=SEQLEN, quiet=True)
    folder = write_quantized_checkpoint(tiny_ckpt, r.weights, tmp_path / "gptq", "gptq", quiet=True)
    q = open_checkpoint(folder)
    assert q.dense_kind == "dequantized" and q.method == "gptq"
    assert sorted(q.names()) == sorted(tiny_ckpt.names())
    m, qw = next(iter(r.weights.items()))
    assert np.array_equal(q.tensor(f"{m}.weight"), _dequantized(qw, "gptq"))
    with pytest.raises(ConvertError, match="not AWQ"):
        QuantizedCheckpoint(folder, source=tiny_ckpt.path)
    # the same (symmetric) result as compressed-tensors: dequantized likewise (bf16 scales)
    ct = open_checkpoint(write_quantized_checkpoint(tiny_ckpt, r.weights, tmp_path / "ct", "compressed-tensors", quiet=True))
    assert ct.dense_kind == "dequantized" and sorted(ct.names()) == sorted(tiny_ckpt.names())
    assert np.array_equal(ct.tensor(f"{m}.weight"), _dequantized(qw, "compressed-tensors"))

    dec = export_gguf(q, tmp_path / "gguf", quant="f32", quiet=True)[0]
    fq = ReferenceRuntime(q)  # the fake-quant reference: the dequantized view in transformers
    try:
        fq_logits = fq.logits(prompt)
    finally:
        fq.close()
    got = logits_agreement(fq_logits, _llama_logits(dec, prompt))
    vs_orig = logits_agreement(ref_logits, fq_logits)
    print("GPTQ dequantized F32 vs fake-quant reference", got, "\nfake-quant vs original", vs_orig)
    assert got["rel_err"] <= 1e-3 and got["top1_agreement"] >= 0.995, got
    assert vs_orig["rel_err"] > 1e-3  # really the quantized model, not the original


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "convert", "gguf", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)


def test_cli_exports_and_validates_awq_folder(tmp_path, awq):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[llama]')")
    _, folder = awq
    out = tmp_path / "q4"
    p = _cli("--model", str(folder), "--quant", "Q4_K_M", "--out", str(out), "--no-validate", "--quiet")
    assert p.returncode == 0, p.stderr[-2000:]
    assert (out / "MiniCPM-V-4.6-Q4_K_M.gguf").is_file() and (out / "manifest.json").is_file()
    assert "AWQ's folded full-precision weights" in p.stdout
    out2 = tmp_path / "q4v"
    p = _cli("--model", str(folder), "--quant", "Q4_K_M", "--out", str(out2), "--scenarios", "text-chat", "--quiet")
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-2000:])
    arts = json.loads((out2 / "manifest.json").read_text())["artifacts"]
    assert {a["validation"] for a in arts if a["file"].endswith(".gguf")} == {"pass"}
