"""AWQ (Lin et al. 2023) for MiniCPM-V 4.6's hybrid decoder: per-channel scale search, fold, clip.

A fold group is an operation that produces an activation (the "smooth" op: a norm or a linear)
and the linears that read it ("balance" linears). For a scale s over the input channels,

    y = W x = (W · diag(s)) (x / s)

so the balance linears' columns are multiplied by s and 1/s is folded into the smooth op; the
model computes the same function (up to float rounding) and only W · diag(s) is quantized.
Fold kinds (names as data in `FOLDS`; quantization.md §2.3):

* "offset_norm": Qwen3.5's RMSNorm computes norm(x)·(1 + w), so w' = (1 + w) / s - 1. Guard:
  channels whose gain |1 + w| is below `GAIN_EPS` times the largest carry (almost) no signal, so
  their x_mean is ~0 and the search would push s to its floor (1e-4); folding that makes the new
  gain (1 + w)/s depend on the last bits of w ≈ -1 (and of w' ≈ -1 once stored in bf16). Such
  channels keep s = 1 exactly (also for "gated_norm", whose gain is w).
* "gated_norm": the Gated DeltaNet output norm computes w·norm(o)·silu(z) with one w of length
  head_v_dim shared by all value heads, so s is tied across heads: the search runs on per-head
  averaged statistics, s has length head_v_dim, w' = w / s, and out_proj's columns get s repeated
  num_v_heads times (column h·head_v_dim + d is channel d of head h).
* "linear_rows": the smooth op is a linear (up_proj before down_proj, through act(gate) ⊙ up,
  which is linear in up): its rows (and bias) are divided by s.

Search (AutoAWQ `_search_best_scale`, duo scaling): x_mean = mean |x| per input channel over all
calibration tokens; w_mean = mean over the balance linears' rows of |W| / (max |W| of its
quantization group); for r = i/20, i = 0..19, s = x_mean^r / (w_mean^(1-r) + 1e-4), clamped to
≥ 1e-4 and normalised by sqrt(max(s)·min(s)). s = 1 is also a candidate, so the search never
picks a scale worse than none on its objective. Objective: the squared error of the balance
linears' own outputs over the calibration tokens (not the attention/MLP block output, which would
need the block re-run per candidate): with G = Σ x xᵀ and D = W - Q(W·diag(s))·diag(s)⁻¹ per
linear, Σ_tokens ‖W x - Q(W s)(x / s)‖² = tr(D G Dᵀ), computed exactly from G instead of on a
token sample. in_proj_b / in_proj_a (scaled, never quantized) contribute no error and only get
their columns scaled.

Clip (llm-awq `auto_clip_layer`): per output row and group, max_val = max|w|·(1 - i·0.5/20) for
i = 0..19 (max_shrink 0.5 in `CLIP_STEPS` steps; llm-awq tries every other one of these, step
0.05, and the finer grid measured 2% less output error on the tiny model); the weight clamped to
±max_val is quantized and the error of that row's group output, d_gᵀ G_g d_g (G_g the group's
diagonal block of G, i.e. all tokens rather than llm-awq's 512 sampled ones), picks the best. llm-awq skips linears whose
outputs feed attention scores (q/k) because its per-linear objective ignores that q and k errors
multiply; here every quantized linear is clipped (CLIP_SKIP, empty): on the tiny model clipping
q_proj, k_proj and in_proj_qkv too lowers the summed per-linear output-error norm from 0.81 to 0.79
of RTN's (tests/test_gptq_awq.py) and the KL to the reference from 0.60 to 0.55 of RTN's
(bench/hf_quant_quality.py, group size 64).

Asymmetric (zero point) quantization is AWQ's default; the scheme decides.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from convert.errors import ConvertError

from .qweight import QuantizedWeight, Scheme
from .rtn import dequantize_codes, fake_quant, group_size_for, quant_params, quantize_codes, rtn

__all__ = ["FOLDS", "GAIN_EPS", "N_GRID", "MAX_SHRINK", "CLIP_STEPS", "CLIP_SKIP", "FoldGroup", "search_scale", "clip_weight", "output_error",
           "fold_scale", "smooth_gain", "quantize_clipped"]

N_GRID = 20
MAX_SHRINK = 0.5
CLIP_STEPS = 20
MIN_SCALE = 1e-4
GAIN_EPS = 1e-3
# Linear names (last component) left out of the clip search; llm-awq's would be
# {"q_proj", "k_proj", "in_proj_qkv"} (see the module docstring for why it is empty here).
CLIP_SKIP: frozenset[str] = frozenset()
FOLDS = ("offset_norm", "gated_norm", "linear_rows")


@dataclass(frozen=True)
class FoldGroup:
    """One smooth op and the linears reading its output, names relative to a decoder layer."""

    smooth: str  # module name, e.g. "input_layernorm"
    fold: str  # one of FOLDS
    linears: tuple[str, ...]  # balance linears that get quantized
    dense: tuple[str, ...] = ()  # balance linears that only get scaled (stay dense)
    tie: int = 1  # scale tied across this many equal slices of the input (value heads)


# ---------------------------------------------------------------------------------------------
# search


def _weight_mean(weights: list[torch.Tensor], scheme: Scheme, names: list[str]) -> torch.Tensor:
    """Per input channel: mean over all rows of |W| / max |W| of the row's group."""
    parts = []
    for w, name in zip(weights, names):
        out, n = w.shape
        gs = group_size_for(scheme, n, name)
        g = w.abs().reshape(out, n // gs, gs)
        parts.append((g / (g.amax(-1, keepdim=True) + 1e-6)).reshape(out, n))
    return torch.cat(parts, 0).mean(0)


def _tied(v: torch.Tensor, tie: int) -> torch.Tensor:
    return v.reshape(tie, -1).mean(0) if tie > 1 else v


def _untie(s: torch.Tensor, tie: int) -> torch.Tensor:
    return s.repeat(tie) if tie > 1 else s


def output_error(w: torch.Tensor, w_hat: torch.Tensor, gram: torch.Tensor) -> float:
    """Σ_tokens ‖(W - Ŵ) x‖² = tr(D G Dᵀ) for G = Σ x xᵀ."""
    d = (w - w_hat).to(gram.dtype)
    return float(((d @ gram) * d).sum())


def search_scale(x_mean: torch.Tensor, gram: torch.Tensor, weights: list[torch.Tensor], scheme: Scheme,
                 names: list[str], *, tie: int = 1, frozen: torch.Tensor | None = None,
                 n_grid: int = N_GRID) -> tuple[torch.Tensor, dict]:
    """The scale (length in_features / tie) minimising the balance linears' output error.

    frozen: bool mask (length in_features / tie) of channels that must keep s = 1.
    Returns (s, info) with info = {"ratio": best r or None for s = 1, "error": ..., "error_s1": ...}.
    """
    g32 = gram.to(torch.float32)
    xm = _tied(x_mean.to(torch.float32), tie)
    wm = _tied(_weight_mean([w.to(torch.float32) for w in weights], scheme, names), tie)

    def err(s_t: torch.Tensor) -> float:
        s = _untie(s_t, tie)
        total = 0.0
        for w, name in zip(weights, names):
            gs = group_size_for(scheme, w.shape[1], name)
            w_hat = fake_quant(w * s[None, :], scheme, gs) / s[None, :]
            total += output_error(w, w_hat, g32)
        return total

    ones = torch.ones_like(xm)
    best_s, best_err, best_r = ones, err(ones), None
    base = best_err
    for i in range(n_grid):
        r = i / n_grid
        s = (xm.pow(r) / (wm.pow(1 - r) + 1e-4)).clamp(min=MIN_SCALE)
        live = s if frozen is None or bool(frozen.all()) else s[~frozen]
        s = s / torch.sqrt(live.max() * live.min())
        if frozen is not None:
            s = torch.where(frozen, ones, s)
        e = err(s)
        if e < best_err:
            best_s, best_err, best_r = s, e, r
    if not torch.isfinite(best_s).all():
        raise ConvertError(f"AWQ: non-finite scale for {names[0]} (degenerate activations)")
    return best_s, {"ratio": best_r, "error": best_err, "error_s1": base}


# ---------------------------------------------------------------------------------------------
# clip


def clip_weight(w: torch.Tensor, gram: torch.Tensor, scheme: Scheme, name: str, *, max_shrink: float = MAX_SHRINK,
                steps: int = CLIP_STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(w clamped per row and group to ±best max_val, the chosen shrink factor per [row, group])."""
    w = w.to(torch.float32)
    out, n = w.shape
    gs = group_size_for(scheme, n, name)
    ng = n // gs
    wg = w.reshape(out, ng, gs)
    # the group's diagonal blocks of G: [ng, gs, gs]
    blocks = torch.stack([gram[j * gs:(j + 1) * gs, j * gs:(j + 1) * gs] for j in range(ng)]).to(torch.float32)
    org_max = wg.abs().amax(-1, keepdim=True)
    best_err = torch.full((out, ng), float("inf"))
    best_f = torch.ones(out, ng)
    for i in range(steps):
        f = 1 - max_shrink * i / steps
        max_val = org_max * f
        cur = torch.maximum(torch.minimum(wg, max_val), -max_val)
        scale, zero = quant_params(cur, scheme)
        q = dequantize_codes(quantize_codes(cur, scale[..., None], zero[..., None], scheme.maxq),
                             scale[..., None], zero[..., None])
        d = q - wg  # [out, ng, gs]
        e = torch.einsum("ogi,gij,ogj->og", d, blocks, d)
        better = e < best_err
        best_err = torch.where(better, e, best_err)
        best_f = torch.where(better, torch.full_like(best_f, f), best_f)
    max_val = org_max * best_f[..., None]
    clipped = torch.maximum(torch.minimum(wg, max_val), -max_val)
    return clipped.reshape(out, n), best_f


def quantize_clipped(w: torch.Tensor, gram: torch.Tensor, scheme: Scheme, name: str, *, clip: bool = True
                     ) -> QuantizedWeight:
    """RTN of w after the clip search (or without it)."""
    if clip:
        w, _ = clip_weight(w, gram, scheme, name)
    return rtn(w, scheme, name)


# ---------------------------------------------------------------------------------------------
# fold


def smooth_gain(module, fold: str) -> torch.Tensor | None:
    """The per-channel gain the smooth op applies (None for a linear)."""
    if fold == "offset_norm":
        return 1.0 + module.weight.detach().to(torch.float32)
    if fold == "gated_norm":
        return module.weight.detach().to(torch.float32)
    return None


@torch.no_grad()
def fold_scale(layer, group: FoldGroup, s: torch.Tensor) -> None:
    """Divide the smooth op's output by s and multiply the balance linears' columns by s, in place.

    s has length in_features / group.tie (the tied per-head scale for "gated_norm")."""
    smooth = layer.get_submodule(group.smooth)
    s = s.to(torch.float32)
    full = _untie(s, group.tie)
    if group.fold == "offset_norm":
        w = smooth.weight
        w.copy_(((1.0 + w.to(torch.float32)) / s - 1.0).to(w.dtype))
    elif group.fold == "gated_norm":
        w = smooth.weight
        if w.shape[0] != s.shape[0]:
            raise ConvertError(f"AWQ: {group.smooth} has {w.shape[0]} channels, the tied scale {s.shape[0]}")
        w.copy_((w.to(torch.float32) / s).to(w.dtype))
    elif group.fold == "linear_rows":
        w = smooth.weight
        w.copy_((w.to(torch.float32) / s[:, None]).to(w.dtype))
        if getattr(smooth, "bias", None) is not None:
            smooth.bias.copy_((smooth.bias.to(torch.float32) / s).to(smooth.bias.dtype))
    else:
        raise ValueError(f"unknown fold {group.fold!r}")
    for name in group.linears + group.dense:
        lin = layer.get_submodule(name)
        lin.weight.copy_((lin.weight.to(torch.float32) * full[None, :]).to(lin.weight.dtype))
