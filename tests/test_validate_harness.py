"""The validation harness end to end on the tiny model: good artifacts pass, planted faults fail
with messages naming scenario, metric or tensor, and artifact; crashes, hangs and bad input are
reported cleanly."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python==0.3.36 is not installed (pip install -e '.[llama]')")

from gguf import GGUFReader  # noqa: E402
from validate.faults import raw, rewrite  # noqa: E402

from validate.artifacts import discover  # noqa: E402
from validate.harness import EXIT_CRASHED, EXIT_FAILED, EXIT_OK, Profile, run_validation  # noqa: E402
from validate.scenarios import load_scenarios  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OK_STATUSES = {"pass", "known-difference", "skipped"}


def _run(ckpt, folder=None, scenarios="quick", **kw):
    arts = discover(folder) if not isinstance(folder, list) else folder
    return run_validation(ckpt, arts, load_scenarios(scenarios), scenario_set=scenarios, quiet=True,
                          speed_anchor=False, **kw)


def _messages(row) -> list[str]:
    out = [c["message"] for c in row["checks"] if c["status"] == "fail"]
    out += [d for c in row["checks"] if c["status"] == "fail" for d in c.get("details", [])]
    return out + [f for s in row["scenarios"] for f in s.get("failures", [])]


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory, tiny_gguf):
    """F16 (16x and 4x projectors), Q8_0 and Q4_K_M decoders of the tiny model in one folder."""
    d = tmp_path_factory.mktemp("arts")
    dec, mm = tiny_gguf("f16")
    for p in (dec, mm["16x"], mm["4x"], dec.parent / "manifest.json", tiny_gguf("q8_0")[0], tiny_gguf("Q4_K_M")[0]):
        shutil.copy(p, d / p.name)
    return d


def test_good_artifacts_pass_every_scenario(tiny_ckpt, good_folder):
    rep = _run(tiny_ckpt, good_folder, "default")
    assert rep["exit_code"] == EXIT_OK and rep["status"] == "pass", [_messages(a) for a in rep["artifacts"]]
    names = {s.name for s in load_scenarios("default")}
    for a in rep["artifacts"]:
        rows = {s["scenario"]: s for s in a["scenarios"]}
        assert set(rows) == names and all(s["status"] in OK_STATUSES for s in rows.values())
        # the two preprocessing differences are reported, with what each side produced
        for n in ("image-300x200", "image-500x100"):
            assert rows[n]["status"] == "known-difference" and "transformers' processor gives" in rows[n]["reason"]
            assert rows[n]["layout"]["reference"]["tokens"] != rows[n]["layout"]["artifact"]["tokens"]
            assert rows[n]["metrics"]["fp32"]["positions"] > 0  # the runtime is still checked on its own grid
        assert rows["video-frames"]["status"] == "skipped" and "no video input" in rows["video-frames"]["reason"]
        assert rows["image-2000x2000"]["layout"]["artifact"]["tokens"] == [[64] * 10]
        assert rows["two-images"]["status"] == "pass" and len({i["image"] for i in rows["two-images"]["images"]}) == 2
        mt = rows["multi-turn"]
        assert mt["status"] == "pass" and mt["greedy"]["steps"] == len(mt["greedy"]["artifact"])
        assert all(c["status"] in ("pass", "skipped") for c in a["checks"])
        assert a["peak_rss_mb"] > 0 and a["speed"]["prefill_tok_s"] > 0 and a["speed"]["image_encode_s"] > 0
    by = {a["quant"]: a for a in rep["artifacts"]}
    assert set(by) == {"F16", "Q8_0", "Q4_K_M"}
    # fake-quant reference: conversion error only, far tighter than the fp32 gap under quantization
    for q, a in by.items():
        for s in a["scenarios"]:
            if "metrics" in s and q != "F16":
                assert s["metrics"]["fake-quant"]["kl_mean"] < 0.1 * s["metrics"]["fp32"]["kl_mean"], (q, s["scenario"])
    assert by["Q4_K_M"]["size_ratio_f16"] < by["Q8_0"]["size_ratio_f16"] < 1.0 == by["F16"]["size_ratio_f16"]


def test_llamacpp_converter_output_passes(tmp_path, tiny_ckpt, tiny_dir):
    from convert.errors import ConvertError
    from validate.upstream import upstream_convert_many

    try:
        upstream_convert_many([(tiny_dir, tmp_path / "theirs-F16.gguf", "f16", False, "16x"),
                               (tiny_dir, tmp_path / "theirs-Q8_0.gguf", "q8_0", False, "16x"),
                               (tiny_dir, tmp_path / "mmproj-theirs.gguf", "f16", True, "16x")])
    except ConvertError as e:
        pytest.skip(str(e))
    rep = _run(tiny_ckpt, tmp_path, "quick")
    assert rep["exit_code"] == EXIT_OK, [_messages(a) for a in rep["artifacts"]]
    for a in rep["artifacts"]:
        assert {c["check"]: c["status"] for c in a["checks"]} == {"manifest": "skipped", "tensors": "pass", "metadata": "pass"}


# ---------------------------------------------------------------------------------------------
# planted faults, built by editing good files


def _plant(folder: Path, dec: Path, quant: str) -> dict[str, Path]:
    r = GGUFReader(dec)
    kv = {f.name: f for f in r.fields.values()}
    norm = np.array(raw(dec, "blk.0.attn_norm.weight")) - np.float32(1)
    merges = kv["tokenizer.ggml.merges"].contents()
    return {
        "norm": rewrite(dec, folder / f"norm-{quant}.gguf", data={"blk.0.attn_norm.weight": norm}),
        "swap": rewrite(dec, folder / f"swap-{quant}.gguf", data={"blk.0.ffn_up.weight": raw(dec, "blk.1.ffn_up.weight"),
                                                                "blk.1.ffn_up.weight": raw(dec, "blk.0.ffn_up.weight")}),
        "rope": rewrite(dec, folder / f"rope-{quant}.gguf",
                        kv={"qwen35.rope.dimension_count": 2 * kv["qwen35.rope.dimension_count"].contents()}),
        "merge": rewrite(dec, folder / f"merge-{quant}.gguf", kv={"tokenizer.ggml.merges": merges[:3] + merges[4:]}),
    }


# what each fault's messages must name: (static check text, scenario-level metric)
EXPECT = {
    "norm": ("blk.0.attn_norm.weight", "kl_mean"),
    "swap": ("blk.0.ffn_up.weight", "kl_mean"),
    "rope": ("qwen35.rope.dimension_count", "kl_mean"),
    "merge": ("tokenizer.ggml.merges", "tokens"),
}


@pytest.mark.parametrize("quant", ["f16", "q8_0", "Q4_K_M"])
def test_planted_decoder_faults_fail(tmp_path, tiny_ckpt, tiny_gguf, quant):
    dec, mm = tiny_gguf(quant)
    planted = _plant(tmp_path, dec, quant)
    shutil.copy(mm["16x"], tmp_path / mm["16x"].name)
    rep = _run(tiny_ckpt, tmp_path, "text-chat,multi-turn,image-448-16x")
    assert rep["exit_code"] == EXIT_FAILED
    rows = {a["name"]: a for a in rep["artifacts"]}
    for fault, path in planted.items():
        row = rows[path.stem]
        assert row["status"] == "fail", fault
        msgs = _messages(row)
        static, metric = EXPECT[fault]
        # the static check names the file and the tensor or key
        assert any(path.name in m and static in m for m in msgs), (fault, msgs)
        # and the scenarios catch it too, naming scenario, metric and artifact
        assert any(m.startswith("text-chat:") and metric in m and path.stem in m for m in msgs), (fault, quant, msgs)


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_planted_projector_scale_factor_fails(tmp_path, tiny_ckpt, tiny_gguf, quant):
    dec, mm = tiny_gguf(quant)
    shutil.copy(dec, tmp_path / dec.name)
    bad = rewrite(mm["16x"], tmp_path / "mmproj-bad.gguf", kv={"clip.vision.projector.scale_factor": 2})
    rep = _run(tiny_ckpt, tmp_path, "image-448-16x")
    row = rep["artifacts"][0]
    msgs = _messages(row)
    assert rep["exit_code"] == EXIT_FAILED and row["status"] == "fail"
    assert any(bad.name in m and "clip.vision.projector.scale_factor" in m for m in msgs), msgs
    assert any(m.startswith("image-448-16x: layout:") and row["name"] in m for m in msgs), msgs


def test_manifest_mismatch_reported_while_metrics_run(tmp_path, tiny_ckpt, tiny_gguf):
    dec, mm = tiny_gguf("f16")
    for p in (dec, mm["16x"], dec.parent / "manifest.json"):
        shutil.copy(p, tmp_path / p.name)
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["artifacts"][0]["sha256"] = "0" * 64
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    rep = _run(tiny_ckpt, tmp_path, "text-chat")
    row = rep["artifacts"][0]
    man = next(c for c in row["checks"] if c["check"] == "manifest")
    assert man["status"] == "fail" and "differ from manifest.json" in man["message"]
    assert row["scenarios"][0]["status"] == "pass" and row["scenarios"][0]["metrics"]["fp32"]["positions"] > 0
    assert rep["exit_code"] == EXIT_FAILED


# ---------------------------------------------------------------------------------------------
# runtimes that crash or hang


@pytest.mark.parametrize("runtime, status, timeout", [("CrashingRuntime", "crashed", 120), ("HangingRuntime", "timeout", 12)])
def test_runtime_crash_or_hang_is_a_failed_row(tiny_ckpt, tiny_gguf, tmp_path, runtime, status, timeout):
    dec, mm = tiny_gguf("f16")
    arts = discover(None, dec, [mm["16x"]])
    prof = Profile(runtime=f"fake_runtimes:{runtime}", timeout_s=timeout)
    rep = run_validation(tiny_ckpt, arts, load_scenarios("quick"), profile=prof, quiet=True, speed_anchor=False,
                         env={"PYTHONPATH": str(Path(__file__).parent)})
    row = rep["artifacts"][0]
    assert rep["exit_code"] == EXIT_CRASHED and row["status"] == status
    assert ("SIGABRT" in row["error"]) if status == "crashed" else ("time limit" in row["error"])
    assert [s["status"] for s in row["scenarios"]] == ["not-run"] * 3


def test_non_finite_logits_fail(tiny_ckpt, tiny_gguf):
    """NaN or inf in a runtime's logits fails the scenario with one message naming them (a NaN KL
    used to pass every tolerance: found with the phone profile's float16 overflow)."""
    dec, mm = tiny_gguf("f16")
    prof = Profile(runtime="fake_runtimes:NonFiniteRuntime")
    rep = run_validation(tiny_ckpt, discover(None, dec, []), load_scenarios("text-chat"), profile=prof,
                         quiet=True, speed_anchor=False, speed=False, env={"PYTHONPATH": str(Path(__file__).parent)})
    row = rep["artifacts"][0]
    assert rep["exit_code"] == EXIT_FAILED and row["verdict"]["conversion"] == "fail"
    (msg,) = row["scenarios"][0]["failures"]
    teacher = row["scenarios"][0]["greedy"]["steps"] - 1  # rows after the prompt: one per teacher token
    assert msg.startswith("text-chat: logits:") and f"{2 * teacher} non-finite values (NaN or inf) in {teacher} of" in msg, msg


