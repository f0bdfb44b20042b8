"""The decoder as ExecuTorch's runners call it: `text_decoder(inputs_embeds [1, T, H], cache_position [T])
-> logits of the last position [1, V]`, with the whole conversation state inside the program as mutable buffers.

Full-attention layers keep a static K/V cache `[1, max_context, n_kv, head_dim]` (the layout of
ExecuTorch's `llama::update_cache` / `llama::custom_sdpa`); Gated DeltaNet layers keep their conv state
`[1, conv_dim, K-1]` and recurrent state `[1, Hv, dk, dv]` in float32. A call whose first position is 0
starts a conversation (the GDN states are multiplied by 0; stale K/V rows past the current position are
never read), any other call continues it, so a prompt of T tokens is one call and multi-turn goes on
from where the last call stopped.

Two implementations of the same arithmetic (tests/test_executorch.py holds them equal):
- `custom_ops=True` (what the `.pte` holds): ExecuTorch's `llama::update_cache`, `llama::custom_sdpa`
  (attends only the filled part of the cache) and `llama::gated_delta_rule` (one fused kernel for any T);
- `custom_ops=False`: pure PyTorch (`index_copy_` into the cache, attention over the whole cache with a
  position mask, the Gated DeltaNet of convert/modules/ops.py, i.e. transformers' own rules). It runs
  eagerly; its delta rule is a loop over tokens, which a dynamic-T export cannot hold.
"""

from __future__ import annotations

import torch

from ..modules.ops import causal_conv_plain, l2norm
from ..modules.text import TextDecoder
from ..spec import FULL, TextSpec

__all__ = ["CachedTextDecoder", "load_custom_ops", "vision_sdpa"]


def load_custom_ops() -> None:
    """Register ExecuTorch's `llama::` operators (ATen kernels for eager and export, ExecuTorch kernels
    for its runtime)."""
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401


def vision_sdpa(q, k, v, scale):
    """VisionEncoder._sdpa through `llama::custom_sdpa` (non-causal, the whole sequence): ExecuTorch's
    memory planner sizes every tensor outside a delegate for the largest slice the method accepts, and
    explicit attention's [heads, S, S] scores would cost GBs there; this kernel keeps them in its own
    scratch memory, at the real size."""
    return torch.ops.llama.custom_sdpa(q.contiguous(), k.contiguous(), v.contiguous(), 0, None, 0.0, False, scale)


def _delta_rule_llama(q, k, v, g, beta, state):
    """convert/modules/ops.gated_delta_rule through `llama::gated_delta_rule`, which takes heads first,
    q and k already L2-normalised (q scaled by dk^-0.5), one k head per v head and the decay itself."""
    rep = v.shape[2] // k.shape[2]
    q = l2norm(q.float()) * (q.shape[-1] ** -0.5)
    k = l2norm(k.float())
    if rep > 1:  # each q/k head serves `rep` consecutive v heads
        q = q.repeat_interleave(rep, dim=2)
        k = k.repeat_interleave(rep, dim=2)
    o, new = torch.ops.llama.gated_delta_rule(q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(),
                                              v.float().transpose(1, 2).contiguous(), g.exp().transpose(1, 2).contiguous(),
                                              beta.float().transpose(1, 2).contiguous(), state)
    return o.transpose(1, 2).to(v.dtype), new


class CachedTextDecoder(TextDecoder):
    """See the module docstring."""

    def __init__(self, hf_model, text: TextSpec, max_context: int, *, custom_ops: bool = True):
        super().__init__(hf_model, text)
        self.max_context = int(max_context)
        self.custom_ops = custom_ops
        if custom_ops:
            load_custom_ops()
            self._causal_conv = causal_conv_plain  # XNNPACK runs the conv; the rest is a few copies
            self._delta_rule = _delta_rule_llama
        for i, kind in enumerate(text.layer_types):
            if kind == FULL:
                shape = (1, self.max_context, text.num_kv_heads, text.head_dim)
                self.register_buffer(f"k_cache_{i}", torch.zeros(shape))
                self.register_buffer(f"v_cache_{i}", torch.zeros(shape))
            else:
                self.register_buffer(f"conv_state_{i}", torch.zeros(1, text.linear_conv_dim, text.conv_kernel - 1))
                self.register_buffer(f"recurrent_state_{i}", torch.zeros(
                    1, text.linear_num_value_heads, text.linear_key_head_dim, text.linear_value_head_dim))

    def state_names(self) -> list[str]:
        return [n for n, _ in self.named_buffers() if n.split("_")[0] in ("k", "v", "conv", "recurrent")]

    def _cached_attention(self, i, layer, x, cos, sin, cache_position):
        q, k, v, gate = self._qkv(layer, x, cos, sin)
        kc, vc = getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}")
        B, H, T, d = q.shape
        if self.custom_ops:
            start = cache_position[0].item()
            torch._check(start >= 0)
            torch._check(start + T <= self.max_context)
            torch.ops.llama.update_cache(k.transpose(1, 2), kc, start)
            torch.ops.llama.update_cache(v.transpose(1, 2), vc, start)
            o = torch.ops.llama.custom_sdpa(q.transpose(1, 2), kc, vc, start, None, 0.0, True,
                                            self.text.head_dim ** -0.5)
            o = o.reshape(B, T, H * d)
        else:
            with torch.no_grad():
                kc.index_copy_(1, cache_position, k.transpose(1, 2))
                vc.index_copy_(1, cache_position, v.transpose(1, 2))
            j = torch.arange(self.max_context)
            mask = torch.where(j[None, :] <= cache_position[:, None], 0.0, torch.finfo(torch.float32).min)
            o = self._attend(q, kc.transpose(1, 2), vc.transpose(1, 2), mask[None, None, None])
        return layer.self_attn.o_proj(o * torch.sigmoid(gate))

    def forward(self, inputs_embeds: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        # position 0 starts a conversation. A multiply (XNNPACK runs it), not a select: ExecuTorch's portable
        # `where` over the 18 recurrent states took 29 of 52 ms per decode step on the full-size model.
        # The exporter serializes the GDN states' initial zeros, so the first call multiplies no garbage.
        keep = (cache_position[0] != 0).to(torch.float32)
        cos, sin = self._rope(cache_position[None])
        x = inputs_embeds
        for i, layer in enumerate(self.layers):
            h = layer.input_layernorm(x)
            if self.text.layer_types[i] == FULL:
                h = self._cached_attention(i, layer, h, cos, sin, cache_position)
            else:
                conv, rec = getattr(self, f"conv_state_{i}"), getattr(self, f"recurrent_state_{i}")
                h, conv_new, rec_new = self._linear(layer, h, conv * keep, rec * keep)
                with torch.no_grad():
                    conv.copy_(conv_new)
                    rec.copy_(rec_new)
            x = x + h
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.lm_head(self.norm(x[:, -1]))  # [1, V]: the runners sample from the last position
