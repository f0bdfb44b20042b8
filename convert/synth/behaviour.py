"""Behaviour report of a synthetic model: does it act like a trained one where a converter or a
quantizer can tell the difference? Figures on a fixed chat prompt (see `TARGETS`)."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

# target name -> (threshold, ">=" or "<="); rep["checks"] says which pass. Q4 is thresholded on
# asymmetric min/max groups of 128; the symmetric variant is reported beside it.
TARGETS = {
    "mlp_ablation_flip_min": (0.10, ">="),
    "q8_block32_sym_agreement": (0.97, ">="),
    "q4_group128_asym_agreement": (0.70, ">="),
    "mean_top1_prob": (0.50, ">="),
    "copy_fraction": (0.50, "<="),
    "context_free_agreement": (0.50, "<="),
}
MIN_TOKENS = MAX_TOKENS = 256

PASSAGES = [
    ("Explain how a lighthouse keeper kept the lamp burning through a winter storm.",
     ("Before dusk the keeper trimmed the wicks, polished the brass and carried oil up the spiral stairs. "
     "When the wind rose he wound the clockwork that turned the lens every few minutes, and between "
     "rounds he wrote the barometer readings, the colour of the sea and the ships he saw in the log.")),
    ("What should I pack for three days of hiking in the mountains in early autumn?",
     ("Bring layers rather than one heavy coat: a thin wool base, a fleece, and a waterproof shell. "
     "Add a warm hat, gloves, two pairs of socks, a head torch with spare batteries, a map, water "
     "purification tablets, and food that does not need cooking, such as nuts, cheese and dried fruit.")),
    ("Summarise why bread dough needs to rest before baking.",
     ("Resting lets the gluten relax so the dough stretches without tearing, and it gives the yeast "
     "time to ferment sugars into gas and flavour. A slow, cool rise of 12 to 18 hours gives a more "
     "open crumb and a deeper taste than a quick warm one.")),
]


def prompt_ids(tokenizer) -> torch.Tensor:
    """One multi-turn ChatML conversation, repeated until long enough, cut to MAX_TOKENS."""
    turns = "".join(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n" for q, a in PASSAGES)
    text = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" + turns
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    while len(ids) < MIN_TOKENS:  # a tokenizer with a large vocabulary gives fewer tokens
        ids = ids + ids
    return torch.tensor([ids[:MAX_TOKENS]])


def _decoder_linears(model):
    lm = model.model.language_model
    return {n: m for n, m in lm.layers.named_modules() if isinstance(m, torch.nn.Linear)}


def _q8(w):  # symmetric round-to-nearest, blocks of 32 along the input dim
    return _blockwise(w, 32, lambda b: (b / (s := b.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127)).round() * s)


def _q4(w, sym=False):  # round-to-nearest, groups of 128 along the input dim
    def q(b):
        if sym:
            s = b.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 7
            return (b / s).round().clamp(-8, 7) * s
        lo, hi = b.amin(-1, keepdim=True), b.amax(-1, keepdim=True)
        s = ((hi - lo) / 15).clamp_min(1e-12)
        z = (-lo / s).round()
        return ((b / s).round() + z).clamp(0, 15).sub(z) * s
    return _blockwise(w, 128, q)


def _blockwise(w, n, fn):
    out, k = w.shape
    pad = (-k) % n
    b = F.pad(w.float(), (0, pad)).view(out, -1, n)
    return fn(b).view(out, -1)[:, :k].to(w.dtype)


def _act_stats(x: torch.Tensor) -> dict:
    """Effective rank (exp of the entropy of the normalised singular values, and the 90%-energy
    rank) as fractions of min(dim, tokens), and max / median channel RMS."""
    x = x.reshape(-1, x.shape[-1]).double()
    s = torch.linalg.svdvals(x)
    p = s / s.sum()
    erank = float(torch.exp(-(p * p.clamp_min(1e-30).log()).sum()))
    e = (s * s).cumsum(0) / (s * s).sum()
    r90 = int((e < 0.9).sum()) + 1
    rms = x.pow(2).mean(0).sqrt()
    dim = x.shape[-1]
    return {"erank_frac": erank / min(dim, x.shape[0]), "rank90_frac": r90 / min(dim, x.shape[0]),
            "outlier_ratio": float(rms.max() / rms.median().clamp_min(1e-12))}


@contextmanager
def _edited(edits):
    """Temporarily replace parameters: edits = [(param, fn)], each param set to fn(param)."""
    saved = [p.detach().clone() for p, _ in edits]
    for p, fn in edits:
        p.copy_(fn(p))
    try:
        yield
    finally:
        for (p, _), v in zip(edits, saved):
            p.copy_(v)


def _run(model, ids, **kw):
    logits = model(input_ids=ids, use_cache=False, **kw).logits.float()
    return logits.argmax(-1).view(-1), logits.view(-1, logits.shape[-1])


def _run_from(model, calls, start):
    """Top-1 of the stack re-run from layer `start` on its recorded input (the layers before
    it are unchanged, so this is the full forward at a fraction of the cost)."""
    lm = model.model.language_model
    h = calls[start][0][0]
    for i in range(start, len(lm.layers)):
        args, kw = calls[i]
        h = lm.layers[i](h, *args[1:], **kw)
    return model.lm_head(lm.norm(h)).argmax(-1).view(-1)


def _mistakes(model, ts) -> dict:
    """Parameter edits that mimic converter mistakes; on a sane model each flips many predictions."""
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5RMSNorm

    lm = model.model.language_model
    gdn = [layer.linear_attn for layer in lm.layers if hasattr(layer, "linear_attn")]
    offset_norms = [m.weight for m in lm.modules() if isinstance(m, Qwen3_5RMSNorm)]
    out = {"norm_without_plus_one": [(w, lambda w: w - 1) for w in offset_norms],
           "A_log_used_as_A": [(m.A_log, lambda a: a.clamp_min(1e-6).log()) for m in gdn]}
    nk, nv, dv = ts.linear_num_key_heads, ts.linear_num_value_heads, ts.linear_value_head_dim
    if gdn and nv != nk:  # V heads in tiled instead of grouped order: each meets the wrong K head
        perm = torch.arange(nv).view(nk, nv // nk).T.reshape(-1)
        v0 = 2 * ts.linear_qk_dim
        idx = torch.cat([torch.arange(v0), v0 + (perm[:, None] * dv + torch.arange(dv)).view(-1)])
        out["v_heads_reordered"] = [(p, lambda w: w[idx]) for m in gdn for p in (m.in_proj_qkv.weight, m.conv1d.weight)]
    return out


@torch.no_grad()
def behaviour_report(model, tokenizer, spec, quiet: bool = False) -> dict:
    """Measure the figures in TARGETS (and more) on the float model as given; the weights from
    `init_weights` are bf16-exact, so these are also the saved bf16 checkpoint's figures."""
    from tqdm import tqdm

    t0 = time.time()
    model.eval()
    ids = prompt_ids(tokenizer)
    lin = _decoder_linears(model)
    layers = model.model.language_model.layers
    acts, calls, hooks = {}, {}, []
    for name, m in lin.items():
        hooks.append(m.register_forward_pre_hook(lambda mod, a, n=name: acts.__setitem__(n, a[0])))
    for i, layer in enumerate(layers):  # each layer's inputs, to re-run the stack from any layer on
        record = lambda m, a, kw, i=i: calls.__setitem__(i, (a, kw))
        hooks.append(layer.register_forward_pre_hook(record, with_kwargs=True))
    base, logits = _run(model, ids)
    for h in hooks:
        h.remove()
    agree = lambda top: float((top == base).float().mean())
    rep = {"n_tokens": ids.shape[1], "mean_top1_prob": float(logits.softmax(-1).amax(-1).mean()),
           "copy_fraction": agree(ids[0]), "distinct_predictions": int(base.unique().numel())}
    del logits
    mistakes = _mistakes(model, spec.text)
    bar = tqdm(total=len(layers) + 7 + len(mistakes), desc="behaviour report", disable=quiet, leave=False)
    # does the prediction use the context (each token alone) and the positions (RoPE off)?
    rep["context_free_agreement"] = agree(_run(model, ids.view(-1, 1))[0])
    pos = torch.zeros(4, 1, ids.shape[1], dtype=torch.long)  # row 0: text positions (mask), rows 1-3: RoPE
    pos[0, 0] = torch.arange(ids.shape[1])
    rep["rope_off_flip"] = 1 - agree(_run(model, ids, position_ids=pos)[0])
    bar.update(2)

    flips = []
    for i, layer in enumerate(layers):
        h = layer.mlp.register_forward_hook(lambda mod, a, out: torch.zeros_like(out))
        flips.append(1 - agree(_run_from(model, calls, i)))
        h.remove()
        bar.update()
    rep["mlp_ablation_flip"], rep["mlp_ablation_flip_min"] = flips, min(flips)

    for key, fn in (("q8_block32_sym_agreement", _q8), ("q4_group128_asym_agreement", _q4),
                    ("q4_group128_sym_agreement", lambda w: _q4(w, sym=True))):
        with _edited([(m.weight, fn) for m in lin.values()]):
            rep[key] = agree(_run(model, ids)[0])
        bar.update()
    rep["converter_mistake_flip"] = {}
    for key, edits in mistakes.items():
        with _edited(edits):
            rep["converter_mistake_flip"][key] = 1 - agree(_run(model, ids)[0])
        bar.update()
    params = list(model.parameters())
    if params[0].dtype == torch.float32 and all(torch.equal(p, p.bfloat16().float()) for p in params):
        bufs = {n: b.clone() for n, b in model.named_buffers()}  # RoPE tables must come back exact
        model.to(torch.bfloat16)
        rep["bf16_compute_agreement"] = agree(_run(model, ids)[0])
        model.to(torch.float32)
        for n, b in model.named_buffers():
            b.copy_(bufs[n])
    bar.update()

    stats = {n: _act_stats(a) for n, a in acts.items()}
    kind = lambda n: n.split(".", 1)[1]
    rep["activation_stats"] = stats
    rep["activation_summary"] = {
        k: {f: float(torch.tensor([v[f] for n, v in stats.items() if kind(n) == k]).median())
            for f in ("erank_frac", "rank90_frac", "outlier_ratio")} for k in sorted({kind(n) for n in stats})}
    rep.update(_vision_report(model, spec, ref_rms=float(model.get_input_embeddings()(ids).pow(2).mean().sqrt())))
    bar.update()
    bar.close()
    rep["checks"] = {k: (rep[k] >= t if op == ">=" else rep[k] <= t) for k, (t, op) in TARGETS.items()}
    rep["seconds"] = round(time.time() - t0, 2)
    if not quiet:
        _print(rep)
    return rep


