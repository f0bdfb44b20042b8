"""Static checks of a quantized HF checkpoint (GPTQ, AWQ, compressed-tensors) against its source.

Each quantized linear, expressed for the source model's inputs (AWQ: un-scaled with the scales in
`awq_scales.safetensors`), must be as close to the source weight as quantization allows: its
relative error at most RTN_FACTOR times round-to-nearest's with the same scheme. GPTQ and AWQ trade
weight error for output error, so they sit above RTN in weight space, but a swapped or corrupted
module sits far above (relative error ~1). Every dense tensor must equal the source, except the
ones an AWQ fold rewrites (norms, in_proj_a/b).
"""

from __future__ import annotations

from pathlib import Path

import torch

from convert.checkpoint import Checkpoint

RTN_FACTOR = 4.0
AWQ_FOLDED = ("norm.weight", "layernorm.weight", "in_proj_a.weight", "in_proj_b.weight")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check_hf_quantized(ckpt: Checkpoint, folder: Path, *, quiet: bool = True) -> dict:
    from safetensors.torch import load_file

    from convert.hf_quant import read_quantized
    from convert.quantized_source import AWQ_SCALES
    from quantize.rtn import rtn
    from quantize.sequential import unscale

    fmt, weights, dense = read_quantized(folder)
    scales_file = Path(folder) / AWQ_SCALES
    scales = load_file(str(scales_file)) if scales_file.is_file() else {}
    problems = []
    worst = 0.0
    for m, qw in weights.items():
        src = torch.from_numpy(ckpt.tensor(f"{m}.weight"))
        if tuple(qw.shape) != tuple(src.shape):
            problems.append(f"{folder.name}: {m}: shape {list(qw.shape)}, the source's is {list(src.shape)}")
            continue
        w = qw.dequantize()
        if fmt == "awq":
            if f"{m}.in_scale" not in scales:
                continue  # without the scales the folded basis cannot be compared with the source
            w = unscale(w, scales[f"{m}.in_scale"], scales.get(f"{m}.out_scale"))
        err = _rel(w, src)
        base = _rel(rtn(src, qw.scheme, m).dequantize(), src)
        worst = max(worst, err / max(base, 1e-12))
        if not torch.isfinite(w).all() or err > RTN_FACTOR * base:
            problems.append(f"{folder.name}: {m}: relative error {err:.3g} against the source weight, "
                            f"{err / max(base, 1e-12):.1f}x round-to-nearest's ({base:.3g})")
    for name, t in dense.items():
        if name not in ckpt:
            problems.append(f"{folder.name}: tensor {name} is not in the source checkpoint")
            continue
        if fmt == "awq" and name.endswith(AWQ_FOLDED):
            continue
        if not torch.equal(t.float(), torch.from_numpy(ckpt.tensor(name))):
            problems.append(f"{folder.name}: tensor {name} differs from the source")
    if problems:
        return {"check": "tensors", "status": "fail", "message": problems[0], "details": problems}
    return {"check": "tensors", "status": "pass",
            "message": f"{len(weights)} quantized linears within {RTN_FACTOR:g}x RTN's weight error (worst {worst:.2f}x); "
                       f"{len(dense)} dense tensors as the source"}
