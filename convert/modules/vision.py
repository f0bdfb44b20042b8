"""VisionEncoder: one image slice's pixels -> the decoder-space features, as one traceable graph.

transformers' vision code computes position ids, window order and merges from `target_sizes.tolist()`
(data-dependent, so it does not export); here they come from the pixel tensor's own shape: a slice is
`[1, 3, 14*h, 14*w]`, the unpacked form of the processor's NaViT-packed `[3, 14, 14*h*w]` (`unpack`).
Weights are transformers' modules, shared. Position buckets come from an integer table made with
transformers' own float32 arithmetic (slices up to `max_grid` patches a side), the 2x2 windows and
merges are reshape/permute, and window attention is batched over windows.
"""

from __future__ import annotations

import torch
from torch import nn

from runtimes.pipeline import unpack  # noqa: F401  (the processor's packing, undone app-side)

from ..spec import ModelSpec

__all__ = ["VisionEncoder", "unpack", "grid_multiple"]


def grid_multiple(mode: str) -> int:
    """The patch grid's sides are multiples of this: the merger's 2x2, times the window merger's 2x2 in 16x."""
    return 4 if mode == "16x" else 2


class VisionEncoder(nn.Module):
    def __init__(self, hf_model, spec: ModelSpec, mode: str, max_grid: int = 256):
        super().__init__()
        if mode not in ("16x", "4x"):
            raise ValueError(f"mode {mode!r}")
        tower = hf_model.model.vision_tower
        self.mode = mode
        self.spec = spec
        self.patch_embedding = tower.embeddings.patch_embedding
        self.position_embedding = tower.embeddings.position_embedding
        self.layers = tower.encoder.layers
        self.post_layernorm = tower.post_layernorm
        self.vit_merger = tower.vit_merger if mode == "16x" else None
        self.merger = hf_model.model.merger.mlp[0]
        n = tower.embeddings.num_patches_per_side
        self.side = n
        # transformers' nearest-position buckets (get_vision_nearest_position_ids: float32 i/h against
        # float32 boundaries) for every side length up to max_grid, as an integer table: exact, and
        # untouched when a graph is converted to float16 (i/h in float16 picks wrong buckets)
        bounds = torch.arange(1 / n, 1.0, 1 / n)
        table = torch.zeros(max_grid + 1, max_grid, dtype=torch.long)
        for size in range(1, max_grid + 1):
            table[size, :size] = torch.bucketize(torch.arange(size) / size, bounds, right=True)
        self.register_buffer("buckets", table, persistent=False)

    def _buckets(self, size) -> torch.Tensor:
        return self.buckets[size, :size]

    def _attend(self, attn, x: torch.Tensor) -> torch.Tensor:
        """Full bidirectional attention of x [N, S, D] (N independent sequences) with attn's weights."""
        N, S, D = x.shape
        nh = attn.num_heads
        hd = D // nh
        q = attn.q_proj(x).view(N, S, nh, hd)
        k = attn.k_proj(x).view(N, S, nh, hd)
        v = attn.v_proj(x).view(N, S, nh, hd)
        return attn.out_proj(self._sdpa(q, k, v, attn.scaling).reshape(N, S, D))

    @staticmethod
    def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention over [N, S, heads, d] -> [N, S, heads, d], as explicit matmuls (exporters may swap in
        a fused kernel: ExecuTorch's plans no S x S tensor)."""
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        p = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1)
        return torch.matmul(p, v).transpose(1, 2)

    def _layer(self, layer, x: torch.Tensor) -> torch.Tensor:
        x = x + self._attend(layer.self_attn, layer.layer_norm1(x))
        return x + layer.mlp(layer.layer_norm2(x))

    def _window_merge(self, x: torch.Tensor, h, w) -> torch.Tensor:
        """transformers' ViTWindowAttentionMerger: attention inside each 2x2 window, then each window's
        4 tokens -> 1 (an MLP on the concatenation plus their mean). Output row-major over (h/2, w/2)."""
        m = self.vit_merger
        D = x.shape[-1]

        def windows(t):
            return t.reshape(h // 2, 2, w // 2, 2, D).permute(0, 2, 1, 3, 4).reshape(-1, 4, D)

        y = windows(x) + self._attend(m.self_attn, windows(m.layer_norm1(x)))
        flat = y.reshape(-1, 4 * D)
        out = m.linear_2(m.act(m.linear_1(m.pre_norm(flat)))) + y.mean(dim=1)
        return out[None]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values)  # [1, D, h, w]
        h, w = x.shape[2], x.shape[3]
        x = x.flatten(2).transpose(1, 2)
        pos = (self._buckets(h)[:, None] * self.side + self._buckets(w)[None, :]).reshape(-1)
        x = x + self.position_embedding(pos)[None]
        insert = self.spec.vision.insert_layer_id
        for i, layer in enumerate(self.layers):
            x = self._layer(layer, x)
            if self.vit_merger is not None and i == insert:
                x = self._window_merge(x[0], h, w)
                h, w = h // 2, w // 2
        x = self.post_layernorm(x)[0]
        D = x.shape[-1]
        x = x.reshape(h // 2, 2, w // 2, 2, D).permute(0, 2, 1, 3, 4).reshape(-1, 4 * D)
        return self.merger(x)
