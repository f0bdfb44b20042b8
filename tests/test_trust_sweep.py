"""A small trust sweep (bench/trust_sweep.py runs 20 checkpoints): on checkpoints drawn with
shapes and seeds the rules were never tuned on, every correct artifact (llama.cpp's converter and
quantizer, this project's exports) passes and every planted fault fails."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python==0.3.36 is not installed (pip install -e '.[llama]')")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import trust_sweep  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("seed", [103, 104])  # 103: one DeltaNet value head; 104: a bare save_pretrained folder
def test_trust_sweep(tmp_path, seed):
    res = trust_sweep.sweep_one(seed, seed, tmp_path, scenarios="quick", threads=2, upstream=True, quiet=True)
    c = trust_sweep.counts([res])
    wrong = [(r["artifact"], r["status"], r.get("messages", [])[:2]) for r in res["rows"] if not r["correct"]]
    assert c["false_failures"] == 0 and c["false_passes"] == 0, wrong
    assert c["correct_artifacts"] == len(trust_sweep.GOOD_OURS) + len(trust_sweep.GOOD_UPSTREAM)
    assert c["faults"] >= 6  # 8 planted; a model may lack the shape one of them needs
    assert res["plain"] == (seed % 4 == 0)


def test_drawn_shapes_differ_from_the_presets():
    """The draws cover what the presets do not: widths off the 32 and 256 grids, several
    attention intervals and K/V ratios, both dtypes, sharded and not (no test builds them here)."""
    from convert.synth.draw import draw_preset

    ps = [draw_preset(s) for s in range(1, 21)]
    hidden = {p.text["hidden_size"] for p in ps}
    assert any(h % 256 == 0 for h in hidden) and any(h % 32 and h % 256 for h in hidden)
    assert any(h % 32 == 0 and h % 256 for h in hidden)
    assert len({p.text["full_attention_interval"] for p in ps}) == 3
    assert len({p.text["num_attention_heads"] // p.text["num_key_value_heads"] for p in ps}) >= 3
    assert {p.dtype for p in ps} == {"bfloat16", "float32"} and {p.max_shard_size is None for p in ps} == {True, False}
    assert len({p.top["insert_layer_id"] for p in ps}) >= 3
    assert draw_preset(7) == draw_preset(7)
