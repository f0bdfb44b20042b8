"""What llama.cpp holds in memory for this model at a context size, from the model's shape: the
attention layers' K/V cache per token and the Gated DeltaNet layers' fixed-size state. The weights
are the files' sizes; the compute buffers are measured from the runtime (they depend on its graph
and batch sizes, not only on the shapes), so they come in as a figure.

llama.cpp's defaults, as the apps run it: K and V in float16, one sequence; the recurrent state in
float32, per linear-attention layer a causal-conv window of (kernel - 1) rows of the conv input and
one value-head x key-dim x value-dim matrix per value head. For MiniCPM-V 4.6 that is 12 KiB of K/V
per token (6 attention layers x 2 x 2 KV heads x 256 x 2 bytes) and about 19 MiB of state.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024 * 1024


@dataclass(frozen=True)
class MemoryEstimate:
    weights_bytes: int
    kv_bytes_per_token: int
    n_ctx: int
    state_bytes: int
    compute_bytes: int

    @property
    def kv_bytes(self) -> int:
        return self.kv_bytes_per_token * self.n_ctx

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.state_bytes + self.compute_bytes

    def as_dict(self) -> dict:
        return {"weights_mb": round(self.weights_bytes / MIB, 1), "kv_cache_mb": round(self.kv_bytes / MIB, 1),
                "kv_bytes_per_token": self.kv_bytes_per_token, "n_ctx": self.n_ctx,
                "recurrent_state_mb": round(self.state_bytes / MIB, 1),
                "compute_buffers_mb": round(self.compute_bytes / MIB, 1), "total_mb": round(self.total_bytes / MIB, 1)}


def kv_bytes_per_token(text, kv_type_bytes: int = 2) -> int:
    """K and V of every full-attention layer for one position."""
    return len(text.full_layers) * 2 * text.num_kv_heads * text.head_dim * kv_type_bytes


def recurrent_state_bytes(text, state_type_bytes: int = 4) -> int:
    """Every Gated DeltaNet layer's conv window and delta-rule state (one sequence)."""
    conv = (text.conv_kernel - 1) * text.linear_conv_dim
    delta = text.linear_num_value_heads * text.linear_key_head_dim * text.linear_value_head_dim
    return len(text.linear_layers) * (conv + delta) * state_type_bytes


def estimate(spec, weights_bytes: int, n_ctx: int, compute_bytes: int = 0) -> MemoryEstimate:
    return MemoryEstimate(weights_bytes=int(weights_bytes), kv_bytes_per_token=kv_bytes_per_token(spec.text),
                          n_ctx=int(n_ctx), state_bytes=recurrent_state_bytes(spec.text),
                          compute_bytes=int(compute_bytes))
