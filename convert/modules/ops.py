"""The two Gated DeltaNet primitives as torch custom ops, so every exporter lowers them its own way.

Inside a traced graph they stay single nodes (`minicpmv::causal_conv`, `minicpmv::gated_delta_rule`):
the ONNX exporter turns them into ONNX Runtime's fused operators or into standard ops
(`convert/onnx/lowering.py`); eager PyTorch runs the implementations below. A prompt of any length
is one call: a T-token prefill is one node, not T graph steps.

Semantics (batch first, as transformers' Qwen3.5 GatedDeltaNet):
- causal_conv(x [B, C, T], state [B, C, K-1], weight [C, 1, K] (nn.Conv1d's layout)) -> (silu(depthwise causal conv of
  [state, x]) [B, C, T], the last K-1 columns of [state, x]).
- gated_delta_rule(q, k [B, T, Hk, dk], v [B, T, Hv, dv], g [B, T, Hv] (log decay), beta [B, T, Hv],
  state [B, Hv, dk, dv]) -> (out [B, T, Hv, dv], new state). q and k are L2-normalised inside and q
  scaled by dk^-0.5; when Hv > Hk each q/k head serves Hv/Hk consecutive v heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["causal_conv", "causal_conv_plain", "gated_delta_rule", "l2norm"]


@torch.library.custom_op("minicpmv::causal_conv", mutates_args=())
def causal_conv(x: torch.Tensor, state: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    full = torch.cat([state.to(x.dtype), x], dim=-1)
    y = F.silu(F.conv1d(full, weight.to(x.dtype), groups=x.shape[1]))
    return y, full[:, :, full.shape[-1] - state.shape[-1]:].clone()


@causal_conv.register_fake
def _(x, state, weight):
    return x.new_empty(x.shape), state.new_empty(state.shape)


@torch.library.custom_op("minicpmv::gated_delta_rule", mutates_args=())
def gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                     state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # transformers' own kernels: the recurrent rule for one token, the chunked one for a prompt
    from transformers.models.qwen3_5 import modeling_qwen3_5 as m

    fn = m.torch_recurrent_gated_delta_rule if q.shape[1] == 1 else m.torch_chunk_gated_delta_rule
    out, new = fn(q, k, v, g=g, beta=beta, initial_state=state, output_final_state=True,
                  use_qk_l2norm_in_kernel=True)
    return out.contiguous(), new.to(state.dtype).contiguous()


@gated_delta_rule.register_fake
def _(q, k, v, g, beta, state):
    return v.new_empty(v.shape), state.new_empty(state.shape)


# plain-op forms for exporters that take neither custom op (ExecuTorch with XNNPACK running the conv,
# Core ML): the same arithmetic in ops every backend has


def causal_conv_plain(x: torch.Tensor, state: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """causal_conv in plain ops (cat, depthwise conv1d, silu, slice); x, state and weight in one dtype."""
    full = torch.cat([state, x], dim=-1)
    y = F.silu(F.conv1d(full, weight, groups=x.shape[1]))
    return y, full[:, :, full.shape[-1] - state.shape[-1]:]


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)  # transformers' l2norm (FLA's)
