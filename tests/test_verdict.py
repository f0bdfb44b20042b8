"""The verdict rules on logits built to sit on either side of them (validate/verdict.py)."""

import numpy as np

from validate.harness import tolerances
from validate.metrics import compare_logits
from validate.verdict import judge, summarize

RULES = tolerances()


def _case(rng, n=200, vocab=300, rounding=0.05, noise=0.005):
    """fp32 logits, a fake-quant reference `rounding` away, an artifact `noise` from that."""
    fp32 = rng.normal(0, 3, (n, vocab)).astype(np.float32)
    fq = fp32 + rng.normal(0, rounding, fp32.shape).astype(np.float32)
    art = fq + rng.normal(0, noise, fp32.shape).astype(np.float32)
    return fp32, fq, art


def _judge(fp32, fq, art, label="Q4_K_M", budget=None):
    m = {"fp32": compare_logits(fp32, art)[0]}
    m["fake-quant"], series = compare_logits(fq, art)
    m["fake-quant-vs-fp32"], yard = compare_logits(fp32, fq)
    series["types_logit_err"] = yard["logit_err"]
    return judge("s", "a", label, m, series, RULES, budget)


def test_rounding_level_noise_passes_whatever_the_weights_cost():
    rng = np.random.default_rng(0)
    for rounding in (0.002, 0.05, 0.5):  # cheap and expensive types, sensitive and robust weights
        fails, v = _judge(*_case(rng, rounding=rounding, noise=rounding / 4))
        assert fails == [], (rounding, fails)
        assert 0.9 < v["quality"]["excess"] < 1.2


def test_noise_above_the_types_own_cost_fails():
    rng = np.random.default_rng(1)
    fails, v = _judge(*_case(rng, rounding=0.05, noise=0.1))
    assert any("kl_mean vs fake-quant reference" in f and "x the types' own cost" in f for f in fails), fails


def test_near_tie_flip_is_no_evidence_a_confident_flip_is():
    rng = np.random.default_rng(2)
    fp32, fq, art = _case(rng, noise=0.0)
    # a near tie in the reference, flipped by less than the rounding moves logits
    fq[5, :2], art[5, :2] = (20.0, 19.99), (19.99, 20.0)
    fp32[5, :2] = fq[5, :2]
    fails, v = _judge(fp32, fq, art)
    assert not fails and v["conversion"]["decisive_flips"] == 0 and v["conversion"]["top1_agreement"] < 1
    # a prediction with a wide margin changed: counts, even though the mean KL barely moves
    art[7, :2], fq[7, :2], fp32[7, :2] = (20.0, 25.0), (25.0, 20.0), (25.0, 20.0)
    fails, v = _judge(fp32, fq, art)
    assert v["conversion"]["decisive_flips"] == 1 and any("top1" in f and "confident" in f for f in fails), fails


def test_f32_files_are_held_to_the_floor():
    rng = np.random.default_rng(3)
    fp32 = rng.normal(0, 3, (100, 200)).astype(np.float32)
    m = {"fp32": compare_logits(fp32, fp32 + 1e-4 * rng.normal(size=fp32.shape).astype(np.float32))[0]}
    assert judge("s", "a", "F32", m, None, RULES)[0] == []
    m = {"fp32": compare_logits(fp32, fp32 + 0.05 * rng.normal(size=fp32.shape).astype(np.float32))[0]}
    fails = judge("s", "a", "F32", m, None, RULES)[0]
    assert fails and "the floor" in fails[0]


def test_quality_fails_only_against_a_budget():
    rng = np.random.default_rng(4)
    case = _case(rng, rounding=0.5, noise=0.05)
    assert _judge(*case)[0] == []
    fails, v = _judge(*case, budget=1e-3)
    assert fails and fails[0].startswith("s: quality: kl_mean vs fp32") and v["quality"]["budget_kl_mean"] == 1e-3
    row = {"status": "fail", "checks": [], "scenarios": [{"failures": fails, "verdict": v}]}
    assert summarize(row)["conversion"] == "pass" and summarize(row)["quality"]["status"] == "over budget"


def test_a_format_s_own_ratio_applies_to_that_format_only():
    """conversion.by_type: an fp16 ONNX graph rounds its activations too, so its limit is its own
    measured ratio; the same noise on a GGUF type still fails."""
    rng = np.random.default_rng(4)
    case = _case(rng, rounding=0.05, noise=0.1)  # about 4x the types' own KL
    assert _judge(*case, label="F16")[0]
    ratio = RULES["conversion"]["by_type"]["onnx-fp16"]["kl_ratio"]
    fails, v = _judge(*case, label="onnx-fp16")
    assert v["conversion"]["kl_mean"] / v["quality"]["types_kl_mean"] < ratio["kl_mean"]
    assert not [f for f in fails if "kl_mean" in f], fails
