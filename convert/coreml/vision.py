"""The vision encoder as a Core ML program an iOS app runs on the Neural Engine beside llama.cpp's decoder.

`pixel_values [1, 3, 14h, 14w]` (one slice, the unpacked form of the processor's NaViT packing) ->
`image_features [n, text_hidden]`, converted from the shared export module (convert/modules/vision.py).
Choices made for the Neural Engine (ANE):
- enumerated input shapes, not ranges: Core ML compiles each listed shape for the ANE, while a
  range-flexible input runs on the CPU or GPU. The list is every slice and overview size the model's
  own processor produces (its `find_best_resize` / `get_sliced_grid` / `get_refine_size` over images
  of 64-4096 px a side, aspect up to 9:1), most frequent first, 448x448 the default;
- float16 compute and weights (the ANE computes in float16);
- attention as explicit matmul + softmax (no fused SDPA op the ANE compiler may not place), 2x2
  windows as reshape/permute, position buckets as an integer table gathered by index (no float
  arithmetic on positions in float16).
"""

from __future__ import annotations

from collections import Counter

from ..spec import ModelSpec

SWEEP = range(64, 4097, 16)  # image sides (px) over which the processor's slice sizes are collected
MAX_ASPECT = 9.0
MAX_SHAPES = 128  # Core ML's limit on enumerated shapes


def slice_shapes(image_processor, mode: str) -> list[tuple[int, int]]:
    """(height, width) in pixels of every chunk (overview or slice) the processor makes in `mode`,
    most frequent first (ties by size), from its own sizing functions and configuration."""
    ip = image_processor
    sr, ps, mx = int(ip.scale_resolution), int(ip.patch_size), int(ip.max_slice_nums)
    count: Counter = Counter()
    for h in SWEEP:
        for w in SWEEP:
            if max(h, w) / min(h, w) > MAX_ASPECT:
                continue
            grid = ip.get_sliced_grid((h, w), mx, sr) if getattr(ip, "slice_mode", True) else None
            count[tuple(ip.find_best_resize((h, w), sr, ps, mode, allow_upscale=grid is None))] += 1
            if grid is not None:
                rh, rw = ip.get_refine_size((h, w), grid, sr, ps, mode, allow_upscale=True)
                count[(rh // grid[0], rw // grid[1])] += grid[0] * grid[1]
    default = (sr // (ps * 4) * ps * 4,) * 2 if mode == "16x" else (sr // (ps * 2) * ps * 2,) * 2
    order = sorted(count, key=lambda s: (s != default, -count[s], s))
    return order[:MAX_SHAPES]


def convert_vision(hf_model, spec: ModelSpec, mode: str, shapes: list[tuple[int, int]]):
    """The ct.models.MLModel (mlprogram, iOS 18, float16) of the `mode` encoder for these pixel shapes
    (the first is the default)."""
    import coremltools as ct
    import numpy as np
    import torch
    from torch.export import Dim, export

    from ..modules import VisionEncoder, grid_multiple

    m = grid_multiple(mode)
    p = spec.vision.patch_size
    side = max(max(s) for s in shapes) // (p * m) + 1
    enc = VisionEncoder(hf_model, spec, mode, max_grid=side * m).eval()
    hd, wd = Dim("grid_h", min=1, max=side), Dim("grid_w", min=1, max=side)
    x = torch.zeros(1, spec.vision.num_channels, p * m * 2, p * m * 3)
    with torch.no_grad():
        ep = export(enc, (x,), dynamic_shapes=({2: p * m * hd, 3: p * m * wd},), strict=False).run_decompositions({})
    c = spec.vision.num_channels
    shape = ct.EnumeratedShapes(shapes=[(1, c, h, w) for h, w in shapes], default=(1, c, *shapes[0]))
    return ct.convert(ep, inputs=[ct.TensorType(name="pixel_values", shape=shape, dtype=np.float32)],
                      outputs=[ct.TensorType(name="image_features")], convert_to="mlprogram",
                      compute_precision=ct.precision.FLOAT16, minimum_deployment_target=ct.target.iOS18,
                      skip_model_load=True)


def weight_names(hf_model, spec: ModelSpec, mode: str) -> dict[str, str]:
    """Core ML const name (as ct.convert names an ExportedProgram's parameter) -> HF tensor name."""
    from ..modules import VisionEncoder

    enc = VisionEncoder(hf_model, spec, mode, max_grid=1)
    hf_names = {id(p): n for n, p in hf_model.named_parameters(remove_duplicate=False)}
    return {"p_" + n.replace(".", "_"): hf_names[id(p)] for n, p in enc.named_parameters()}


def drop_text(hf_model) -> None:
    """Free the decoder's weights (the token embedding and lm_head included) of a model only its vision
    parts will be read from: 2.9 of the full-size model's 5.2 GB in float32."""
    hf_model.model.language_model.to_empty(device="meta")
    hf_model.lm_head.to_empty(device="meta")


def drop_vision(hf_model) -> None:
    """Free the vision tower's and merger's weights of a model only its decoder will be read from."""
    hf_model.model.vision_tower.to_empty(device="meta")
    hf_model.model.merger.to_empty(device="meta")
