"""GPTQ (Frantar et al. 2022) on one linear layer, after IST-DASLab/gptq `gptq.py::fasterquant`.

Hessian: H = 2/N · Σ x xᵀ over the N calibration tokens seen (GPTQModel's token normalisation; the
scale of H does not change the result, only the meaning of the dampening fraction relative to
mean(diag H)). Precision: each batch's xᵀx is computed in float32 (at most one sample's tokens),
the running sum is kept in float64 so many samples do not lose small contributions, and the
Cholesky factorisations run in float64 (fewer dampening retries on nearly singular H). The
column loop itself runs in float32, like every reference implementation.

quantize():

* dead columns (diag H == 0, an input that is always 0): H[i, i] = 1 and W[:, i] = 0;
* dampening: H += damp · mean(diag H) · I; if the Cholesky factorisation still fails, damp grows by
  `DAMP_STEP` (GPTQModel's auto-increment) up to `DAMP_MAX`, then a ConvertError;
* Hinv = upper Cholesky factor of H⁻¹; columns are quantized in blocks of `block_size` with the
  error of each column spread over the later columns of the block, and the block's error applied
  to the rest of W at once (lazy batch updates);
* group parameters: from the *updated* W at each group start (in quantization order), or, with
  static_groups, precomputed on the original W before any update;
* act-order: columns are processed by descending diag(H) (perm); codes are put back in the
  original column order at the end. g_idx (quantization.md §1.1, GPTQModel): without static
  groups the k-th column processed belongs to group k // gs, so g_idx[perm[k]] = k // gs
  (non-monotonic: readers gather scales); with static groups original column j always uses
  group j // gs, so g_idx = j // gs.
"""

from __future__ import annotations

import torch

from convert.errors import ConvertError

from .qweight import QuantizedWeight, Scheme
from .rtn import check_scheme, dequantize_codes, group_size_for, quant_params, quantize_codes

__all__ = ["GPTQ", "DAMP_STEP", "DAMP_MAX"]

DAMP_STEP = 0.01
DAMP_MAX = 1.0


