"""llama.cpp mtmd's image preprocessing for MiniCPM-V 4.6, in numpy, and packing for the reference.

The validation harness compares llama.cpp's image path with transformers on *the same pixels*.
transformers' processor and mtmd do not always produce the same pixels (or even the same chunks),
so this module reproduces mtmd (llama.cpp as vendored by llama-cpp-python 0.3.36,
tools/mtmd/mtmd-image.cpp, `mtmd_image_preprocessor_minicpmv`) and packs its chunks the way
transformers' MiniCPMV4_6 image processor does, so the PyTorch vision tower can embed them.

What mtmd does for `minicpmv4_6` (clip.cpp hparams: bicubic for overview and slices, overview
PAD_NONE i.e. stretched, slices PAD_CEIL i.e. letterboxed, pad colour black):
  * every size is aligned to `patch_size * n_merge` (n_merge 4 for "16x", 2 for "4x");
  * an image with both sides <= image_size (448) is, in 16x, stretched to a 448x448 overview
    (no slices); in 4x, if w*h <= 448^2 it gets an aspect-preserving overview (no slices);
  * otherwise: overview (aspect-preserving, aligned) + a grid chosen from w*h/448^2 and the
    aspect ratio; the image is letterboxed into the grid's refined size and cropped into slices.
transformers decides "slices or not" from w*h/448^2 alone, stretches the refined image, and
rounds half-to-even, so grids, token counts and slice pixels can differ (see the test).

The arithmetic below copies mtmd's float32 / int mix on purpose (float32 products, truncating
int casts, std::round = half away from zero) so sizes are equal to the pixel; the resampler is
Pillow's fixed-point separable filter, which mtmd reimplements bit for bit.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

__all__ = ["MtmdVisionParams", "SlicePlan", "slice_plan", "resize", "chunk_pixels", "preprocess",
           "pack_for_reference", "unpack_reference", "reference_embeddings", "expected_token_counts"]

_f32 = np.float32
MAX_SLICE_NUMS = 9  # mtmd's hard-coded max_slice_nums (same as transformers' default)
PAD_COLOR_RF = (0, 0, 0)  # clip_hparams default image_pad_color_rf; minicpmv4_6 does not override it


@dataclass(frozen=True)
class MtmdVisionParams:
    """The hparams mtmd's MiniCPM-V 4.6 preprocessing depends on, as clip.cpp reads them."""

    image_size: int  # slice size (448)
    patch_size: int  # ViT patch (14)
    n_merge: int  # merge per side: 4 for "16x", 2 for "4x"
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]

    @property
    def mode(self) -> str:
        return {4: "16x", 2: "4x"}[self.n_merge]

    @property
    def align(self) -> int:
        """Every chunk side is a multiple of this, so a whole number of merged tokens fits."""
        return self.patch_size * self.n_merge

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str]) -> "MtmdVisionParams":
        from gguf import GGUFReader

        fields = GGUFReader(path).fields

        def get(key: str, default: Any = None) -> Any:
            f = fields.get(key)
            if f is None:
                if default is None:
                    raise KeyError(f"{path}: no {key}")
                return default
            return f.contents()

        ptype = get("clip.projector_type", "?")
        if ptype != "minicpmv4_6":
            raise ValueError(f"{path}: projector {ptype!r}, this preprocessing is minicpmv4_6's")
        n_merge = int(get("clip.vision.projector.scale_factor", 4))  # clip.cpp's default is 4
        if n_merge not in (2, 4):
            raise ValueError(f"{path}: scale_factor {n_merge}, mtmd accepts 2 or 4")
        mean = tuple(float(v) for v in get("clip.vision.image_mean"))
        std = tuple(float(v) for v in get("clip.vision.image_std"))
        return cls(int(get("clip.vision.image_size")), int(get("clip.vision.patch_size")), n_merge,
                   mean[:3], std[:3])  # type: ignore[arg-type]


@dataclass(frozen=True)
class SlicePlan:
    """mtmd's slice instructions. Sizes are (width, height); rectangles (x, y, w, h) in the refined image."""

    original: tuple[int, int]
    overview: tuple[int, int]
    refined: tuple[int, int] | None  # None when there are no slices
    grid: tuple[int, int]  # (cols, rows); (0, 0) without slices
    slices: tuple[tuple[int, int, int, int], ...]

    @property
    def chunk_sizes(self) -> list[tuple[int, int]]:
        """(width, height) of each chunk in mtmd order: overview, then slices row by row."""
        return [self.overview] + [(w, h) for _, _, w, h in self.slices]

    @property
    def n_chunks(self) -> int:
        return 1 + len(self.slices)


