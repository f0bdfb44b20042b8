"""The phone profiles' ExecuTorch runner (runtimes/phone/et/: a C interface over ExecuTorch's C++
Module and this project's `llama::` kernels) built for this machine, against ExecuTorch's own Python
runtime with upstream's kernels on the same `.pte`: the ops are ours, so they are checked here,
where nothing but them differs, before the aarch64 comparison (tests/test_phone.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _check(folder: Path, build: Path, *extra: str) -> dict:
    p = subprocess.run([sys.executable, str(ROOT / "tests" / "et_ops_check.py"), str(folder), "--build-dir",
                        str(build), *extra], capture_output=True, text=True, cwd=ROOT, timeout=900)
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["ok"], res
    return res


def test_runner_equals_executorch_runtime(et_dirs, tmp_path):
    """Embedding, vision features and decoder logits (prefill, a chunk, a step) of the tiny 8da4w
    `.pte`: measured identical (0.0) to the pybindings runtime on these inputs."""
    res = _check(et_dirs("8da4w"), tmp_path / "build")
    assert res["embedding"]["max_abs"] == 0.0
    assert res["vision"]["rel"] < 1e-5 and res["decoder_rel_max"] < 1e-5, res
    assert all(res[k]["argmax_equal"] for k in ("logits_prefill", "logits_chunk", "logits_step"))


@pytest.mark.slow
def test_runner_long_prefill_fp32(et_dirs, tmp_path):
    """fp32 program, 480 tokens, a 224-pixel image: measured 4.6e-7 of max |logit| (8da4w: 3.3e-3,
    int8 dynamic activations amplify ~1e-7 op rounding differences into quantization steps)."""
    res = _check(et_dirs("fp32"), tmp_path / "build", "--prefill", "480", "--side", "224")
    assert res["decoder_rel_max"] < 1e-5 and res["vision"]["rel"] < 1e-5, res
