"""The synthetic tiny checkpoint behaves like a trained model where the toolchain can tell.

Builds `tiny` three times (seed 0 with the behaviour report, seed 0 again, seed 1): ~10 s.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from convert.synth.behaviour import TARGETS
from convert.synth.build import build_synthetic


def _tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    rep = build_synthetic("tiny", root / "a", seed=0, report=True, quiet=True)
    build_synthetic("tiny", root / "b", seed=0, report=False, quiet=True)
    build_synthetic("tiny", root / "c", seed=1, report=False, quiet=True)
    return rep, root


def test_targets(built):
    rep, _ = built
    failed = {k: rep[k] for k, ok in rep["checks"].items() if not ok}
    assert not failed, f"behaviour targets missed: {failed}"
    assert set(rep["checks"]) == set(TARGETS)
    assert rep["mlp_ablation_flip_min"] >= 0.10 and min(rep["mlp_ablation_flip"]) == rep["mlp_ablation_flip_min"]
    assert rep["q8_block32_sym_agreement"] >= 0.97
    assert rep["q4_group128_asym_agreement"] >= 0.70
    assert rep["mean_top1_prob"] >= 0.5
    assert rep["copy_fraction"] <= 0.5 and rep["distinct_predictions"] >= 32
    assert rep["context_free_agreement"] <= 0.5  # the prediction depends on the context
    assert rep["n_tokens"] >= 256


def test_activation_structure(built):
    """Inputs of every decoder linear: low effective rank and a few outlier channels."""
    rep, _ = built
    for name, s in rep["activation_stats"].items():
        assert s["rank90_frac"] <= 0.5, (name, s)
        assert s["outlier_ratio"] >= 3.0, (name, s)
    readers = [s for n, s in rep["activation_stats"].items() if n.endswith(("q_proj", "gate_proj", "in_proj_qkv"))]
    assert max(s["rank90_frac"] for s in readers) <= 0.2


def test_converter_mistakes_show(built):
    """Dropping a transform a converter must apply changes the output clearly."""
    rep, _ = built
    for name, flip in rep["converter_mistake_flip"].items():
        assert flip >= 0.2, (name, flip)
    assert set(rep["converter_mistake_flip"]) >= {"norm_without_plus_one", "A_log_used_as_A", "v_heads_reordered"}
    assert rep["rope_off_flip"] >= 0.05
    assert rep["bf16_compute_agreement"] >= 0.9
    assert rep["vision_finite"] and 0.3 <= rep["vision_rms_over_text"] <= 3
    assert rep["vision_cos_between_images"] <= 0.8  # image embeddings depend on the image
    assert rep["vision_cos_no_position_embedding"] <= 0.95
    assert rep["vision_cos_no_layernorm_bias"] <= 0.98


def test_deterministic_and_seeded(built):
    _, root = built
    a, b, c = (_tensors(root / x) for x in "abc")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "same seed must give identical weights"
    assert sum(not torch.equal(a[k], c[k]) for k in a) == len(a), "another seed must change every tensor"


def test_every_parameter_nontrivial(built):
    _, root = built
    for name, t in _tensors(root / "a").items():
        t = t.float()
        assert torch.isfinite(t).all(), name
        assert t.abs().max() > 0, f"{name} is all zero"
        assert t.numel() == 1 or t.std() > 0, f"{name} is constant"
