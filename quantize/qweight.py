"""One linear layer's weight after integer quantization: the hand-off between the algorithms
(RTN, GPTQ, AWQ: quantize/rtn.py, gptq.py, awq.py) and the checkpoint formats (GPTQ v1, AWQ GEMM,
compressed-tensors pack-quantized: quantize/packing.py).

Convention (GPTQ's, which all three formats can express): unsigned codes q in [0, 2^bits - 1],
per-group scale and integer zero point, and

    W[o, i] = scales[o, g] * (q[o, i] - zeros[o, g]),   g = g_idx[i]

Symmetric schemes use zeros == 2^(bits-1) everywhere. g_idx is i // group_size unless act-order
without static groups reorders the groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Scheme:
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    act_order: bool = False
    static_groups: bool = False

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1


@dataclass
class QuantizedWeight:
    name: str  # the HF module name, e.g. "model.language_model.layers.0.mlp.up_proj"
    scheme: Scheme
    q: torch.Tensor  # uint8/int32 [out, in], codes in [0, maxq]
    scales: torch.Tensor  # float32 [out, n_groups]
    zeros: torch.Tensor  # int32 [out, n_groups]
    g_idx: torch.Tensor  # int32 [in]
    bias: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)  # type: ignore[return-value]

    def dequantize(self) -> torch.Tensor:
        """float32 [out, in]."""
        g = self.g_idx.long()
        return self.scales[:, g] * (self.q.to(torch.float32) - self.zeros[:, g].to(torch.float32))