def _vision_report(model, spec, ref_rms) -> dict:
    """Image embeddings of two smooth random images: finite, moderate, content-dependent, and
    clearly changed by a converter-style mistake (cosine to the reference when one is made)."""
    from .weights import patchify, smooth_image

    vs, g = spec.vision, torch.Generator().manual_seed(1234)
    imgs = [patchify(smooth_image(g, 16 * vs.patch_size, vs.num_channels), vs.patch_size) for _ in range(2)]
    size = torch.tensor([[16, 16]])
    feats = lambda im: torch.cat(model.model.get_image_features(im, size).pooler_output).float()
    a, b = feats(imgs[0]), feats(imgs[1])
    cos = lambda x, y: float(F.cosine_similarity(x, y, dim=-1).mean())
    an = F.normalize(a, dim=-1)
    rep = {"vision_finite": bool(torch.isfinite(a).all()),
           "vision_rms_over_text": float(a.pow(2).mean().sqrt()) / ref_rms,
           "vision_cos_between_images": cos(a, b), "vision_cos_within_image": float((an @ an.T).mean())}
    vt = model.model.vision_tower
    lns = [m for m in (*vt.modules(), *model.model.merger.modules()) if isinstance(m, torch.nn.LayerNorm)]
    for name, params in (("no_position_embedding", [vt.embeddings.position_embedding.weight]),
                         ("no_layernorm_bias", [m.bias for m in lns])):
        with _edited([(p, torch.zeros_like) for p in params]):
            rep[f"vision_cos_{name}"] = cos(a, feats(imgs[0]))
    return rep


