"""TokenEmbedding and TextDecoder: the Qwen3.5 hybrid decoder with its whole state as explicit tensors.

The decoder takes `inputs_embeds [1, T, H]`, `attention_mask [1, P+T]`, `position_ids [1, T]` and the
state of every layer (full attention: K and V `[1, n_kv, P, head_dim]`; Gated DeltaNet: conv state
`[1, conv_dim, K-1]` and recurrent state `[1, Hv, dk, dv]`), and returns the logits of every position
and the new state. A past of length 0 (and zero GDN states) starts a conversation; T = 1 is the decode
step and a whole prompt is one call. The weights are transformers' own modules, shared, not copied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..spec import FULL, TextSpec
from . import ops

__all__ = ["TokenEmbedding", "TextDecoder", "StateSpec", "state_specs"]


@dataclass(frozen=True)
class StateSpec:
    """One state tensor of the decoder: its input and output names (transformers.js' names) and shape;
    `seq_axis` is the axis that grows with the conversation (None for fixed-size GDN states)."""

    layer: int
    kind: str  # "key" | "value" | "conv" | "recurrent"
    input_name: str
    output_name: str
    shape: tuple[int, ...]  # with 0 on seq_axis
    seq_axis: int | None


def state_specs(text: TextSpec) -> list[StateSpec]:
    """The decoder's state tensors in call order: per layer, K then V, or conv then recurrent."""
    out: list[StateSpec] = []
    for i, t in enumerate(text.layer_types):
        if t == FULL:
            shp = (1, text.num_kv_heads, 0, text.head_dim)
            out.append(StateSpec(i, "key", f"past_key_values.{i}.key", f"present.{i}.key", shp, 2))
            out.append(StateSpec(i, "value", f"past_key_values.{i}.value", f"present.{i}.value", shp, 2))
        else:
            out.append(StateSpec(i, "conv", f"past_conv.{i}", f"present_conv.{i}",
                                 (1, text.linear_conv_dim, text.conv_kernel - 1), None))
            out.append(StateSpec(i, "recurrent", f"past_recurrent.{i}", f"present_recurrent.{i}",
                                 (1, text.linear_num_value_heads, text.linear_key_head_dim,
                                  text.linear_value_head_dim), None))
    return out


class TokenEmbedding(nn.Module):
    def __init__(self, hf_model):
        super().__init__()
        self.embed_tokens = hf_model.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # padding_idx only matters for gradients; without it the graph is the plain embedding that
        # ExecuTorch's quantized-embedding fusion looks for
        return F.embedding(input_ids, self.embed_tokens.weight)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class TextDecoder(nn.Module):
    """See the module docstring. `forward(inputs_embeds, attention_mask, position_ids, *state)` ->
    `(logits, *new_state)`, state in `state_specs` order."""

    def __init__(self, hf_model, text: TextSpec):
        super().__init__()
        lm = hf_model.model.language_model
        self.text = text
        self.layers = lm.layers
        self.norm = lm.norm
        self.lm_head = hf_model.lm_head
        # Text positions are one row, so the interleaved M-RoPE reduces to plain RoPE on rope_dim dims.
        inv = 1.0 / (text.rope_theta ** (torch.arange(0, text.rope_dim, 2, dtype=torch.float32) / text.rope_dim))
        self.register_buffer("inv_freq", inv, persistent=False)

    def _qkv(self, layer, x, cos, sin):
        """q [B, H, T, d] and k, v [B, n_kv, T, d] with RoPE applied, and the output gate [B, T, H*d]."""
        a, t = layer.self_attn, self.text
        B, T, _ = x.shape
        q, gate = a.q_proj(x).view(B, T, t.num_heads, 2 * t.head_dim).chunk(2, dim=-1)
        gate = gate.reshape(B, T, t.num_heads * t.head_dim)
        q = a.q_norm(q).transpose(1, 2)
        k = a.k_norm(a.k_proj(x).view(B, T, t.num_kv_heads, t.head_dim)).transpose(1, 2)
        v = a.v_proj(x).view(B, T, t.num_kv_heads, t.head_dim).transpose(1, 2)
        r = t.rope_dim
        q = torch.cat([q[..., :r] * cos + _rotate_half(q[..., :r]) * sin, q[..., r:]], dim=-1)
        k = torch.cat([k[..., :r] * cos + _rotate_half(k[..., :r]) * sin, k[..., r:]], dim=-1)
        return q, k, v, gate

    def _attend(self, q, k, v, mask):
        """Attention of q [B, H, T, d] over k, v [B, n_kv, S, d] with an additive mask -> [B, T, H*d]."""
        t = self.text
        B, _, T, _ = q.shape
        rep = t.num_heads // t.num_kv_heads
        # grouped heads as [B, n_kv, rep, T, d] against [B, n_kv, 1, S, d]: no K/V copies
        qg = q.reshape(B, t.num_kv_heads, rep, T, t.head_dim)
        scores = torch.matmul(qg, k.unsqueeze(2).transpose(-1, -2)) * (t.head_dim ** -0.5)
        probs = torch.softmax(scores + mask, dim=-1)
        o = torch.matmul(probs, v.unsqueeze(2)).view(B, t.num_heads, T, t.head_dim)
        return o.transpose(1, 2).reshape(B, T, t.num_heads * t.head_dim)

    def _attention(self, layer, x, cos, sin, past_k, past_v, mask):
        q, k, v, gate = self._qkv(layer, x, cos, sin)
        k = torch.cat([past_k, k], dim=2)
        v = torch.cat([past_v, v], dim=2)
        o = self._attend(q, k, v, mask)
        return layer.self_attn.o_proj(o * torch.sigmoid(gate)), k, v

    # the Gated DeltaNet primitives (convert/modules/ops.py semantics); an exporter may swap in its own
    _causal_conv = staticmethod(ops.causal_conv)
    _delta_rule = staticmethod(ops.gated_delta_rule)

    def _rope(self, position_ids: torch.Tensor):
        """cos, sin [1, 1, T, rope_dim] of positions [1, T]."""
        freqs = position_ids.to(torch.float32)[..., None] * self.inv_freq  # [1, T, r/2]
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]
        return emb.cos(), emb.sin()

    def _linear(self, layer, x, conv_state, rec_state):
        m, t = layer.linear_attn, self.text
        B, T, _ = x.shape
        qkv, conv_new = self._causal_conv(m.in_proj_qkv(x).transpose(1, 2), conv_state, m.conv1d.weight)
        qkv = qkv.transpose(1, 2)
        kd, vd = t.linear_qk_dim, t.linear_v_dim
        q = qkv[..., :kd].reshape(B, T, t.linear_num_key_heads, t.linear_key_head_dim)
        k = qkv[..., kd:2 * kd].reshape(B, T, t.linear_num_key_heads, t.linear_key_head_dim)
        v = qkv[..., 2 * kd:].reshape(B, T, t.linear_num_value_heads, t.linear_value_head_dim)
        beta = torch.sigmoid(m.in_proj_b(x))
        g = -m.A_log.float().exp() * F.softplus(m.in_proj_a(x).float() + m.dt_bias)
        o, rec_new = self._delta_rule(q, k, v, g, beta, rec_state)
        z = m.in_proj_z(x).reshape(B * T * t.linear_num_value_heads, t.linear_value_head_dim)
        o = m.norm(o.reshape(B * T * t.linear_num_value_heads, t.linear_value_head_dim), z).reshape(B, T, vd)
        return m.out_proj(o), conv_new, rec_new

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *state: torch.Tensor):
        t = self.text
        x = inputs_embeds
        T = x.shape[1]
        cos, sin = self._rope(position_ids)
        mask = None
        out: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            p0, p1 = state[2 * i], state[2 * i + 1]
            h = layer.input_layernorm(x)
            if t.layer_types[i] == FULL:
                if mask is None:
                    mask = self._mask(attention_mask, T)
                h, s0, s1 = self._attention(layer, h, cos, sin, p0, p1, mask)
            else:
                h, s0, s1 = self._linear(layer, h, p0, p1)
            out += [s0, s1]
            x = x + h
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        logits = self.lm_head(self.norm(x))
        return (logits, *out)

    @staticmethod
    def _mask(attention_mask: torch.Tensor, T: int) -> torch.Tensor:
        """Additive [1, 1, 1, T, P+T] mask: causal over absolute positions, and the padding in attention_mask."""
        S = attention_mask.shape[1]
        j = torch.arange(S, device=attention_mask.device)
        i = torch.arange(T, device=attention_mask.device) + (S - T)
        ok = (j[None, :] <= i[:, None]) & (attention_mask[0, None, :] > 0)
        return torch.where(ok, 0.0, torch.finfo(torch.float32).min)[None, None, None]

    def empty_state(self, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        """The state that starts a conversation: zero-length K/V, zero GDN states."""
        return [torch.zeros(s.shape, dtype=dtype) for s in state_specs(self.text)]
