"""Synthetic weights that behave like trained ones where a converter or quantizer can tell.

Text: the residual stream lives mostly in a random rank-r subspace P plus a few "massive" channels
(constant across tokens, as in real LLMs). Readers (q/k/v, in_proj, gate/up) read P, writers
(o_proj, out_proj, down_proj) write P, tied embeddings are rows of P plus noise; low rank makes
quantization noise small next to the signal. One calibration pass on random tokens then scales
each writer so its block adds a set fraction of the stream (big for layer 0, which makes the
prediction differ from the input token; small after, so quantization noise stays bounded), and
the final norm so that predictions are confident. The vision tower is calibrated the same way.
"""

from __future__ import annotations

import math

import torch

# Knobs, tuned on tiny and on a 24-layer model (see the behaviour report for what they buy).
H = {
    "rank_div": 16, "rank_min": 16, "eps": 0.2,  # residual subspace rank d/16 (>= 16); share of full-rank noise
    "mass": 6.0, "mass_ch": 512,  # one massive channel per 512 dims, 6 x the embeddings' RMS
    "norm_out": (3.0, 6.0), "norm_out_ch": 128,  # (1+w) of a few norm channels (1 per 128) in 3..6
    "f0": 2.0, "f0_mix": 0.5, "f_mix": 0.08, "f_mlp": 0.1,  # block output / stream RMS: layer 0, then the rest
    "conf": 0.8,  # mean top-1 probability the final norm is set for (on random tokens)
    "gate": 1.5, "up": 1.0, "qk": 1.0, "v": 1.0, "a": 0.5, "b": 1.0, "z": 1.0,  # reader output RMS
    "qk_norm": 1.3, "pos": 1.0,  # attention sharpness; positional / content energy of q and k
    "conv_prev": 0.4, "strong": 0.02, "strong_gain": 3.0,  # conv taps before the current token; hot neurons
    # vision: small, sharp attention updates (a deep stack of diffuse ones collapses every token
    # to one common vector), position embeddings and LayerNorm biases big enough to matter
    "f_vis": 0.3, "f_vis_attn": 0.15, "vis_qk": 3.0, "vis_pos": 0.6, "vis_ln_bias": 0.2,
    "cal_len": 128,  # tokens in the text calibration pass
}


def _rn(g, *shape, std=1.0):
    return torch.randn(*shape, generator=g) * std


