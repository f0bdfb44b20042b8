"""The decoder as a stateful Core ML program: `inputs_embeds [1, T, H]`, `cache_position [T]` -> the last
position's `logits [1, V]`, with the conversation in Core ML states (iOS 18 `ct.StateType`).

States, float16 as Core ML requires: per full-attention layer `k_cache_i`, `v_cache_i` `[1, n_kv, C, d]`
(C = the context), per Gated DeltaNet layer `conv_state_i [1, conv_dim, K-1]` and `recurrent_state_i
[1, Hv, dk, dv]`. T is static per function (Core ML's ANE compiles fixed shapes): T = 1 is the decode
step, a larger T the prefill of a prompt chunk. Written with ops Core ML has and no data-dependent
shapes: the new K/V rows land through a one-hot mask over the cache's positions (a select, exact), the
attention masks positions past the current one, and a call at position 0 zeroes the Gated DeltaNet
states (a multiply), so one program both starts and continues a conversation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..modules.ops import causal_conv_plain, l2norm
from ..modules.text import TextDecoder
from ..spec import FULL, TextSpec

STATE_DTYPE = torch.float16


def _delta_rule(q, k, v, g, beta, state):
    """transformers' recurrent gated delta rule (torch_recurrent_gated_delta_rule) over a static T,
    one token after another: q, k [B, T, Hk, dk], v [B, T, Hv, dv], g, beta [B, T, Hv], state [B, Hv, dk, dv]."""
    rep = v.shape[2] // k.shape[2]
    g, beta = g.to(v.dtype), beta.to(v.dtype)  # one dtype throughout, as the float16 program has
    q = l2norm(q) * (q.shape[-1] ** -0.5)
    k = l2norm(k)
    if rep > 1:
        q = q.repeat_interleave(rep, dim=2)
        k = k.repeat_interleave(rep, dim=2)
    s = state.to(v.dtype)
    outs = []
    for t in range(q.shape[1]):
        s = s * g[:, t].exp()[..., None, None]
        kt, vt = k[:, t], v[:, t]  # [B, Hv, dk], [B, Hv, dv]
        delta = (vt - (s * kt[..., None]).sum(dim=-2)) * beta[:, t][..., None]
        s = s + kt[..., None] * delta[..., None, :]
        outs.append((s * q[:, t][..., None]).sum(dim=-2))
    return torch.stack(outs, dim=1), s


class StatefulDecoder(TextDecoder):
    """See the module docstring."""

    _causal_conv = staticmethod(causal_conv_plain)  # the states reach it cast to the activations' dtype
    _delta_rule = staticmethod(_delta_rule)

    def __init__(self, hf_model, text: TextSpec, max_context: int, state_dtype: torch.dtype = STATE_DTYPE):
        super().__init__(hf_model, text)
        self.max_context = int(max_context)
        self.state_dtype = state_dtype  # float16 in the package; float32 to test the arithmetic alone
        for i, kind in enumerate(text.layer_types):
            if kind == FULL:
                shape = (1, text.num_kv_heads, self.max_context, text.head_dim)
                self.register_buffer(f"k_cache_{i}", torch.zeros(shape, dtype=state_dtype))
                self.register_buffer(f"v_cache_{i}", torch.zeros(shape, dtype=state_dtype))
            else:
                self.register_buffer(f"conv_state_{i}", torch.zeros(
                    1, text.linear_conv_dim, text.conv_kernel - 1, dtype=state_dtype))
                self.register_buffer(f"recurrent_state_{i}", torch.zeros(
                    1, text.linear_num_value_heads, text.linear_key_head_dim, text.linear_value_head_dim,
                    dtype=state_dtype))

    def state_names(self) -> list[str]:
        return [n for n, _ in self.named_buffers() if n.split("_")[0] in ("k", "v", "conv", "recurrent")]

    def forward(self, inputs_embeds: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        x = inputs_embeds
        dt = x.dtype
        pos = cache_position.to(torch.int32)
        keep = (pos[0] != 0).to(dt)
        cos, sin = self._rope(pos[None].to(torch.float32))
        cos, sin = cos.to(dt), sin.to(dt)
        j = torch.arange(self.max_context, dtype=torch.int32)
        onehot = (j[None, :] == pos[:, None]).to(dt)  # [T, C]: where each new row goes
        hit = onehot.sum(dim=0)  # [C]
        mask = torch.where(j[None, :] <= pos[:, None], 0.0, -1e4).to(dt)[None, None, None]  # float16-safe
        for i, layer in enumerate(self.layers):
            h = layer.input_layernorm(x)
            if self.text.layer_types[i] == FULL:
                q, k, v, gate = self._qkv(layer, h, cos, sin)
                kc, vc = getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}")
                keep_rows = (1 - hit)[None, None, :, None]
                k_all = kc.to(dt) * keep_rows + torch.einsum("tc,bhtd->bhcd", onehot, k)
                v_all = vc.to(dt) * keep_rows + torch.einsum("tc,bhtd->bhcd", onehot, v)
                kc.copy_(k_all.to(self.state_dtype))
                vc.copy_(v_all.to(self.state_dtype))
                o = self._attend(q, k_all, v_all, mask)
                h = layer.self_attn.o_proj(o * torch.sigmoid(gate))
            else:
                conv, rec = getattr(self, f"conv_state_{i}"), getattr(self, f"recurrent_state_{i}")
                h, conv_new, rec_new = self._linear(layer, h, conv.to(dt) * keep, rec.to(dt) * keep)
                conv.copy_(conv_new.to(self.state_dtype))
                rec.copy_(rec_new.to(self.state_dtype))
            x = x + h
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.lm_head(self.norm(x[:, -1]))


HEAD_CONSTS = ("p_lm_head_weight_to_fp16", "p_weight_to_fp16")  # lm_head (decode, prefill), the embedding (embed)


def quant_config(quant: str):
    """coremltools' op config of a quant: int4 symmetric per block of 32 along the input axis, int8 symmetric
    per channel; None for fp16 (the weights as converted)."""
    import coremltools.optimize.coreml as cto

    if quant == "int4":
        return cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block", block_size=32)
    if quant == "int8":
        return cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel")
    return None


def _quantize(ml, quant: str, head_quant: str | None = None):
    """Core ML-side weight compression (coremltools' torch-side quantizers fail on torch >= 2.11). The
    vocabulary matrices (lm_head and the token embedding, one tensor when tied) may keep more bits than the
    rest (`head_quant`), as llama.cpp's Q4_K_M keeps its output matrix in Q6_K."""
    head_quant = head_quant or quant
    if quant == "fp16" and head_quant == "fp16":
        return ml
    import coremltools.optimize.coreml as cto

    cfg = cto.OptimizationConfig(global_config=quant_config(quant),
                                 op_name_configs={n: quant_config(head_quant) for n in HEAD_CONSTS})
    return cto.linear_quantize_weights(ml, cfg)


def convert_decoder_function(hf_model, text: TextSpec, quant: str, max_context: int, T: int,
                             head_quant: str | None = None):
    """One function of the decoder package: T tokens per call (1: decode, more: a prefill chunk)."""
    import coremltools as ct
    import numpy as np
    from torch.export import export

    dec = StatefulDecoder(hf_model, text, max_context).eval()
    x = torch.zeros(1, T, text.hidden_size)
    pos = torch.arange(T, dtype=torch.int32)
    with torch.no_grad():
        ep = export(dec, (x, pos), strict=False).run_decompositions({})
    states = [ct.StateType(wrapped_type=ct.TensorType(shape=tuple(getattr(dec, n).shape), dtype=np.float16), name=n)
              for n in dec.state_names()]
    ml = ct.convert(ep, inputs=[ct.TensorType(name="inputs_embeds", shape=(1, T, text.hidden_size), dtype=np.float32),
                                ct.TensorType(name="cache_position", shape=(T,), dtype=np.int32)],
                    outputs=[ct.TensorType(name="logits")], states=states, convert_to="mlprogram",
                    compute_precision=ct.precision.FLOAT16, minimum_deployment_target=ct.target.iOS18,
                    skip_model_load=True)
    return _quantize(ml, quant, head_quant)


class _Embed(torch.nn.Module):
    def __init__(self, hf_model):
        super().__init__()
        self.weight = hf_model.get_input_embeddings().weight

    def forward(self, input_ids):
        return F.embedding(input_ids, self.weight)


def convert_embedding(hf_model, text: TextSpec, quant: str, max_len: int, head_quant: str | None = None):
    """input_ids [1, T] (T from 1 to max_len; a lookup needs no fixed shape) -> inputs_embeds [1, T, H].
    int4/int8 as the decoder's weights (a lookup dequantizes only its rows)."""
    import coremltools as ct
    import numpy as np
    from torch.export import Dim, export

    emb = _Embed(hf_model).eval()
    ids = torch.zeros(1, 2, dtype=torch.int32)
    with torch.no_grad():
        ep = export(emb, (ids,), dynamic_shapes=({1: Dim("T", min=1, max=max_len)},), strict=False).run_decompositions({})
    ml = ct.convert(ep, inputs=[ct.TensorType(name="input_ids", shape=(1, ct.RangeDim(1, max_len, default=1)),
                                              dtype=np.int32)],
                    outputs=[ct.TensorType(name="inputs_embeds")], convert_to="mlprogram",
                    compute_precision=ct.precision.FLOAT16, minimum_deployment_target=ct.target.iOS18,
                    skip_model_load=True)
    return _quantize(ml, quant, head_quant)
