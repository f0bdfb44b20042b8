"""`python -m quantize gptq|awq`: bad input gives one line and exit 2 with nothing written; a run
writes a checkpoint the harness validates through the real loaders."""

import json
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("gptqmodel", reason="the hf-quant extra is not installed (pip install -e '.[hf-quant]')")


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "quantize", *args, "--quiet"], capture_output=True, text=True, cwd=cwd)


def _nan_copy(src, dst):
    """The tiny model with one NaN in a norm weight: the activations after it are NaN."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    f = next(dst.glob("*.safetensors"))
    t = load_file(str(f))
    name = "model.language_model.layers.0.input_layernorm.weight"
    t[name] = t[name].clone()
    t[name][3] = torch.nan
    save_file(t, str(f), metadata={"format": "pt"})
    return dst


def test_bad_input(tmp_path, tiny_dir, capsys):
    from quantize.cli import main

    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    nan = _nan_copy(tiny_dir, tmp_path / "nan")
    m = ["--model", str(tiny_dir)]
    cases = [
        (["gptq", *m, "--format", "awq"], "--format awq is not valid for gptq"),
        (["awq", *m, "--format", "compressed-tensors"], "needs a symmetric scheme"),
        (["awq", *m, "--act-order"], "GPTQ options"),
        (["gptq", *m, "--group-size", "100"], "group size 100"),
        (["gptq", *m, "--calib-samples", "1", "--seqlen", "16"], "calibration"),
        (["awq", "--model", str(other)], "minicpmv4_6"),
        (["gptq", "--model", str(nan), "--calib-samples", "4", "--seqlen", "256"], "NaN"),
    ]
    for args, message in cases:
        out = tmp_path / "out"
        code = main([*args, "--out", str(out), "--no-validate", "--quiet"])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and message in lines[0], (args, lines[-5:])
        assert not out.exists() and not list(tmp_path.glob(".out*")), args


@pytest.mark.parametrize("method, extra, fmt", [("awq", [], "awq"), ("gptq", ["--format", "compressed-tensors"],
                                                                      "compressed-tensors")])
def test_quantize_writes_and_validates(tmp_path, tiny_dir, method, extra, fmt):
    out = tmp_path / method
    r = _cli(method, "--model", str(tiny_dir), "--out", str(out), *extra, "--calib-samples", "16", "--seqlen", "256",
             "--scenarios", "text-chat,image-448-16x", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == fmt
    rep = json.loads((out / "validation.json").read_text())
    row = rep["artifacts"][0]
    assert row["runtime"] == "transformers-quant" and row["status"] == "pass"
    assert {c["check"]: c["status"] for c in row["checks"]}["tensors"] == "pass"
    for s in row["scenarios"]:
        # the loaders compute in float16: the checkpoint's own weights explain nearly all of the gap
        assert s["metrics"]["fake-quant"]["kl_mean"] < 0.05 * s["metrics"]["fp32"]["kl_mean"], s["scenario"]
    man = json.loads((out / "manifest.json").read_text())
    assert {a.get("validation") for a in man["artifacts"] if a["file"].endswith(".safetensors")} == {"pass"}
    if method == "awq":
        assert (out / "awq_scales.safetensors").is_file()