class _Text:
    def __init__(self, ts, g):
        self.g, d = g, ts.hidden_size
        self.d, self.r = d, min(d, max(H["rank_min"], d // H["rank_div"]))
        self.P = torch.linalg.qr(_rn(g, d, self.r))[0]
        n = max(1, d // H["mass_ch"])
        self.mass = torch.randperm(d, generator=g)[:n]
        self.mass_sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)

    def reader(self, out, gain):
        """(out, d) weight reading P out of a unit-RMS input; outputs have RMS ~gain."""
        a = _rn(self.g, out, self.r) @ self.P.T + H["eps"] * _rn(self.g, out, self.d) * math.sqrt(self.r / self.d)
        return gain * a / math.sqrt(self.d)

    def writer(self, n_in):
        """(d, n_in) weight writing into P (the calibration pass sets its scale)."""
        w = self.P @ _rn(self.g, self.r, n_in) + H["eps"] * _rn(self.g, self.d, n_in) * math.sqrt(self.r / self.d)
        return w / math.sqrt(n_in)

    def offset_norm(self, dim, outliers=True):
        """w of a (1 + w) RMSNorm: near 1, with a few large channels (outlier inputs of the next linear)."""
        w = _rn(self.g, dim, std=0.1)
        if outliers:
            k = max(2, dim // H["norm_out_ch"])
            lo, hi = H["norm_out"]
            w[torch.randperm(dim, generator=self.g)[:k]] = lo - 1 + (hi - lo) * torch.rand(k, generator=self.g)
        return w


def _text(lm, ts, t, live):
    g, d, V = t.g, ts.hidden_size, ts.vocab_size
    emb = (_rn(g, V, t.r) @ t.P.T) * math.sqrt(d / t.r) + H["eps"] * _rn(g, V, d)
    emb[:, t.mass] = H["mass"] * t.mass_sign * (1 + _rn(g, V, len(t.mass), std=0.05))
    dead = torch.ones(V, dtype=torch.bool)
    dead[live] = False
    emb[dead] = _rn(g, int(dead.sum()), d, std=0.05)  # rows no text maps to: small, never predicted
    lm.embed_tokens.weight.copy_(emb)
    for i, layer in enumerate(lm.layers):
        layer.input_layernorm.weight.copy_(t.offset_norm(d))
        layer.post_attention_layernorm.weight.copy_(t.offset_norm(d))
        if ts.layer_types[i] == "linear_attention":
            _gdn(layer.linear_attn, ts, t)
        else:
            _attn(layer.self_attn, ts, t, i)
        I = ts.intermediate_size
        gain = torch.ones(I, 1)  # a few neurons that fire hard: outlier inputs of down_proj
        gain[torch.randperm(I, generator=g)[: max(1, int(I * H["strong"]))]] = H["strong_gain"]
        layer.mlp.gate_proj.weight.copy_(t.reader(I, H["gate"]) * gain)
        layer.mlp.up_proj.weight.copy_(t.reader(I, H["up"]) * gain.sqrt())
        layer.mlp.down_proj.weight.copy_(t.writer(I))
    lm.norm.weight.copy_(t.offset_norm(d, outliers=False))


def _gdn(la, ts, t):
    g, nv, dv, qk, vd = t.g, ts.linear_num_value_heads, ts.linear_value_head_dim, ts.linear_qk_dim, ts.linear_v_dim
    la.in_proj_qkv.weight.copy_(torch.cat([t.reader(qk, H["qk"]), t.reader(qk, H["qk"]), t.reader(vd, H["v"])]))
    la.in_proj_z.weight.copy_(t.reader(vd, H["z"]))
    la.in_proj_a.weight.copy_(t.reader(nv, H["a"]))
    la.in_proj_b.weight.copy_(t.reader(nv, H["b"]))  # beta = sigmoid(b): mostly 0.2..0.8
    # per-head decay exp(-exp(A_log) * softplus(a + dt_bias)): mostly 0.6..0.96 per step
    la.A_log.copy_(torch.empty(nv).uniform_(0.0, math.log(8.0), generator=g))
    dt = torch.empty(nv).uniform_(0.005, 0.08, generator=g)
    la.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
    conv = _rn(g, *la.conv1d.weight.shape, std=H["conv_prev"])
    conv[..., -1] += 1.0  # the current token dominates, earlier taps mix in local context
    la.conv1d.weight.copy_(conv)
    w = 1 + _rn(g, dv, std=0.1)
    w[torch.randperm(dv, generator=g)[:2]] *= 4  # plain-w gated norm: outlier inputs of out_proj
    la.norm.weight.copy_(w)
    la.out_proj.weight.copy_(t.writer(vd))


def _attn(sa, ts, t, i):
    nh, nkv, hd, rd = ts.num_heads, ts.num_kv_heads, ts.head_dim, ts.rope_dim
    q = t.reader(nh * hd * 2, H["qk"]).view(nh, 2, hd, -1)  # per head: query rows, then gate rows
    k = t.reader(nkv * hd, H["qk"]).view(nkv, hd, -1)
    # a positional part fed by a massive channel: rotary pairs phased so that q_i . k_j peaks at
    # j = i - 1 (a previous-token head, as much energy as the content part), so that a RoPE
    # mistake in a converter changes the output. The channel's normed value is ~mass / stream RMS.
    half, c = rd // 2, t.mass[0]
    freq = ts.rope_theta ** (-torch.arange(half) * 2.0 / rd)
    use = (freq > 0.05).float()
    grow = math.sqrt((1 + H["f0_mix"] ** 2) * (1 + H["f0"] ** 2)) if i else 1.0  # stream RMS after layer 0
    amp = use * H["pos"] * math.sqrt(hd / use.sum()) * grow / H["mass"] * t.mass_sign[0]
    amp = amp * torch.linspace(1.5, 0.5, nkv).view(nkv, 1, 1)  # from positional to content heads
    phi = torch.rand(nkv, 1, half, generator=t.g) * 2 * math.pi
    q[:, 0, :half, c] += (amp * torch.cos(phi)).expand(nkv, nh // nkv, half).reshape(nh, half)
    q[:, 0, half:rd, c] += (amp * torch.sin(phi)).expand(nkv, nh // nkv, half).reshape(nh, half)
    k[:, :half, c] += (amp * torch.cos(phi + freq))[:, 0]  # k leads q by one step
    k[:, half:rd, c] += (amp * torch.sin(phi + freq))[:, 0]
    sa.q_proj.weight.copy_(q.reshape(nh * hd * 2, -1))
    sa.k_proj.weight.copy_(k.reshape(nkv * hd, -1))
    v = t.reader(nkv * hd, H["v"])
    v[torch.randperm(nkv * hd, generator=t.g)[:2]] *= 4  # value outliers: outlier inputs of o_proj
    sa.v_proj.weight.copy_(v)
    sa.q_norm.weight.copy_(t.offset_norm(hd, outliers=False) + H["qk_norm"] - 1)
    sa.k_norm.weight.copy_(t.offset_norm(hd, outliers=False) + H["qk_norm"] - 1)
    sa.o_proj.weight.copy_(t.writer(nh * hd))


def _scaler(state, writer, frac=None, target=None, keep=None):
    """Forward hook: scale `writer` (whose output, less its bias, is the block's output) so the
    output RMS is frac x the residual's RMS (or `target`); rounded to 2^(k/16) so that tiny
    float differences between machines cannot change the weights."""
    rms = lambda x: float((x if keep is None else x[..., keep]).pow(2).mean().sqrt())

    def hook(mod, args, out):
        o = out[0] if isinstance(out, tuple) else out
        b = 0 if getattr(writer, "bias", None) is None else writer.bias
        want = target if frac is None else frac * rms(state["res"])
        s = 2 ** (round(16 * math.log2(want / rms(o - b))) / 16)
        writer.weight.mul_(s)
        o = (o - b) * s + b
        if frac is not None and state["res"].shape == o.shape:
            state["res"] = state["res"] + o
        return (o, *out[1:]) if isinstance(out, tuple) else o
    return hook


def _calibrate_text(model, ts, t, g, live):
    lm, state, hooks = model.model.language_model, {}, []
    keep = torch.ones(ts.hidden_size, dtype=torch.bool)
    keep[t.mass] = False
    for i, layer in enumerate(lm.layers):
        hooks.append(layer.register_forward_pre_hook(lambda m, a: state.__setitem__("res", a[0])))
        lin = ts.layer_types[i] == "linear_attention"
        mix = layer.linear_attn if lin else layer.self_attn
        f_mix, f_mlp = (H["f0_mix"], H["f0"]) if i == 0 else (H["f_mix"], H["f_mlp"])
        hooks.append(mix.register_forward_hook(_scaler(state, mix.out_proj if lin else mix.o_proj, f_mix, keep=keep)))
        hooks.append(layer.mlp.register_forward_hook(_scaler(state, layer.mlp.down_proj, f_mlp, keep=keep)))
    ids = live[torch.randint(len(live), (1, H["cal_len"]), generator=g)]
    hn = model.model(input_ids=ids, use_cache=False).last_hidden_state[0]
    for h in hooks:
        h.remove()
    logits = hn @ model.lm_head.weight.T
    lo, hi = -4.0, 8.0  # bisect log2 of the final norm's gain for the wanted confidence
    for _ in range(20):
        mid = (lo + hi) / 2
        p = (logits * 2**mid).softmax(-1).amax(-1).mean()
        lo, hi = (mid, hi) if p < H["conf"] else (lo, mid)
    lm.norm.weight.copy_((1 + lm.norm.weight) * 2 ** (round(16 * lo) / 16) - 1)


def smooth_image(g, size, channels=3):
    """(C, size, size) in [-1, 1]: a few random plane waves per channel, like a blurry photo."""
    yx = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")).view(2, -1) / size
    waves = torch.sin(_rn(g, channels, 4, 2, std=6.0).matmul(yx) + torch.rand(channels, 4, 1, generator=g) * 6.3)
    return torch.tanh(waves.sum(1)).view(channels, size, size)


def patchify(img, p):
    """(C, H, W) -> (1, C, p, H*W/p), the processor's NaViT layout (row-major patches)."""
    c = img.shape[0]
    x = torch.nn.functional.unfold(img[None], (p, p), stride=(p, p)).reshape(c, p, p, -1)
    return x.permute(0, 1, 3, 2).reshape(1, c, p, -1)


def _vision(model, spec, g, t):
    """SigLIP-like tower: smooth position embeddings, near-1 LayerNorms with biases and a few
    large channels, non-zero biases everywhere; one pass on a smooth random image scales each
    block to add H['f_vis'] x the stream, and the merger's output to unit RMS inside P."""
    vt, merger, vs = model.model.vision_tower, model.model.merger, spec.vision
    for name, p in list(vt.named_parameters()) + list(merger.named_parameters()):
        if p.ndim == 1 and "norm" in name:
            w = name.endswith("weight")
            p.copy_(_rn(g, p.numel(), std=0.1 if w else H["vis_ln_bias"]) + w)
            p[torch.randperm(p.numel(), generator=g)[: max(1, p.numel() // 256)]] *= 3 if w else 1.5
        elif p.ndim == 1:
            p.copy_(_rn(g, p.numel(), std=0.05))
        else:
            p.copy_(_rn(g, *p.shape, std=1 / math.sqrt(p[0].numel())))
            if name.endswith(("fc2.weight", "linear_2.weight")):
                p.sub_(p.mean(1, keepdim=True))  # GELU outputs share a positive mean: keep it out
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(H["vis_qk"])  # attention that picks tokens rather than averaging them
    side, dim = vs.image_size // vs.patch_size, vs.hidden_size
    yx = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).view(-1, 2) / side
    pos = torch.sin(yx @ _rn(g, 2, dim, std=4.0) + torch.rand(dim, generator=g) * 6.3)
    vt.embeddings.position_embedding.weight.copy_(H["vis_pos"] * pos + _rn(g, *pos.shape, std=0.05))
    lin2 = merger.mlp[-1].linear_2
    lin2.weight.copy_(t.writer(lin2.in_features))
    lin2.weight.sub_(lin2.weight.mean(1, keepdim=True))
    lin2.bias[t.mass] = H["mass"] * t.mass_sign  # image tokens carry the massive channels too
    state, f = {}, H["f_vis"]
    hooks = [m.register_forward_pre_hook(lambda m, a: state.__setitem__("res", a[0]))
             for m in [*vt.encoder.layers, vt.vit_merger]]
    blocks = [(l.self_attn, l.self_attn.out_proj, H["f_vis_attn"]) for l in vt.encoder.layers]
    blocks += [(l.mlp, l.mlp.fc2, f) for l in vt.encoder.layers]
    vm = vt.vit_merger  # its MLP replaces the 2x2 window by (mean + MLP): a full-size update
    blocks += [(vm.self_attn, vm.self_attn.out_proj, f), (vm.linear_2, vm.linear_2, 1.0)]
    hooks += [mod.register_forward_hook(_scaler(state, w, frac)) for mod, w, frac in blocks]
    keep = torch.ones(lin2.out_features, dtype=torch.bool)
    keep[t.mass] = False
    hooks.append(lin2.register_forward_hook(_scaler(state, lin2, target=1.0, keep=keep)))
    img = smooth_image(g, 16 * vs.patch_size, vs.num_channels)
    model.model.get_image_features(patchify(img, vs.patch_size), torch.tensor([[16, 16]]))
    for h in hooks:
        h.remove()


def init_weights(model, spec, *, seed: int, quiet: bool = False, live_tokens=None) -> None:
    """Deterministic in `seed`. `live_tokens`: ids the tokenizer can produce (default: all); the
    other embedding rows stay small, as in a trained model whose vocabulary was padded."""
    g = torch.Generator().manual_seed(seed)
    V = spec.text.vocab_size
    live = torch.arange(V) if live_tokens is None else torch.as_tensor(sorted(set(live_tokens)))
    with torch.no_grad():
        t = _Text(spec.text, g)
        _text(model.model.language_model, spec.text, t, live)
        if model.lm_head.weight is not model.model.language_model.embed_tokens.weight:
            model.lm_head.weight.copy_(model.model.language_model.embed_tokens.weight)
        _calibrate_text(model, spec.text, t, g, live)
        _vision(model, spec, g, t)
        for p in model.parameters():  # bf16-representable: the saved bf16 checkpoint is this model
            p.copy_(p.to(torch.bfloat16).float())
    if not quiet:
        print(f"synthetic weights: seed {seed}, residual rank {t.r} of {t.d}, {len(live)} live tokens")