def test_runtime_embeddings_disagreeing_with_its_layout_is_a_failed_row(tiny_ckpt, tiny_gguf):
    """A runtime whose image embeddings do not match its own layout: a failure row naming it, no
    traceback from the arithmetic (the transformers-quant runtime once returned 16x embeddings
    for a 4x layout)."""
    dec, mm = tiny_gguf("f16")
    prof = Profile(runtime="fake_runtimes:WrongModeRuntime")
    rep = run_validation(tiny_ckpt, discover(None, dec, [mm["16x"]]), load_scenarios("image-448-16x"), profile=prof,
                         quiet=True, speed_anchor=False, env={"PYTHONPATH": str(Path(__file__).parent)})
    row = rep["artifacts"][0]
    assert rep["exit_code"] == EXIT_FAILED and row["status"] == "fail" and row["verdict"]["conversion"] == "fail"
    msg = row["scenarios"][0]["failures"][0]
    assert msg.startswith("image-448-16x: layout:") and "returns embeddings of [256] tokens" in msg and "[64]" in msg, msg


def test_cli_crash_is_a_clean_exit(tmp_path, tiny_dir, tiny_gguf):
    dec, mm = tiny_gguf("f16")
    env = {**__import__("os").environ, "PYTHONPATH": f"{ROOT}:{Path(__file__).parent}"}
    r = subprocess.run([sys.executable, "-m", "validate", "--model", str(tiny_dir), "--decoder", str(dec), "--mmproj",
                        str(mm["16x"]), "--scenarios", "text-chat", "--runtime", "fake_runtimes:CrashingRuntime",
                        "--json", str(tmp_path / "r.json"), "--report", str(tmp_path / "r.html"), "--quiet",
                        "--no-speed-anchor"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == EXIT_CRASHED and "Traceback" not in r.stderr + r.stdout, r.stderr
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["artifacts"][0]["status"] == "crashed" and (tmp_path / "r.html").is_file()


# ---------------------------------------------------------------------------------------------
# bad input: one line, exit 2


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "validate", *args, "--quiet"], capture_output=True, text=True, cwd=cwd)


