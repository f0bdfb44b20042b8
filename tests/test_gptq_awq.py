"""GPTQ, AWQ and the RTN baseline on the tiny synthetic model: output error on held-out calibration
activations, exactness of the AWQ fold (tiny and tiny-alt), GPTQ's act-order / static-group
bookkeeping, and the errors a user can cause."""

from __future__ import annotations

import copy

import pytest
import torch

from convert.errors import ConvertError
from quantize.awq import FoldGroup, fold_scale
from quantize.gptq import GPTQ
from quantize.qweight import Scheme
from quantize.rtn import quant_params, rtn
from quantize.sequential import (LAYERS_PREFIX, compare_errors, layer_sites, output_errors, quantize_model)

SEQLEN = 256
N_CALIB, N_HELD = 16, 8


def _group_size(spec) -> int:
    """The largest of 128/64/32 dividing every quantized input width of the model."""
    t = spec.text
    widths = {t.hidden_size, t.intermediate_size, t.num_heads * t.head_dim, t.linear_v_dim}
    return next(g for g in (128, 64, 32) if all(w % g == 0 for w in widths))


@pytest.fixture(scope="module")
def base_model(tiny_ckpt):
    from convert.gguf.imatrix import load_reference_model

    return load_reference_model(tiny_ckpt, quiet=True)


@pytest.fixture(scope="module")
def calib(tiny_ckpt):
    from quantize.calibration import load_calibration

    samples, _ = load_calibration("default", tokenizer=tiny_ckpt.tokenizer, n=N_CALIB + N_HELD, seqlen=SEQLEN, seed=0)
    return samples[:N_CALIB], samples[N_CALIB:]  # calibration, held out


@pytest.fixture(scope="module")
def results(tiny_ckpt, base_model, calib):
    gs = _group_size(tiny_ckpt.spec)
    sym, asym = Scheme(4, gs, sym=True), Scheme(4, gs, sym=False)
    cal, _ = calib
    run = {"rtn-sym": ("rtn", sym), "gptq": ("gptq", sym), "rtn-asym": ("rtn", asym), "awq": ("awq", asym)}
    return {k: quantize_model(tiny_ckpt, m, s, cal, seqlen=SEQLEN, model=copy.deepcopy(base_model), quiet=True)
            for k, (m, s) in run.items()}


@pytest.fixture(scope="module")
def errors(tiny_ckpt, base_model, results, calib):
    _, held = calib
    return output_errors(tiny_ckpt, results, held, seqlen=SEQLEN, model=base_model, quiet=True)


@pytest.mark.parametrize("method,baseline", [("gptq", "rtn-sym"), ("awq", "rtn-asym")])
def test_output_error_below_rtn(results, errors, method, baseline):
    res = results[method]
    assert len(res.weights) == len(results[baseline].weights) == 25  # 3 GDN x 6 + 1 attention x 7
    assert not any(n.endswith(("in_proj_a", "in_proj_b")) for n in res.weights)
    c = compare_errors(errors[method], errors[baseline])
    norm = compare_errors({k: v ** 0.5 for k, v in errors[method].items()},
                          {k: v ** 0.5 for k, v in errors[baseline].items()})
    print(f"\n{method} vs {baseline} ({res.scheme.bits}-bit g{res.scheme.group_size}, {res.stats['tokens']} tokens, "
          f"{res.stats['seconds']:.1f} s): squared error ratio {c['ratio']:.3f}, norm ratio {norm['ratio']:.3f}, "
          f"better on {c['better']}/{c['count']}")
    assert c["ratio"] <= 0.8 and norm["ratio"] <= 0.8  # >= 20% below RTN, squared or plain
    assert c["better_fraction"] >= 0.9


# ---------------------------------------------------------------------------------------------
# AWQ fold


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits[0].float()


def _ids(spec, n: int = 48, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, min(spec.text.vocab_size, 1000), (1, n), generator=g)


