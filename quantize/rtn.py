"""Group-wise integer quantization parameters (GPTQ's conventions) and round-to-nearest, the baseline.

For one group of weights (the last dimension of the tensor handed in):

* symmetric: scale = 2·max(|min|, |max|) / maxq and zero = 2^(bits-1) (8 for 4 bits), so the codes
  cover [-zero·scale, (maxq-zero)·scale]. IST-DASLab's quant.py keeps min = 0 when a group has no
  negative weight (scale = max/maxq, and the top code then reaches only 7/15 of max); this uses
  the symmetric range always, as the formats' readers assume a symmetric grid around zero.
* asymmetric: the range is [min(min, 0), max(max, 0)] (it always holds 0, so a zero weight stays
  exactly zero), scale = range / maxq, zero = round(-min / scale) clamped to [0, maxq].
* an all-zero group gets the range [-1, 1] (as GPTQ does) instead of scale 0.

Codes are q = clamp(round(w / scale) + zero, 0, maxq) and w ≈ scale · (q - zero).
"""

from __future__ import annotations

import torch

from convert.errors import ConvertError

from .qweight import QuantizedWeight, Scheme

__all__ = ["quant_params", "quantize_codes", "dequantize_codes", "fake_quant", "group_size_for",
           "check_scheme", "rtn"]

SUPPORTED_BITS = range(2, 9)


def check_scheme(scheme: Scheme) -> None:
    if scheme.bits not in SUPPORTED_BITS:
        raise ConvertError(f"{scheme.bits}-bit quantization is not supported "
                           f"({SUPPORTED_BITS.start}..{SUPPORTED_BITS.stop - 1} bits)")


def group_size_for(scheme: Scheme, in_features: int, name: str) -> int:
    """The scheme's group size for a layer (group_size <= 0: one group per row); it must divide the
    layer's input features, since every format stores whole groups."""
    gs = scheme.group_size if scheme.group_size > 0 else in_features
    if in_features % gs:
        raise ConvertError(f"group size {gs} does not divide the {in_features} input features of {name}")
    return gs


def quant_params(w_groups: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per group of the last dimension: float32 tensors of shape w_groups.shape[:-1];
    zero holds integers."""
    w = w_groups.to(torch.float32)
    maxq = scheme.maxq
    lo = w.amin(-1).clamp(max=0.0)
    hi = w.amax(-1).clamp(min=0.0)
    if scheme.sym:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    empty = (lo == 0) & (hi == 0)
    lo = torch.where(empty, torch.full_like(lo, -1.0), lo)
    hi = torch.where(empty, torch.full_like(hi, 1.0), hi)
    scale = (hi - lo) / maxq
    if scheme.sym:
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        zero = torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes (as float32) of w for broadcastable scale and zero."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)


def fake_quant(w: torch.Tensor, scheme: Scheme, group_size: int) -> torch.Tensor:
    """w [out, in] quantized and dequantized per group of `group_size` consecutive columns."""
    out, n = w.shape
    g = w.reshape(out, n // group_size, group_size)
    scale, zero = quant_params(g, scheme)
    scale, zero = scale[..., None], zero[..., None]
    return dequantize_codes(quantize_codes(g, scale, zero, scheme.maxq), scale, zero).reshape(out, n)


def rtn(weight: torch.Tensor, scheme: Scheme, name: str, bias: torch.Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest per group, parameters from the group's min/max (no clipping)."""
    check_scheme(scheme)
    w = weight.detach().to(torch.float32)
    out, n = w.shape
    gs = group_size_for(scheme, n, name)
    g = w.reshape(out, n // gs, gs)
    scale, zero = quant_params(g, scheme)
    q = quantize_codes(g, scale[..., None], zero[..., None], scheme.maxq).reshape(out, n)
    return QuantizedWeight(
        name=name, scheme=scheme, q=q.to(torch.uint8), scales=scale.contiguous(),
        zeros=zero.to(torch.int32).contiguous(),
        g_idx=(torch.arange(n) // gs).to(torch.int32),
        bias=None if bias is None else bias.detach().to(torch.float32).clone(),
    )
