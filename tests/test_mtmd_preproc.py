"""runtimes/mtmd_preproc.py: mtmd's MiniCPM-V 4.6 image preprocessing in numpy.

The decisive check feeds our chunks through the transformers vision tower and compares the
embeddings with what llama.cpp (mtmd) computes from its own preprocessing of the same image, chunk
by chunk, on the tiny synthetic model exported to F32. Float noise alone gives cosines ~1 - 2e-7;
changing 1% of the pixel values by one level already costs ~2e-6, so cosines at the noise floor
mean the pixels are the same.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from runtimes import mtmd_preproc as mp
from validate.metrics import cosine

SIZES_16X = [(448, 448), (300, 200), (500, 100), (1344, 896), (2000, 2000), (600, 1000)]
# 4x: the two brief's sizes plus the minicpmv special case (w*h <= 448^2: aspect kept, no slices),
# including 500x100 where that case overrides llava-uhd's "a side > 448 means slices"
SIZES_4X = [(448, 448), (1344, 896), (300, 200), (500, 100)]
CASES = [("16x", s) for s in SIZES_16X] + [("4x", s) for s in SIZES_4X]
MIN_COSINE = 0.9999


@functools.lru_cache(maxsize=None)
def _picture(w: int, h: int, seed: int = 0):
    """Deterministic test picture: colour gradients, a disc, a rectangle, a little noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([255 * x / max(w - 1, 1), 255 * y / max(h - 1, 1), 127 + 100 * np.sin(x / 17.0 + y / 23.0)], -1)
    cx, cy, r = w * 0.35, h * 0.4, min(w, h) * 0.2
    img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = (230, 40, 40)
    img[int(h * 0.6):int(h * 0.85), int(w * 0.55):int(w * 0.9)] = (20, 60, 200)
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _params(n_merge: int) -> mp.MtmdVisionParams:
    return mp.MtmdVisionParams(448, 14, n_merge, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


# ---------------------------------------------------------------------------------------------
# pure arithmetic and pixels (no llama.cpp)


def test_sizes_follow_mtmd_arithmetic():
    # std::round on a float32 quotient: 140 / 56 = 2.5 rounds away from zero (Python's round gives 2)
    assert mp._ensure_divide(140, 56) == 168 and mp._ensure_divide(20, 56) == 56
    p16, p4 = _params(4), _params(2)
    # 16x: both sides <= 448 -> one 448x448 overview, stretched whatever the aspect
    assert mp.slice_plan(300, 200, p16) == mp.SlicePlan((300, 200), (448, 448), None, (0, 0), ())
    # 4x: w*h <= 448^2 -> aspect kept: h = int(448 / sqrt(1.5)) = 365, w = int(365 * 1.5) = 547 -> 560x364
    assert mp.slice_plan(300, 200, p4) == mp.SlicePlan((300, 200), (560, 364), None, (0, 0), ())
    # 16x, 500x100: a side > 448 forces slices even though w*h / 448^2 = 0.25 -> 2 columns
    plan = mp.slice_plan(500, 100, p16)
    assert (plan.overview, plan.refined, plan.grid) == ((504, 112), (1456, 280), (2, 1))
    assert plan.slices == ((0, 0, 728, 280), (728, 0, 728, 280))
    assert mp.expected_token_counts(plan, p16) == [18, 65, 65]
    # square 2000x2000: 9 slices in a 3x3 grid of 448x448
    plan = mp.slice_plan(2000, 2000, p16)
    assert plan.grid == (3, 3) and plan.refined == (1344, 1344) and plan.n_chunks == 10
    assert plan.slices[4] == (448, 448, 448, 448)


@pytest.mark.parametrize("src,dst", [((301, 57), (913, 57)), ((640, 37), (97, 37)),
                                     ((41, 333), (41, 1000)), ((29, 777), (29, 150))])
def test_bicubic_matches_pillow(src, dst):
    """One-axis resizes equal Pillow's bicubic to the bit (mtmd's resampler is Pillow's). Two-axis
    ones are not compared: Pillow 13 may run the vertical pass first, mtmd always goes horizontal first."""
    from PIL import Image

    a = np.random.default_rng(1).integers(0, 256, (src[1], src[0], 3), dtype=np.uint8)  # noise: worst case
    ours = mp.resize(a, dst, pad=False)
    assert np.array_equal(ours, np.asarray(Image.fromarray(a).resize(dst, Image.BICUBIC)))


def test_letterbox_geometry():
    """PAD_CEIL: 500x100 into 1456x280 scales by 2.8 (height-bound), content 1400 wide, centred at x=28,
    the rest black."""
    a = np.full((100, 500, 3), 200, dtype=np.uint8)
    out = mp.resize(a, (1456, 280), pad=True)
    assert out.shape == (280, 1456, 3)
    assert not out[:, :28].any() and not out[:, 1428:].any()
    assert (out[:, 28:1428] == 200).all()
    chunks = mp.chunk_pixels(a, _params(4))
    assert [c.shape[:2] for c in chunks] == [(112, 504), (280, 728), (280, 728)]
    assert not chunks[1][:, :28].any() and not chunks[2][:, -28:].any()


def test_pack_round_trip_and_processor_layout(reference):
    """Our packing is the processor's: unpacking its output and packing again is the identity, and
    for a 448x448 image (no resize on either side) its single chunk equals ours."""
    img = _picture(448, 448)
    inp = reference.image_inputs(img, "16x")
    theirs = mp.unpack_reference(inp["pixel_values"], inp["target_sizes"], 14)
    pv, ts = mp.pack_for_reference(theirs, 14)
    assert np.array_equal(pv.numpy(), inp["pixel_values"].numpy())
    assert np.array_equal(ts.numpy(), inp["target_sizes"].numpy())
    ours = mp.preprocess(img, _params(4))
    assert len(ours) == len(theirs) == 1 and ours[0].shape == theirs[0].shape == (3, 448, 448)
    np.testing.assert_allclose(ours[0], theirs[0], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# against llama.cpp


@pytest.fixture(scope="module")
def mtmd_rts(tiny_gguf):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python==0.3.36 is not installed (pip install -e '.[llama]')")
    from runtimes.llamacpp import LlamaCppRuntime

    dec, mm = tiny_gguf("f32")
    opened = {mode: LlamaCppRuntime(dec, mm[mode], n_ctx=1024, n_threads=2) for mode in ("16x", "4x")}
    params = {mode: mp.MtmdVisionParams.from_gguf(mm[mode]) for mode in opened}
    yield opened, params
    for r in opened.values():
        r.close()


def test_params_from_gguf(mtmd_rts):
    _, params = mtmd_rts
    assert params["16x"] == _params(4) and params["16x"].mode == "16x"
    assert params["4x"] == _params(2) and params["4x"].mode == "4x"


@pytest.mark.parametrize("mode,size", CASES, ids=[f"{m}-{w}x{h}" for m, (w, h) in CASES])
def test_matches_mtmd(mtmd_rts, reference, mode, size):
    rts, params = mtmd_rts
    rt, prm = rts[mode], params[mode]
    img = _picture(*size)
    plan = mp.slice_plan(*size, prm)

    layout = [c.n_tokens for c in rt.image_layout(img) if c.kind == "image"]
    assert mp.expected_token_counts(plan, prm, mode) == layout, f"plan {plan}"

    chunks = mp.preprocess(img, prm)
    assert [c.shape[1:][::-1] for c in chunks] == plan.chunk_sizes
    ours = mp.reference_embeddings(reference, chunks, prm, mode)
    theirs = rt.image_embeddings(img)
    assert [e.shape for e in ours] == [e.shape for e in theirs]
    cos = [cosine(a, b) for a, b in zip(ours, theirs)]
    print(f"\n{mode} {size[0]}x{size[1]}: grid {plan.grid}, tokens {layout}, min cosine {min(cos):.9f}")
    assert min(cos) >= MIN_COSINE, cos