class GPTQ:
    """Accumulates a linear layer's Hessian from its inputs, then quantizes its weight.

    `layer` is an nn.Linear (or anything with .weight [out, in] and optional .bias); its weight is
    not modified.
    """

    def __init__(self, layer, name: str = ""):
        self.layer = layer
        self.name = name
        self.columns = int(layer.weight.shape[1])
        self.H = torch.zeros(self.columns, self.columns, dtype=torch.float64)
        self.nsamples = 0  # tokens
        self.damp_used: float | None = None
        self.dequantized: torch.Tensor | None = None  # the weight the algorithm produced, [out, in]

    def add_batch(self, x: torch.Tensor) -> None:
        """x: any shape [..., in]; each row is one token."""
        x = x.detach().reshape(-1, self.columns).to(torch.float32)
        n = x.shape[0]
        if n == 0:
            return
        total = self.nsamples + n
        self.H *= self.nsamples / total
        self.H += (x.T @ x).to(torch.float64) * (2.0 / total)
        self.nsamples = total

    def set_hessian(self, gram: torch.Tensor, tokens: int) -> None:
        """Take H from a shared statistic: gram = Σ x xᵀ over `tokens` tokens (used when several
        layers read the same input, e.g. q/k/v)."""
        if tokens < 1:
            raise ConvertError(f"{self.name}: no calibration tokens reached this layer")
        self.H = gram.to(torch.float64) * (2.0 / tokens)
        self.nsamples = int(tokens)

    # -----------------------------------------------------------------------------------------
    def _hinv(self, H: torch.Tensor, damp: float) -> torch.Tensor:
        """Upper Cholesky factor of (H + λI)⁻¹, λ = damp·mean(diag H), retrying with more damping."""
        mean_diag = float(torch.diagonal(H).mean())
        d = damp
        eye = torch.eye(H.shape[0], dtype=H.dtype)
        while True:
            L, info = torch.linalg.cholesky_ex(H + d * mean_diag * eye)
            if int(info) == 0:
                Hinv = torch.cholesky_inverse(L)
                U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
                if int(info) == 0 and torch.isfinite(U).all():
                    self.damp_used = d
                    return U
            d += DAMP_STEP
            if not d <= DAMP_MAX + 1e-9:  # NaN-safe: a NaN damp would retry forever
                raise ConvertError(f"GPTQ: the Hessian of {self.name} is not positive definite even with "
                                   f"dampening {DAMP_MAX} (degenerate calibration activations?)")

    def quantize(self, scheme: Scheme, damp: float = 0.01, block_size: int = 128) -> QuantizedWeight:
        check_scheme(scheme)
        if self.nsamples == 0:
            raise ConvertError(f"GPTQ: {self.name} saw no calibration tokens")
        if not torch.isfinite(self.H).all():
            raise ConvertError(f"GPTQ: non-finite activations (NaN/Inf) reached {self.name}")
        W = self.layer.weight.detach().to(torch.float32).clone()
        rows, cols = W.shape
        gs = group_size_for(scheme, cols, self.name)
        maxq = scheme.maxq
        H = self.H.clone()

        dead = torch.diagonal(H) == 0
        H[dead, dead] = 1.0
        W[:, dead] = 0.0

        static: list[tuple[torch.Tensor, torch.Tensor]] = []
        if scheme.static_groups:
            static = [quant_params(W[:, j:j + gs], scheme) for j in range(0, cols, gs)]

        perm = invperm = None
        if scheme.act_order:
            perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
            W = W[:, perm]
            H = H[perm][:, perm]
            invperm = torch.argsort(perm)

        Hinv = self._hinv(H, damp).to(torch.float32)
        del H

        n_groups = cols // gs
        scales = torch.zeros(rows, n_groups, dtype=torch.float32)
        zeros = torch.zeros(rows, n_groups, dtype=torch.float32)
        Q = torch.zeros(rows, cols, dtype=torch.float32)  # codes, in processing order
        Wq = torch.zeros(rows, cols, dtype=torch.float32)  # dequantized, in processing order
        scale = zero = None
        for i1 in range(0, cols, block_size):
            i2 = min(i1 + block_size, cols)
            W1 = W[:, i1:i2].clone()
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = i1 + i
                if scheme.static_groups:
                    g = (int(perm[col]) if perm is not None else col) // gs
                    scale, zero = static[g]
                    scales[:, g], zeros[:, g] = scale, zero
                elif col % gs == 0:
                    # the group's current values: this block's updated columns, then later blocks'
                    # columns with the update this block owes them so far (pending until i2)
                    grp = W1[:, i:i + gs]
                    if grp.shape[1] < gs:
                        rest = W[:, i2:col + gs] - Err1[:, :i] @ Hinv[i1:i1 + i, i2:col + gs]
                        grp = torch.cat([grp, rest], 1)
                    scale, zero = quant_params(grp, scheme)
                    scales[:, col // gs], zeros[:, col // gs] = scale, zero
                w = W1[:, i]
                q = quantize_codes(w, scale, zero, maxq)
                wq = dequantize_codes(q, scale, zero)
                Q[:, col], Wq[:, col] = q, wq
                err = (w - wq) / Hinv1[i, i]
                W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
                Err1[:, i] = err
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

        if scheme.static_groups:
            g_idx = torch.arange(cols) // gs
        else:
            g_idx = torch.arange(cols) // gs  # group of the k-th column processed
            if invperm is not None:
                g_idx = g_idx[invperm]  # g_idx[perm[k]] = k // gs
        if invperm is not None:
            Q, Wq = Q[:, invperm], Wq[:, invperm]
        self.dequantized = Wq
        bias = getattr(self.layer, "bias", None)
        return QuantizedWeight(
            name=self.name, scheme=scheme, q=Q.to(torch.uint8), scales=scales,
            zeros=zeros.to(torch.int32), g_idx=g_idx.to(torch.int32),
            bias=None if bias is None else bias.detach().to(torch.float32).clone(),
        )

    def free(self) -> None:
        self.H = None  # type: ignore[assignment]
        self.dequantized = None