def test_bad_input(tmp_path, tiny_dir, tiny_alt_dir, tiny_gguf):
    from convert import Checkpoint
    from convert.gguf.export import export_gguf

    dec, mm = tiny_gguf("f16")
    alt = export_gguf(Checkpoint(tiny_alt_dir), tmp_path / "alt", quant="f16", quiet=True)[0]
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(dec.read_bytes()[:5000])
    cases = [
        (["--decoder", str(alt)], "made from another model"),
        (["--decoder", str(dec)], "need a projector"),
        (["--decoder", str(dec), "--scenarios", "nope"], "unknown scenario set or scenario 'nope'"),
        (["--decoder", str(corrupt)], "not a readable GGUF"),
        (["--decoder", str(mm["16x"])], "projector (clip) file, not a decoder"),
        ([str(tmp_path / "missing")], "no such folder"),
    ]
    for args, message in cases:
        r = _cli("--model", str(tiny_dir), *args, cwd=tmp_path)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and message in lines[0], (args, r.stderr[-2000:])


# ---------------------------------------------------------------------------------------------
# python -m convert validates what it wrote


def test_convert_marks_failed_artifacts(tmp_path, tiny_dir):
    """A quality budget the Q8_0 cannot meet (--max-kl) fails it: exit 3, files kept, marked."""
    from convert.cli import main

    out = tmp_path / "o"
    code = main(["gguf", "--model", str(tiny_dir), "--quant", "q8_0", "--out", str(out), "--scenarios", "text-chat",
                 "--max-kl", "1e-9", "--quiet"])
    assert code == EXIT_FAILED
    m = json.loads((out / "manifest.json").read_text())
    assert {a["validation"] for a in m["artifacts"]} == {"fail"} and len(m["artifacts"]) == 2
    assert all((out / a["file"]).is_file() for a in m["artifacts"])
    rep = json.loads((out / "validation.json").read_text())
    row = rep["artifacts"][0]
    assert "quality: kl_mean vs fp32 reference" in row["scenarios"][0]["failures"][0]
    # the file itself is what it claims to be: only the quality question failed
    assert row["verdict"]["conversion"] == "pass" and row["verdict"]["quality"]["status"] == "over budget"