def _assert_same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    rel = float((a - b).abs().max() / a.abs().max())
    print(f"\n{what}: max |logit diff| / max |logit| = {rel:.2e}")
    assert rel < 1e-4


def test_awq_dense_updates_preserve_the_model(tiny_ckpt, base_model, results):
    """The folded float model (AWQ's dense updates, no quantization) computes the original logits."""
    upd = results["awq"].dense_updates
    for_ckpt = results["awq"].dense_for_checkpoint()  # what a quantized checkpoint writer takes
    assert for_ckpt and not any(k.removesuffix(".weight") in results["awq"].weights for k in for_ckpt)
    norms = [n for n in upd if n.endswith(("layernorm.weight", "linear_attn.norm.weight"))]
    assert norms and any(n.endswith("in_proj_a.weight") for n in upd)
    folded = copy.deepcopy(base_model)
    sd = folded.state_dict()
    assert any(not torch.equal(sd[n].float(), upd[n]) for n in norms)
    missing = set(upd) - set(sd)
    assert not missing
    folded.load_state_dict(upd, strict=False)
    ids = _ids(tiny_ckpt.spec)
    _assert_same(_logits(base_model, ids), _logits(folded, ids), "tiny, AWQ dense updates")


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_low_memory_run_is_the_float32_run(tiny_ckpt, calib, results, method):
    """Loaded by quantize_model itself, the model is held in the checkpoint's bfloat16 and widened
    to float32 part by part (and freed): the same quantized weights, scales and folded tensors as
    the run on a float32 model (the `results` fixture)."""
    from runtimes.lazy_weights import storage_dtype

    assert storage_dtype(tiny_ckpt) == "bfloat16"
    ref = results[method]
    cal, _ = calib
    got = quantize_model(tiny_ckpt, method, ref.scheme, cal, seqlen=SEQLEN, quiet=True, keep_folded=False)
    assert got.weights.keys() == ref.weights.keys()
    for n, qw in got.weights.items():
        r = ref.weights[n]
        assert torch.equal(qw.dequantize(), r.dequantize()), n
    assert got.stats["tokens"] == ref.stats["tokens"]
    for a, b in ((got.in_scales, ref.in_scales), (got.out_scales, ref.out_scales)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # keep_folded=False keeps exactly what a checkpoint writer takes
    assert got.dense_updates.keys() == ref.dense_for_checkpoint().keys()
    assert all(torch.equal(v, ref.dense_updates[k]) for k, v in got.dense_updates.items())


def test_gptq_mixer_replay_changes_nothing(tiny_ckpt, base_model, calib, results, monkeypatch):
    """GPTQ's later passes replay each layer's attention output instead of recomputing it; with the
    replay refused (every pass runs attention) the quantized weights are bit for bit the same."""
    import quantize.sequential as seq

    real = seq._collect_mixer_output
    offered = []

    def no_replay(*a, **k):
        st, replay = real(*a, **k)
        offered.append(replay is not None)
        return st, None

    monkeypatch.setattr(seq, "_collect_mixer_output", no_replay)
    ref = results["gptq"]
    cal, _ = calib
    got = quantize_model(tiny_ckpt, "gptq", ref.scheme, cal, seqlen=SEQLEN, model=copy.deepcopy(base_model), quiet=True)
    assert len(offered) == tiny_ckpt.spec.text.num_layers and all(offered)  # both layer types can replay
    for n, qw in got.weights.items():
        assert torch.equal(qw.dequantize(), ref.weights[n].dequantize()), n


def _fold_random(model, spec, seed: int, *, interleave_tie: bool = False) -> None:
    g = torch.Generator().manual_seed(seed)
    for li, layer in enumerate(model.model.language_model.layers):
        for site in layer_sites(spec, spec.text.layer_types[li]):
            if site.fold is None:
                continue
            n = layer.get_submodule(site.linears[0]).in_features // site.tie
            s = torch.exp(torch.empty(n).uniform_(-0.7, 0.7, generator=g))
            group = FoldGroup(site.smooth, site.fold, site.linears, (), site.tie)
            if interleave_tie and site.tie > 1:  # the wrong layout: each channel repeated per head in a row
                layer.get_submodule(site.smooth).weight.data /= s
                for ln in site.linears:
                    layer.get_submodule(ln).weight.data *= s.repeat_interleave(site.tie)[None, :]
                continue
            fold_scale(layer, group, s)


@pytest.mark.parametrize("preset", ["tiny", "tiny-alt"])
def test_awq_fold_is_exact(request, preset):
    """Random scales folded into every group (offset norms, the head-tied gated norm, up->down)."""
    from convert import Checkpoint
    from convert.gguf.imatrix import load_reference_model

    ckpt = Checkpoint(request.getfixturevalue("tiny_dir" if preset == "tiny" else "tiny_alt_dir"))
    spec = ckpt.spec
    model = load_reference_model(ckpt, quiet=True)
    ids = _ids(spec)
    ref = _logits(model, ids)
    folded = copy.deepcopy(model)
    _fold_random(folded, spec, seed=1)
    _assert_same(ref, _logits(folded, ids), f"{preset}, random AWQ scales folded")
    if preset == "tiny-alt":
        assert spec.text.linear_num_value_heads // spec.text.linear_num_key_heads == 3
        wrong = copy.deepcopy(model)
        _fold_random(wrong, spec, seed=1, interleave_tie=True)
        diff = float((_logits(wrong, ids) - ref).abs().max() / ref.abs().max())
        assert diff > 1e-3  # the tie layout matters, so the check above is meaningful


# ---------------------------------------------------------------------------------------------
# GPTQ bookkeeping


def _crafted(seed: int = 0):
    """Correlated inputs with 16 loud channels at the end of the column order (act-order's case)."""
    g = torch.Generator().manual_seed(seed)
    n_in, n_out, n_tok = 256, 64, 2048
    x = torch.randn(n_tok, 32, generator=g) @ torch.randn(32, n_in, generator=g) / 32 ** 0.5
    x = x + 0.1 * torch.randn(n_tok, n_in, generator=g)
    x[:, -16:] *= 20.0
    lin = torch.nn.Linear(n_in, n_out, bias=False)
    with torch.no_grad():
        lin.weight.copy_(0.05 * torch.randn(n_out, n_in, generator=g))
    return lin, x


def _gptq_error(lin, x, scheme):
    g = GPTQ(lin, "crafted")
    g.add_batch(x[:1000])
    g.add_batch(x[1000:])  # two batches: the running average must equal one big batch
    qw = g.quantize(scheme)
    d = (lin.weight.detach() - qw.dequantize()).double()
    return qw, g, float(((d @ (x.T.double() @ x.double())) * d).sum())


@pytest.mark.parametrize("act_order,static", [(False, False), (True, False), (True, True), (False, True)])
def test_gptq_dequantize_matches_the_algorithm(act_order, static):
    lin, x = _crafted()
    scheme = Scheme(4, 64, sym=True, act_order=act_order, static_groups=static)
    qw, g, _ = _gptq_error(lin, x, scheme)
    assert torch.equal(qw.dequantize(), g.dequantized)
    assert int(qw.q.max()) <= 15 and qw.scales.shape == (64, 4) and bool((qw.zeros == 8).all())
    counts = torch.bincount(qw.g_idx.long(), minlength=4)
    assert counts.tolist() == [64] * 4
    monotonic = bool((qw.g_idx[1:] >= qw.g_idx[:-1]).all())
    assert monotonic == (not act_order or static)  # act-order without static groups gathers scales


def test_gptq_act_order_helps_on_outlier_columns():
    lin, x = _crafted()
    _, _, plain = _gptq_error(lin, x, Scheme(4, 64, sym=True))
    _, _, act = _gptq_error(lin, x, Scheme(4, 64, sym=True, act_order=True))
    _, _, act_static = _gptq_error(lin, x, Scheme(4, 64, sym=True, act_order=True, static_groups=True))
    rtn_w = rtn(lin.weight, Scheme(4, 64, sym=True), "crafted").dequantize()
    d = (lin.weight.detach() - rtn_w).double()
    base = float(((d @ (x.T.double() @ x.double())) * d).sum())
    print(f"\nGPTQ error / RTN: plain {plain / base:.3f}, act-order {act / base:.3f}, "
          f"act-order+static {act_static / base:.3f}")
    assert plain < base and act <= plain and act_static <= plain


def test_gptq_with_isotropic_hessian_is_rtn():
    """With uncorrelated, equally loud inputs no error is propagated: GPTQ reduces to RTN."""
    lin, _ = _crafted()
    g = GPTQ(lin, "iso")
    g.set_hessian(torch.eye(256, dtype=torch.float64) * 100, 100)
    for sym in (True, False):
        scheme = Scheme(4, 64, sym=sym)
        assert torch.allclose(g.quantize(scheme, damp=0.0).dequantize(), rtn(lin.weight, scheme, "iso").dequantize())


def test_quant_params_conventions():
    w = torch.tensor([[-1.0, 0.5, 2.0], [0.5, 1.0, 1.5], [0.0, 0.0, 0.0]])
    s, z = quant_params(w, Scheme(4, 3, sym=True))
    assert torch.allclose(s, torch.tensor([4 / 15, 3 / 15, 2 / 15])) and bool((z == 8).all())
    s, z = quant_params(w, Scheme(4, 3, sym=False))
    assert torch.allclose(s, torch.tensor([3 / 15, 1.5 / 15, 2 / 15]))  # range [min(w, 0), max(w, 0)]
    assert z[:2].tolist() == [5.0, 0.0]  # round(1 / 0.2), and a group without negatives
    assert s[2] > 0 and z[2] in (7.0, 8.0)  # all-zero group: range [-1, 1], never scale 0


# ---------------------------------------------------------------------------------------------
# errors a user can cause


def test_group_size_must_divide(tiny_ckpt, base_model, calib):
    with pytest.raises(ConvertError, match=rf"{LAYERS_PREFIX}\.0\.linear_attn\.in_proj_qkv"):
        quantize_model(tiny_ckpt, "gptq", Scheme(4, 96), calib[0], seqlen=SEQLEN, model=base_model, quiet=True)
    with pytest.raises(ConvertError, match="does not divide"):
        quantize_model(tiny_ckpt, "rtn", Scheme(4, 96), model=base_model, quiet=True)


def test_nan_activations(tiny_ckpt, base_model, calib):
    model = copy.deepcopy(base_model)
    with torch.no_grad():
        model.model.language_model.layers[1].input_layernorm.weight[3] = float("nan")
    with pytest.raises(ConvertError, match=r"non-finite.*layers\.1\.linear_attn\.in_proj_qkv"):
        quantize_model(tiny_ckpt, "awq", Scheme(4, 128, sym=False), calib[0][:4], seqlen=SEQLEN, model=model,
                       quiet=True)


def test_too_few_calibration_tokens(tiny_ckpt, base_model, calib):
    with pytest.raises(ConvertError, match=r"needs at least 512 calibration tokens.*down_proj"):
        quantize_model(tiny_ckpt, "gptq", Scheme(4, 128), calib[0][:1], seqlen=SEQLEN, model=base_model, quiet=True)


def test_gptq_options_rejected_for_awq(tiny_ckpt, base_model, calib):
    with pytest.raises(ConvertError, match="act-order"):
        quantize_model(tiny_ckpt, "awq", Scheme(4, 128, act_order=True), calib[0], seqlen=SEQLEN, model=base_model,
                       quiet=True)