def _print(rep):
    print(f"behaviour report ({rep['n_tokens']} prompt tokens, {rep['seconds']} s):")
    for k, (t, op) in TARGETS.items():
        print(f"  {k:28s} {rep[k]:.3f}  (target {op} {t})  {'ok' if rep['checks'][k] else 'FAIL'}")
    print("  mlp ablation flips per layer:", " ".join(f"{f:.2f}" for f in rep["mlp_ablation_flip"]))
    print(f"  q4 sym agreement {rep['q4_group128_sym_agreement']:.3f}; bf16 compute agreement "
          f"{rep.get('bf16_compute_agreement', float('nan')):.3f}; distinct predictions {rep['distinct_predictions']}")
    flips = {"rope_off": rep["rope_off_flip"], **rep["converter_mistake_flip"]}
    print("  flips from converter mistakes:", ", ".join(f"{k} {v:.2f}" for k, v in flips.items()))
    print(f"  vision: finite {rep['vision_finite']}, rms/text {rep['vision_rms_over_text']:.2f}, cos between images "
          f"{rep['vision_cos_between_images']:.3f}, within {rep['vision_cos_within_image']:.3f}; cos to reference "
          f"if pos-embed dropped {rep['vision_cos_no_position_embedding']:.3f}, "
          f"if LN bias dropped {rep['vision_cos_no_layernorm_bias']:.3f}")
    print("  inputs of decoder linears, median over layers: erank, rank90 (of min(dim, tokens)), outlier ratio")
    for k, v in rep["activation_summary"].items():
        print(f"    {k:28s} {v['erank_frac']:.3f}  {v['rank90_frac']:.3f}  {v['outlier_ratio']:.1f}")
