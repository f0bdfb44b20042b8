"""ExecuTorch export (convert/executorch) run in ExecuTorch's runtime and its own LLM runner."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("executorch")

from convert import Checkpoint  # noqa: E402

CONTEXT, SEQ = 1024, 512


def _decoders(ckpt_dir, custom_ops: bool):
    from convert.executorch.decoder import CachedTextDecoder
    from convert.modules import TextDecoder
    from runtimes.reference import load_reference_model

    ck = Checkpoint(ckpt_dir)
    hf = load_reference_model(ck, quiet=True)
    return ck, TextDecoder(hf, ck.spec.text).eval(), CachedTextDecoder(hf, ck.spec.text, 64, custom_ops=custom_ops).eval()


@pytest.mark.parametrize("which", ["tiny", "alt"])
def test_custom_ops_equal_pure_pytorch(which, tiny_dir, tiny_alt_dir):
    """ExecuTorch's llama:: ops (update_cache, custom_sdpa, gated_delta_rule) and the pure-PyTorch path
    compute the same as the explicit-state TextDecoder (transformers' rules): a 7-token prefill, three
    single steps, then a restart at position 0 (the state resets) and a continuation after it."""
    import torch

    d = tiny_dir if which == "tiny" else tiny_alt_dir
    torch.manual_seed(3)
    ck, ref, _ = _decoders(d, False)
    x = torch.randn(1, 10, ck.spec.text.hidden_size)
    with torch.no_grad():
        want = ref(x, torch.ones(1, 10, dtype=torch.long), torch.arange(10)[None], *ref.empty_state())[0][0]
        for custom in (True, False):
            _, _, dec = _decoders(d, custom)
            rows = [dec(x[:, :7], torch.arange(7))[0]]
            rows += [dec(x[:, t:t + 1], torch.tensor([t]))[0] for t in range(7, 10)]
            got = torch.stack(rows)
            assert torch.allclose(got, want[[6, 7, 8, 9]], atol=5e-5, rtol=0), (custom, (got - want[[6, 7, 8, 9]]).abs().max())
            again = dec(x[:, :5], torch.arange(5))[0]  # position 0 again: a new conversation
            assert torch.allclose(again, want[4], atol=5e-5, rtol=0)


def test_layout_manifest_and_program(et_dirs, tiny_dir):
    out = et_dirs("8da4w")
    assert (out / "MiniCPM-V-4.6-8da4w.pte").is_file()
    for f in ("config.json", "tokenizer.json", "chat_template.jinja", "preprocessor_config.json", "manifest.json"):
        assert (out / f).is_file(), f
    m = json.loads((out / "manifest.json").read_text())
    et = m["source"]["executorch"]
    assert et["quant"] == "8da4w" and et["max_context"] == CONTEXT and et["max_seq_len"] == SEQ
    # every decoder linear got the 8da4w layout; the report says what XNNPACK runs
    assert et["quantized"].get("8da4w group 32", 0) > 0
    deleg = et["delegation"]["text_decoder"]
    assert deleg["delegated_nodes"] > 0 and deleg["n_delegates"] > 0
    assert "llama_custom_sdpa_default" in deleg["portable"] and "llama_gated_delta_rule_default" in deleg["portable"]
    from validate.executorch_artifact import check_program, read_executorch

    art = read_executorch(out)
    res = check_program(art, Checkpoint(tiny_dir))
    assert res["status"] == "pass", res


def test_prefill_one_call_equals_single_steps(et_dirs, tiny_dir):
    """A 512-token prompt is one text_decoder call, and it leaves the same state and logits as 512
    single-token calls: the last row and the next 3 decode steps agree (int8 dynamic activations are
    quantized per call, so a T-token call and T 1-token calls round differently: tolerance measured)."""
    from runtimes.executorch import ExecutorchRuntime

    rt = ExecutorchRuntime(et_dirs("8da4w"), n_threads=2)
    rng = np.random.default_rng(0)
    toks = rng.integers(10, rt.n_vocab - 10, size=SEQ + 3).tolist()
    eng = rt.engine
    emb = eng.embed(np.asarray([toks], np.int64))
    eng.reset()
    calls = [eng.decode(emb[:, :SEQ], 0)[-1]]
    calls += [eng.decode(emb[:, t:t + 1], t)[-1] for t in range(SEQ, SEQ + 3)]
    eng.reset()
    steps = [eng.decode(emb[:, t:t + 1], t)[-1] for t in range(SEQ + 3)]
    a, b = np.stack(calls), np.stack(steps[SEQ - 1:])
    assert np.isfinite(a).all()
    assert np.argmax(a, -1).tolist() == np.argmax(b, -1).tolist()
    assert np.abs(a - b).max() < 0.05 * np.abs(b).max(), np.abs(a - b).max()
    rt.reset()
    n0 = rt.n_decoder_calls
    rt.extend_last(toks[:SEQ])  # through the pipeline: generation's prefill is one call
    assert rt.n_decoder_calls - n0 == 1
    rt.close()


def test_state_survives_other_methods(et_dirs):
    """The decoder's buffers live in their own arena: running the vision encoder and the embedding
    between two turns leaves the conversation as it was."""
    from runtimes.executorch import ExecutorchRuntime

    rt = ExecutorchRuntime(et_dirs("8da4w"), n_threads=2)
    eng = rt.engine
    emb = eng.embed(np.arange(20, 40, dtype=np.int64)[None])
    eng.reset()
    eng.decode(emb[:, :15], 0)
    plain = eng.decode(emb[:, 15:], 15)
    eng.reset()
    eng.decode(emb[:, :15], 0)
    eng.encode(np.random.default_rng(1).standard_normal((1, 3, 14 * 8, 14 * 12)).astype(np.float32), "16x")
    eng.embed(np.arange(100, 400, dtype=np.int64)[None])
    after = eng.decode(emb[:, 15:], 15)
    assert np.array_equal(plain, after)
    rt.close()


def test_harness_quick(et_dirs, tiny_dir):
    """The harness on the quick scenarios (text, multi-turn, an image): 8da4w against the torchao
    fake-quant reference passes, with the program check and the delegation report in the report."""
    from validate.executorch_artifact import read_executorch
    from validate.harness import Profile, run_validation
    from validate.scenarios import load_scenarios

    rep = run_validation(Checkpoint(tiny_dir), [read_executorch(et_dirs("8da4w"))], load_scenarios("quick"),
                         profile=Profile(threads=2), quiet=True, speed_anchor=False, speed=False)
    a = rep["artifacts"][0]
    assert a["status"] == "pass", json.dumps(a.get("failures"), indent=1)[:2000]
    assert any(c["check"] == "program" and c["status"] == "pass" for c in a["checks"])
    assert a["files"]["delegation"]["text_decoder"]["xnnpack_nodes"] > 0


def test_runner_generates_the_same_tokens(et_dirs, tiny_dir):
    """ExecuTorch's own MultimodalRunner (C++, through its Python binding) loads the .pte with the
    tokenizer and generates greedily what runtimes/executorch.py generates, for a text prompt and for an
    image prompt (each preprocessed slice an image input of the runner)."""
    code = Path(__file__).with_name("et_runner_check.py")
    out = subprocess.run([sys.executable, str(code), str(et_dirs("8da4w")), "12"], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["text"]["runner"] == res["text"]["ours"], res
    assert len(res["text"]["ours"]) > 0
    assert res["image"]["runner"] == res["image"]["ours"] and res["image"]["slices"] > 1, res


def test_cli_bad_input(tmp_path, tiny_dir, et_dirs):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "convert", "executorch", *args], capture_output=True, text=True,
                              timeout=300)

    r = run("--model", str(tiny_dir), "--quant", "int3", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and r.stderr.strip().startswith("error: --quant 'int3'") and len(r.stderr.strip().splitlines()) == 1
    r = run("--model", str(tiny_dir), "--max-seq-len", "5000", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "--max-seq-len" in r.stderr
    r = run("--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "y"))
    assert r.returncode == 2 and r.stderr.startswith("error:")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    # a damaged program: the harness says so in one line, exit 2
    import shutil

    for cut, words in ((64, "ET12"), (None, "cannot load")):
        bad = tmp_path / f"bad-{cut}"
        shutil.copytree(et_dirs("8da4w"), bad)
        pte = bad / "MiniCPM-V-4.6-8da4w.pte"
        data = pte.read_bytes()
        pte.write_bytes(b"\0" * 64 if cut else data[:len(data) // 3])
        r = subprocess.run([sys.executable, "-m", "validate", str(bad), "--model", str(tiny_dir)], capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 2 and r.stderr.strip().startswith("error:") and words in r.stderr, r.stderr[-500:]
        assert len(r.stderr.strip().splitlines()) == 1


def test_quant_layouts_follow_widths():
    """8da4w puts int4 groups of 32 where the input width allows and int8 per channel elsewhere (XNNPACK's
    4-bit kernels need widths that are multiples of 32; tiny-alt has a 600-wide linear)."""
    import torch
    from torch import nn

    from convert.executorch.quant import quantize_linears

    m = nn.Sequential(nn.Linear(64, 32, bias=False), nn.Linear(600, 16, bias=False))
    x = torch.randn(3, 64)
    w = m[0].weight.detach().clone()
    schemes = quantize_linears(m, "8da4w")
    assert schemes == {"0": "8da4w group 32", "1": "8da8w per channel"}
    # the quantized layer computes the int4-rounded weight on int8-rounded activations: close, not equal
    got, want = m[0](x), x @ w.T
    assert not torch.equal(got, want) and torch.allclose(got, want, atol=0.1 * want.abs().max().item())


@pytest.mark.slow
def test_fp32_every_default_scenario(et_dirs, tiny_dir):
    """fp32 `.pte` (both modes) on every default scenario, video included, within the fp32 rules."""
    from validate.executorch_artifact import read_executorch
    from validate.harness import Profile, run_validation
    from validate.scenarios import load_scenarios

    rep = run_validation(Checkpoint(tiny_dir), [read_executorch(et_dirs("fp32", "both"))], load_scenarios("default"),
                         profile=Profile(threads=2), quiet=True, speed_anchor=False, speed=False)
    a = rep["artifacts"][0]
    assert a["status"] == "pass", json.dumps(a.get("failures"), indent=1)[:2000]
    assert {s["scenario"] for s in a["scenarios"] if s["status"] == "pass"} >= {"video-frames", "image-448-4x", "text-chat"}