# ---------------------------------------------------------------------------------------------
# sizes: mtmd's integer / float32 arithmetic


def _round_away(x: np.float32) -> int:
    """std::round on a float: halves go away from zero (Python's round() goes to even)."""
    x = _f32(x)
    r = math.floor(x)
    return int(r + 1 if x - r >= 0.5 else r)


def _ensure_divide(length: int, divisor: int) -> int:
    # max((int)(std::round((float)length / divisor) * divisor), divisor)
    return max(_round_away(_f32(length) / _f32(divisor)) * divisor, divisor)


def _best_resize(size: tuple[int, int], scale_resolution: int, align: int, allow_upscale: bool) -> tuple[int, int]:
    """get_best_resize: scale to about scale_resolution^2 pixels keeping the aspect, then align."""
    w, h = size
    if w * h > scale_resolution * scale_resolution or allow_upscale:
        r = _f32(w) / _f32(h)
        h = int(_f32(scale_resolution) / np.sqrt(r))  # float32 sqrt and division, truncated
        w = int(_f32(h) * r)
    return _ensure_divide(w, align), _ensure_divide(h, align)


def _refine_size(size: tuple[int, int], grid: tuple[int, int], scale_resolution: int, align: int) -> tuple[int, int]:
    """get_refine_size (allow_upscale=True): one aligned slice size, times the grid."""
    cols, rows = grid
    cell = (_ensure_divide(size[0], cols) // cols, _ensure_divide(size[1], rows) // rows)  # int division
    bw, bh = _best_resize(cell, scale_resolution, align, True)
    return bw * cols, bh * rows


def _best_grid(multiple: int, log_ratio: np.float32) -> tuple[int, int]:
    """get_best_grid: (cols, rows) with cols*rows in {multiple-1, multiple, multiple+1} \\ {1} whose
    log aspect is closest to the image's; the first candidate wins ties (strict <), candidates in
    the order (m, n/m) for m = 1..n."""
    candidates = [(m, n // m) for n in (multiple - 1, multiple, multiple + 1) if n != 1 and n <= MAX_SLICE_NUMS
                  for m in range(1, n + 1) if n % m == 0]
    best, best_err = (1, 1), _f32(np.inf)
    for cols, rows in candidates:
        # float log_ratio promoted to double, std::log(1.0 * w / h) in double, stored in a float
        err = _f32(abs(float(log_ratio) - math.log(1.0 * cols / rows)))
        if err < best_err:
            best, best_err = (cols, rows), err
    return best


def slice_plan(width: int, height: int, params: MtmdVisionParams) -> SlicePlan:
    """mtmd_image_preprocessor_minicpmv::get_slice_instructions for a width x height image."""
    S, align = params.image_size, params.align
    ratio = _f32(_f32(width) * _f32(height)) / _f32(S * S)  # (float)w * h / (S * S), all float32
    original = (width, height)

    # minicpmv override, 4x only: small images keep their aspect (upscaled), no slices
    if params.n_merge == 2 and ratio <= 1.0:
        return SlicePlan(original, _best_resize(original, S, align, True), None, (0, 0), ())

    # llava-uhd: both sides within the slice size -> one stretched S x S overview (16x only in practice)
    if width <= S and height <= S:
        return SlicePlan(original, (S, S), None, (0, 0), ())

    overview = _best_resize(original, S, align, False)
    # log((float)w / h): the double log of a float32 quotient, stored in a float
    log_ratio = _f32(math.log(float(_f32(width) / _f32(height))))
    multiple = int(min(math.ceil(ratio), MAX_SLICE_NUMS))
    grid = _best_grid(multiple, log_ratio)
    refined = _refine_size(original, grid, S, align)
    cw, ch = refined[0] // grid[0], refined[1] // grid[1]
    slices = tuple((c * cw, r * ch, cw, ch) for r in range(grid[1]) for c in range(grid[0]))
    return SlicePlan(original, overview, refined, grid, slices)


# ---------------------------------------------------------------------------------------------
# pixels: Pillow-compatible bicubic and mtmd's letterbox

_PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed point: 22 fractional bits


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Pillow's bicubic kernel (a = -0.5, not PyTorch's -0.75)."""
    a = -0.5
    x = np.abs(x)
    return np.where(x < 1.0, ((a + 2.0) * x - (a + 3.0)) * x * x + 1,
                    np.where(x < 2.0, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def _coeffs(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per output pixel: input indices [out, k] and fixed-point weights [out, k] (0 past the bounds)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)  # downsampling widens the filter (antialias), upsampling does not
    support = 2.0 * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C casts truncate; both >= 0 here
    xmax = np.minimum((center + support + 0.5).astype(np.int64), in_size) - xmin  # tap count
    k = np.arange(ksize)
    valid = k[None, :] < xmax[:, None]
    ss = 1.0 / filterscale  # multiply by the reciprocal like Pillow (x / f can differ in the last bit)
    w = np.where(valid, _bicubic((k[None, :] + xmin[:, None] - center[:, None] + 0.5) * ss), 0.0)
    ww = np.zeros(out_size)
    for j in range(ksize):  # sequential sum, as in C (numpy's pairwise sum could differ in the last bit)
        ww += w[:, j]
    w = w / np.where(ww != 0.0, ww, 1.0)[:, None]
    # Pillow rounds with +-0.5 then truncates toward zero
    fixed = np.trunc(w * (1 << _PRECISION_BITS) + np.where(w < 0, -0.5, 0.5)).astype(np.int64)
    fixed[~valid] = 0
    idx = np.minimum(xmin[:, None] + k[None, :], in_size - 1)  # clipped indices only meet zero weights
    return idx, fixed


def _resample(img: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """One separable pass along `axis` (1 = width, 0 = height) of a uint8 HWC image."""
    idx, fixed = _coeffs(img.shape[axis], out_size)
    # int32 like the C code: 22 fractional bits leave headroom for 255 * sum|w| (no overflow)
    src = np.moveaxis(img, axis, 0).astype(np.int32)  # [in, other, 3]
    w32 = fixed.astype(np.int32)
    acc = np.full((out_size,) + src.shape[1:], 1 << (_PRECISION_BITS - 1), dtype=np.int32)  # +0.5 rounding bias
    for j in range(idx.shape[1]):
        acc += src[idx[:, j]] * w32[:, j, None, None]
    out = np.clip(acc >> _PRECISION_BITS, 0, 255).astype(np.uint8)  # arithmetic shift, then clip8
    return np.ascontiguousarray(np.moveaxis(out, 0, axis))


def _resize_bicubic(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """resize_pillow(BICUBIC): horizontal pass, then vertical, each only if that side changes."""
    if width != img.shape[1]:
        img = _resample(img, width, 1)
    if height != img.shape[0]:
        img = _resample(img, height, 0)
    return img


def resize(img: np.ndarray, size: tuple[int, int], pad: bool, pad_color: Sequence[int] = PAD_COLOR_RF) -> np.ndarray:
    """img_tool::resize, bicubic: uint8 HWC -> uint8 [size[1], size[0], 3]. pad=False is PAD_NONE
    (stretch); pad=True is PAD_CEIL: fit keeping the aspect (sides ceil'ed), centred, offsets floor'ed."""
    tw, th = size
    sh, sw = img.shape[:2]
    if (sw, sh) == (tw, th):
        return img.copy()
    if not pad:
        return _resize_bicubic(img, tw, th)
    scale = min(_f32(tw) / _f32(sw), _f32(th) / _f32(sh))  # float32, as in C++
    nw = min(int(math.ceil(_f32(sw) * scale)), tw)  # int * float -> float32 product, then ceil
    nh = min(int(math.ceil(_f32(sh) * scale)), th)
    out = np.empty((th, tw, 3), dtype=np.uint8)
    out[:] = np.asarray(pad_color, dtype=np.uint8)
    ox, oy = (tw - nw) // 2, (th - nh) // 2
    out[oy:oy + nh, ox:ox + nw] = _resize_bicubic(img, nw, nh)
    return out


def _as_rgb(image: Any) -> np.ndarray:
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError("expected a uint8 [H, W, 3] array or a PIL image")
        return image
    return np.asarray(image.convert("RGB"), dtype=np.uint8)  # what the runtime hands to mtmd_bitmap_init


def chunk_pixels(image: Any, params: MtmdVisionParams, plan: SlicePlan | None = None) -> list[np.ndarray]:
    """mtmd's uint8 HWC chunks before normalization: overview, then slices row by row."""
    rgb = _as_rgb(image)
    if plan is None:
        plan = slice_plan(rgb.shape[1], rgb.shape[0], params)
    out = [resize(rgb, plan.overview, pad=False)]  # image_pad_ov = PAD_NONE
    if plan.slices:
        assert plan.refined is not None
        refined = resize(rgb, plan.refined, pad=True)  # image_pad_rf = PAD_CEIL, black
        out += [refined[y:y + h, x:x + w].copy() for x, y, w, h in plan.slices]
    return out


def _normalize(chunk: np.ndarray, params: MtmdVisionParams) -> np.ndarray:
    # clip_image_f32::from_u8 then normalize, all float32: (u8 / 255.0f - mean) / std
    x = chunk.astype(np.float32) / _f32(255.0)
    x = (x - np.asarray(params.image_mean, dtype=np.float32)) / np.asarray(params.image_std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess(image: Any, params: MtmdVisionParams) -> list[np.ndarray]:
    """float32 [3, H, W] per chunk, in mtmd chunk order, normalized like mtmd."""
    return [_normalize(c, params) for c in chunk_pixels(image, params)]


# ---------------------------------------------------------------------------------------------
# the transformers side


def pack_for_reference(chunks: Sequence[np.ndarray], patch_size: int) -> tuple[Any, Any]:
    """NaViT packing of [3, H, W] chunks as MiniCPMV4_6's image processor lays them out:
    pixel_values float32 (1, 3, patch, sum(L)), each chunk's patches row-major and each patch's
    rows stacked along dim 2, its columns along dim 3; target_sizes int32 (n, 2) = (H/p, W/p)."""
    import torch

    p = patch_size
    packed, sizes = [], []
    for c in chunks:
        ch, h, w = c.shape
        if h % p or w % p:
            raise ValueError(f"chunk {w}x{h} is not a multiple of the patch size {p}")
        nh, nw = h // p, w // p
        x = np.asarray(c, dtype=np.float32).reshape(ch, nh, p, nw, p).transpose(0, 2, 1, 3, 4)
        packed.append(x.reshape(ch, p, nh * nw * p))
        sizes.append((nh, nw))
    pv = torch.from_numpy(np.ascontiguousarray(np.concatenate(packed, axis=-1)[None]))
    return pv, torch.tensor(sizes, dtype=torch.int32)


def unpack_reference(pixel_values: Any, target_sizes: Any, patch_size: int) -> list[np.ndarray]:
    """The inverse of pack_for_reference (e.g. to read transformers' processor output as images)."""
    pv = np.asarray(pixel_values, dtype=np.float32)[0]
    ch, p = pv.shape[0], patch_size
    out, start = [], 0
    for nh, nw in np.asarray(target_sizes).tolist():
        n = nh * nw * p
        x = pv[:, :, start:start + n].reshape(ch, p, nh, nw, p).transpose(0, 2, 1, 3, 4)
        out.append(np.ascontiguousarray(x.reshape(ch, nh * p, nw * p)))
        start += n
    return out


def reference_embeddings(ref_model: Any, chunks: Sequence[np.ndarray], params: MtmdVisionParams,
                         mode: str | None = None) -> list[np.ndarray]:
    """The transformers vision tower + merger on the given chunks: float32 [n_tokens, n_embd] per chunk.
    `ref_model` is a MiniCPMV4_6 model or anything with it as `.model` (ReferenceRuntime)."""
    import torch

    model = ref_model if hasattr(ref_model, "get_image_features") else ref_model.model
    pv, ts = pack_for_reference(chunks, params.patch_size)
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=pv.float(), target_sizes=ts, downsample_mode=mode or params.mode)
    return [f.float().numpy() for f in feats.pooler_output]


def expected_token_counts(plan: SlicePlan, params: MtmdVisionParams, mode: str | None = None) -> list[int]:
    """Embedding rows per chunk: (W/p) * (H/p) / merge^2, merge 4 in "16x" and 2 in "4x"."""
    merge = {"16x": 4, "4x": 2}[mode or params.mode]
    p = params.patch_size
    return [(w // p) * (h // p) // (merge * merge) for w, h in plan.chunk_sizes]
