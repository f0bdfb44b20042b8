"""The memory estimate's shape-derived parts against what llama.cpp itself allocates."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from convert.memory import MIB, estimate, kv_bytes_per_token, recurrent_state_bytes

ROOT = Path(__file__).resolve().parents[1]
PROBE = ("import sys; from runtimes.llamacpp import LlamaCppRuntime; "
         "LlamaCppRuntime(sys.argv[1], n_ctx=int(sys.argv[2]), kv_f32=False, verbose=True).close()")


def _llama_sizes(decoder: Path, n_ctx: int) -> tuple[float, float]:
    p = subprocess.run([sys.executable, "-c", PROBE, str(decoder), str(n_ctx)], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    kv = re.search(r"llama_kv_cache: size =\s+([\d.]+) MiB", p.stderr)
    rs = re.search(r"llama_memory_recurrent: size =\s+([\d.]+) MiB", p.stderr)
    assert kv and rs, p.stderr[-2000:]
    return float(kv.group(1)), float(rs.group(1))


@pytest.mark.parametrize("preset", ["tiny", "tiny-alt"])
def test_kv_cache_and_recurrent_state_match_llama_cpp(preset, tiny_ckpt, tiny_gguf, tiny_alt_dir, tmp_path):
    from convert import Checkpoint
    from convert.gguf.export import export_gguf

    if preset == "tiny":
        ckpt, dec = tiny_ckpt, tiny_gguf("Q4_K_M")[0]
    else:
        ckpt = Checkpoint(tiny_alt_dir)
        dec = export_gguf(ckpt, tmp_path / "q", quant="Q4_K_M", mode="16x", quiet=True)[0]
    n_ctx = 4096
    kv, rs = _llama_sizes(dec, n_ctx)  # llama.cpp prints MiB with two decimals
    t = ckpt.spec.text
    assert abs(kv_bytes_per_token(t) * n_ctx / MIB - kv) < 0.006
    assert abs(recurrent_state_bytes(t) / MIB - rs) < 0.006
    est = estimate(ckpt.spec, dec.stat().st_size, n_ctx, compute_bytes=10 * MIB).as_dict()
    assert est["total_mb"] == pytest.approx(dec.stat().st_size / MIB + kv + rs + 10, abs=0.1)


def test_real_model_shape_gives_12_kib_per_token():
    """The real MiniCPM-V 4.6's config: 12 KiB of K/V per token
    for its 6 attention layers (what the apps' notes say) and about 19 MiB of Gated DeltaNet state."""
    from convert.spec import ModelSpec
    from convert.synth.presets import REAL_CONFIG

    spec = ModelSpec.from_config(REAL_CONFIG)
    assert kv_bytes_per_token(spec.text) == 12 * 1024
    assert recurrent_state_bytes(spec.text) == 18 * (3 * 6144 + 16 * 128 * 128) * 4


def test_runtime_reports_its_buffers(tiny_ckpt, tiny_gguf):
    """The llama.cpp runtime reports the buffers llama.cpp allocated (the compute buffers a memory
    estimate cannot derive from shapes); its float32 K/V and the state equal the estimate's parts."""
    from runtimes.llamacpp import LlamaCppRuntime

    dec, _ = tiny_gguf("Q4_K_M")
    with LlamaCppRuntime(dec, n_ctx=2048) as rt:
        buf = rt.system_info()["buffers_mib"]
    t = tiny_ckpt.spec.text
    assert buf["llama_kv_cache KV"] == pytest.approx(kv_bytes_per_token(t, 4) * 2048 / MIB, abs=0.006)
    assert buf["llama_memory_recurrent RS"] == pytest.approx(recurrent_state_bytes(t) / MIB, abs=0.006)
    assert buf["sched_reserve compute"] > 0 and buf["load_tensors model"] > 0
