"""GGUF export: structure, determinism, bad input and failure handling."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGUFReader
import torch
from safetensors.torch import load_file, save_file

from convert import Checkpoint, ConvertError
from convert.gguf import writer
from convert.gguf.export import export_gguf
from convert.manifest import sha256_file
from validate.gguf_diff import read_kv


def _kv(path):
    return read_kv(GGUFReader(path))


def test_decoder_metadata_and_tensors(tiny_gguf, tiny_ckpt):
    dec, mm = tiny_gguf("f16")
    kv = _kv(dec)
    t = tiny_ckpt.spec.text
    assert kv["general.architecture"] == "qwen35" and kv["tokenizer.ggml.pre"] == "qwen35"
    assert kv["qwen35.block_count"] == t.num_layers
    assert list(kv["qwen35.attention.recurrent_layers"]) == [x == "linear_attention" for x in t.layer_types]
    assert kv["qwen35.rope.dimension_count"] == t.rope_dim
    assert list(kv["qwen35.rope.dimension_sections"]) == [11, 11, 10, 0]
    assert kv["qwen35.ssm.group_count"] == t.linear_num_key_heads
    assert kv["qwen35.ssm.time_step_rank"] == t.linear_num_value_heads
    assert "qwen35.nextn_predict_layers" not in kv
    assert len(kv["tokenizer.ggml.tokens"]) == t.vocab_size
    assert kv["tokenizer.ggml.eos_token_id"] == t.eos_token_id
    names = {x.name: x for x in GGUFReader(dec).tensors}
    assert "output.weight" not in names  # tied embeddings
    assert names["blk.0.ssm_a"].tensor_type.name == "F32"
    assert names["blk.0.ssm_conv1d.weight"].tensor_type.name == "F32"
    assert names["blk.0.ffn_up.weight"].tensor_type.name == "F16"
    # transforms: +1 on offset norms, not on ssm_norm; ssm_a = -exp(A_log)
    hf = "model.language_model.layers.0."
    np.testing.assert_allclose(names["blk.0.attn_norm.weight"].data, tiny_ckpt.tensor(hf + "input_layernorm.weight") + 1)
    np.testing.assert_array_equal(names["blk.0.ssm_norm.weight"].data, tiny_ckpt.tensor(hf + "linear_attn.norm.weight"))
    assert (names["blk.0.ssm_a"].data < 0).all()


def test_mmproj_metadata(tiny_gguf, tiny_ckpt):
    _, mm = tiny_gguf("f16")
    k16, k4 = _kv(mm["16x"]), _kv(mm["4x"])
    assert k16["clip.projector_type"] == "minicpmv4_6"
    assert k16["clip.vision.projector.scale_factor"] == 4 and k4["clip.vision.projector.scale_factor"] == 2
    assert k16["clip.vision.image_size"] == 448
    assert list(k16["clip.vision.wa_layer_indexes"]) == [tiny_ckpt.spec.vision.insert_layer_id]
    n16 = {t.name for t in GGUFReader(mm["16x"]).tensors}
    n4 = {t.name for t in GGUFReader(mm["4x"]).tensors}
    assert any(n.startswith("v.vit_merger.") for n in n16)
    assert not any(n.startswith("v.vit_merger.") for n in n4) and n4 < n16


def test_deterministic(tmp_path, tiny_ckpt):
    a = export_gguf(tiny_ckpt, tmp_path / "a", quant="q8_0", quiet=True)
    b = export_gguf(tiny_ckpt, tmp_path / "b", quant="q8_0", quiet=True)
    for x, y in zip(a, b):
        assert sha256_file(x) == sha256_file(y)
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    for art in m["artifacts"]:
        p = tmp_path / "a" / art["file"]
        assert art["sha256"] == sha256_file(p) and art["size"] == p.stat().st_size
    assert m["versions"]["gguf"].startswith("0.19")


def test_output_folder_policy(tmp_path, tiny_ckpt):
    out = tmp_path / "o"
    export_gguf(tiny_ckpt, out, quant="f16", quiet=True)
    export_gguf(tiny_ckpt, out, quant="f16", quiet=True)  # re-run replaces its own files
    export_gguf(tiny_ckpt, out, quant="q8_0", quiet=True)  # earlier outputs of this tool are fine too
    m = json.loads((out / "manifest.json").read_text())
    assert {a["quant"] for a in m["artifacts"]} == {"F16", "Q8_0"}
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConvertError, match="holds other files.*--force"):
        export_gguf(tiny_ckpt, out, quant="f16", quiet=True)
    export_gguf(tiny_ckpt, out, quant="f16", quiet=True, force=True)
    assert (out / "notes.txt").read_text() == "mine"


def _edited_copy(src, dst, edit):
    d = shutil.copytree(src, dst)
    t = load_file(str(d / "model.safetensors"))
    edit(t)
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def test_nonfinite_weights_refused(tmp_path, tiny_dir):
    name = "model.language_model.layers.1.mlp.up_proj.weight"

    def put_nan(t):
        t[name] = t[name].clone()
        t[name][0, 0] = float("nan")

    d = _edited_copy(tiny_dir, tmp_path / "nan", put_nan)
    with pytest.raises(ConvertError, match=f"{name} has 1 NaN/Inf"):
        export_gguf(Checkpoint(d), tmp_path / "out", quiet=True)
    assert not any((tmp_path / "out").glob("*.gguf*"))
    paths = export_gguf(Checkpoint(d), tmp_path / "out", quiet=True, allow_nonfinite=True)
    assert all(p.is_file() for p in paths)


def test_shape_disagreeing_with_config(tmp_path, tiny_dir):
    name = "model.language_model.layers.0.mlp.down_proj.weight"
    d = _edited_copy(tiny_dir, tmp_path / "shape", lambda t: t.__setitem__(name, t[name][:, :-32].contiguous()))
    with pytest.raises(ConvertError, match="down_proj.weight has shape .* the config implies"):
        export_gguf(Checkpoint(d), tmp_path / "out", quiet=True)


def test_missing_and_unknown_tensors(tmp_path, tiny_dir):
    name = "model.language_model.layers.2.linear_attn.A_log"
    d = _edited_copy(tiny_dir, tmp_path / "missing", lambda t: t.pop(name))
    with pytest.raises(ConvertError, match="lacks 1 tensor"):
        export_gguf(Checkpoint(d), tmp_path / "out", quiet=True)
    d2 = _edited_copy(tiny_dir, tmp_path / "extra", lambda t: t.__setitem__("model.extra.weight", torch.zeros(2, 2)))
    with pytest.raises(ConvertError, match="does not know.*model.extra.weight"):
        export_gguf(Checkpoint(d2), tmp_path / "out", quiet=True)


def test_failure_midway_leaves_nothing(tmp_path, tiny_ckpt, monkeypatch):
    calls = {"n": 0}
    real = tiny_ckpt.tensor

    def flaky(*a, **k):  # the writer's threads read through Checkpoint.tensor
        calls["n"] += 1
        if calls["n"] == 10:
            raise OSError(28, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(tiny_ckpt, "tensor", flaky)
    out = tmp_path / "out"
    with pytest.raises(ConvertError, match="disk full"):
        export_gguf(tiny_ckpt, out, quiet=True)
    assert not out.exists()  # the folder the export created goes too


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "convert", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("args, message", [
    (["--model", "/nonexistent/model"], "no such folder"),
    (["--quant", "q3_x"], "unknown --quant 'q3_x'"),
    (["--mode", "8x"], "unknown --mode"),
])
def test_cli_one_line_errors(tmp_path, tiny_dir, args, message):
    if "--model" not in args:
        args = ["--model", str(tiny_dir), *args]
    r = _cli("gguf", *args, "--out", str(tmp_path / "o"), "--quiet")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_cli_writes_and_names_files(tmp_path, tiny_dir):
    r = _cli("gguf", "--model", str(tiny_dir), "--outtype", "BF16", "--mode", "4x", "--out", str(tmp_path / "o"), "--quiet",
             "--no-validate")
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert names == ["MiniCPM-V-4.6-BF16.gguf", "manifest.json", "mmproj-MiniCPM-V-4.6-BF16.gguf"]


def test_plain_save_pretrained_fp32_folder(tmp_path, tiny_dir):
    """A folder written by plain save_pretrained (fp32, tokenizer only, no processor files) converts."""
    import torch
    from transformers import AutoTokenizer, MiniCPMV4_6ForConditionalGeneration

    m = MiniCPMV4_6ForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.float32)
    d = tmp_path / "plain"
    m.save_pretrained(d)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(d)
    assert not (d / "preprocessor_config.json").exists()
    c = Checkpoint(d)
    assert c.info("model.language_model.norm.weight").dtype == "F32"
    paths = export_gguf(c, tmp_path / "out", quant="f32", quiet=True)
    ref = export_gguf(Checkpoint(tiny_dir), tmp_path / "ref", quant="f32", quiet=True)
    # the same weights give the same tensors (bf16 values are exact in fp32)
    from validate.gguf_diff import diff

    dd = diff(paths[0], ref[0], ignore_keys=("general.name",))
    assert not dd.tensors_bytes_differ and not dd.tensors_only_a and not dd.tensors_only_b


def test_main_command_uses_embedded_default(tmp_path):
    """`python -m convert gguf` with no --model builds the tiny synthetic model, says so, and
    validates what it wrote (reports beside the files, the verdict in the manifest)."""
    import os

    env = {**os.environ, "MINICPMV_EDGE_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "convert", "gguf", "--quiet"], capture_output=True, text=True,
                       cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert "embedded default" in r.stdout and "tiny synthetic" in r.stdout
    out = tmp_path / "out" / "MiniCPM-V-4.6-synth-tiny-seed0"
    assert sorted(p.name for p in out.iterdir()) == [
        "MiniCPM-V-4.6-F16.gguf", "manifest.json", "mmproj-MiniCPM-V-4.6-F16.gguf", "validation.html", "validation.json"]
    assert "validation passed" in r.stdout
    m = json.loads((out / "manifest.json").read_text())
    assert {a["file"]: a.get("validation") for a in m["artifacts"]} == {
        "MiniCPM-V-4.6-F16.gguf": "pass", "mmproj-MiniCPM-V-4.6-F16.gguf": "pass"}


def test_synth_cli_prints_behaviour_report(tmp_path):
    r = subprocess.run([sys.executable, "-m", "convert", "synth", "--preset", "tiny", "--out", str(tmp_path / "m")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "behaviour report" in r.stdout and "mlp_ablation_flip_min" in r.stdout
    rep = json.loads((tmp_path / "m" / "synth_report.json").read_text())
    assert rep and (tmp_path / "m" / "config.json").is_file()
