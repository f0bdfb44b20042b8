"""quantize.kquants against llama.cpp's own quantizer (ggml_quantize_chunk from llama-cpp-python's
libggml-base): the same bytes for every type, with and without an importance matrix, on data
chosen to hit the corner cases (ties, zero groups, fp16 underflow of the scales, outliers, ...).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from quantize import ggml, ggml_ref, kquants

if not ggml_ref.available():  # pragma: no cover
    pytest.skip("libggml-base from llama-cpp-python not loadable", allow_module_level=True)

KTYPES = [T.Q4_K, T.Q5_K, T.Q6_K, T.Q2_K, T.Q3_K]


@pytest.fixture(autouse=True, params=["numba", "numpy"])
def searches(request, monkeypatch):
    """Every test twice: the scale searches compiled by numba (kquants_jit) and in plain numpy."""
    from quantize import kquants_jit

    if request.param == "numba" and not kquants_jit.available():
        pytest.skip("numba is not installed")
    monkeypatch.setenv("MINICPMV_KQUANTS_JIT", "1" if request.param == "numba" else "0")
    return request.param
LEGACY = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]
N = 512  # values per row (two super-blocks)
ROWS = 6  # rows per data set


def _datasets(n: int = N, rows: int = ROWS, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    g = lambda s=1.0: (rng.standard_normal((rows, n)) * s).astype(np.float32)
    d: dict[str, np.ndarray] = {}
    d["gauss"] = g(0.02)
    x = g(0.02)
    idx = rng.integers(0, n, size=(rows, 4))
    np.put_along_axis(x, idx, x.take(idx) * 100 + np.sign(rng.standard_normal(idx.shape)), axis=1)
    d["outliers"] = x
    d["zeros"] = np.zeros((rows, n), np.float32)
    d["signed_zeros"] = np.where(rng.random((rows, n)) < 0.5, np.float32(-0.0), np.float32(0.0)).astype(np.float32)
    d["const"] = np.repeat(np.array([1.0, -1.0, 0.5, -3.0, 1e-3, 7.0], np.float32)[:rows, None], n, axis=1)
    tiny = g(1.0)
    tiny *= (10.0 ** -np.array([6, 10, 15, 20, 25, 30], np.float64)[:rows, None]).astype(np.float32)
    d["tiny"] = tiny
    d["subnormal_mix"] = g(1e-5) * (rng.random((rows, n)) < 0.3).astype(np.float32)
    d["large"] = g(1.0) * np.array([1e4, 1e6, 1e4, 1e6, 3e5, 1e5], np.float32)[:rows, None]
    d["integers"] = rng.integers(-8, 9, size=(rows, n)).astype(np.float32)
    d["half_int"] = (rng.integers(-16, 17, size=(rows, n)) / 2).astype(np.float32)
    d["small_int"] = rng.integers(-2, 3, size=(rows, n)).astype(np.float32)
    d["sparse"] = g(0.05) * (rng.random((rows, n)) < 0.05)
    d["bf16"] = (g(0.02).view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
    d["fp16"] = g(0.02).astype(np.float16).astype(np.float32)
    d["laplace"] = rng.laplace(0, 0.02, (rows, n)).astype(np.float32)
    d["relu"] = np.maximum(g(1.0), 0)
    d["negative"] = -np.abs(g(1.0)) - 0.5
    d["offset"] = g(0.01) + 0.3
    d["block_scales"] = g(1.0) * (10.0 ** rng.uniform(-4, 2, (rows, n // 32, 1))).astype(np.float32).repeat(32, 2).reshape(rows, n)
    x = g(0.02)
    x[:, ::16] = 0.5
    d["spikes"] = x
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in d.items()}


def _imatrices(n: int = N, seed: int = 1) -> dict[str, np.ndarray | None]:
    rng = np.random.default_rng(seed)
    im: dict[str, np.ndarray | None] = {"none": None}
    im["lognormal"] = np.exp(rng.standard_normal(n)).astype(np.float32)
    z = np.exp(rng.standard_normal(n)).astype(np.float32)
    z[rng.random(n) < 0.3] = 0
    z[:32] = 0  # a whole block with zero importance
    im["with_zeros"] = z
    im["huge_range"] = (10.0 ** rng.uniform(-8, 8, n)).astype(np.float32)
    im["uniform"] = np.ones(n, np.float32)
    return im


DATA = _datasets()
STACK = np.concatenate(list(DATA.values()))
NAMES = [k for k, v in DATA.items() for _ in range(len(v))]
IMAT = _imatrices()


def _mismatches(ours: np.ndarray, ref: np.ndarray) -> list[str]:
    bad = np.flatnonzero((ours != ref).any(axis=1))
    return sorted({NAMES[i] for i in bad})


@pytest.mark.parametrize("imkind", list(IMAT))
@pytest.mark.parametrize("qtype", KTYPES + LEGACY, ids=lambda t: t.name)
def test_same_bytes_as_ggml(qtype, imkind):
    im = IMAT[imkind]
    ref = ggml_ref.quantize_chunk(STACK, qtype, im)
    ours = kquants.quantize(STACK, qtype, im)
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    assert not _mismatches(ours, ref), f"{qtype.name} imatrix={imkind}: rows differ in {_mismatches(ours, ref)}"


@pytest.mark.parametrize("qtype", KTYPES + LEGACY, ids=lambda t: t.name)
def test_small_shapes(qtype):
    """One block, one row: single-group reductions must stay sequential (numpy goes pairwise there)."""
    bs = GGML_QUANT_SIZES[qtype][0]
    rng = np.random.default_rng(7)
    for shape in [(1, bs), (3, bs), (1, 2 * bs), (2, 3 * bs)]:
        x = (rng.standard_normal(shape) * np.exp(rng.standard_normal(shape) * 2)).astype(np.float32)
        for im in (None, np.exp(rng.standard_normal(shape[1])).astype(np.float32)):
            assert np.array_equal(kquants.quantize(x, qtype, im), ggml_ref.quantize_chunk(x, qtype, im)), shape


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K, T.Q4_1], ids=lambda t: t.name)
def test_independent_of_chunks_and_threads(qtype, monkeypatch):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((40, 1024)) * 0.02).astype(np.float32)
    im = np.exp(rng.standard_normal(1024)).astype(np.float32)
    ref = ggml_ref.quantize_chunk(x, qtype, im)
    monkeypatch.setattr(kquants, "CHUNK_SUPERBLOCKS", 7)
    monkeypatch.setattr(kquants, "CHUNK_BLOCKS_LEGACY", 100)
    assert np.array_equal(kquants.quantize(x, qtype, im, threads=2), ref)
    assert np.array_equal(kquants.quantize(x, qtype, im, threads=1), ref)


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q5_K, T.Q2_K, T.Q4_1, T.Q5_1], ids=lambda t: t.name)
def test_exact_rounding_fallback(qtype, monkeypatch):
    """make_qkx*_quants rounds with np.rint when every value is provably within nearest_int's exact
    range, else with the bit trick itself; force the bit-trick path and check it gives the same bytes."""
    from quantize import kquants_core

    monkeypatch.setattr(kquants_core, "_RINT_SAFE", np.float32(-1e30))
    monkeypatch.setenv("MINICPMV_KQUANTS_JIT", "0")  # the fallback is numpy's; numba always takes the bit trick
    x = STACK[::3]
    for im in (None, IMAT["lognormal"]):
        assert np.array_equal(kquants.quantize(x, qtype, im), ggml_ref.quantize_chunk(x, qtype, im))


def test_nearest_int_matches_c_bit_trick():
    from quantize.kquants_core import nearest_int

    v = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 4194303.0, -4194303.0, 1e7, -1e7, 3e9, 0.49999997], np.float32)
    ref = ((v + np.float32(12582912.0)).view(np.int32) & 0x7FFFFF) - 0x400000
    assert np.array_equal(nearest_int(v), ref)
    assert list(nearest_int(v[:5])) == [0, 2, 2, 0, -2]


# relative RMS error bounds for N(0,1) data (observed values are about 60-70% of these)
RMSE = {T.Q2_K: 0.45, T.Q3_K: 0.25, T.Q4_K: 0.12, T.Q5_K: 0.06, T.Q6_K: 0.03,
        T.Q4_0: 0.15, T.Q4_1: 0.12, T.Q5_0: 0.07, T.Q5_1: 0.06, T.Q8_0: 0.01}


@pytest.mark.parametrize("qtype", KTYPES + LEGACY, ids=lambda t: t.name)
def test_roundtrip_close(qtype):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((16, 1024)).astype(np.float32)
    im = np.exp(rng.standard_normal(1024)).astype(np.float32)
    for imat in (None, im):
        y = gq.dequantize(kquants.quantize(x, qtype, imat), qtype).reshape(x.shape)
        err = np.sqrt(np.mean((y - x) ** 2)) / np.sqrt(np.mean(x ** 2))
        assert err < RMSE[qtype], (qtype.name, imat is not None, err)


def test_encode_routes_to_kquants():
    rng = np.random.default_rng(9)
    x = (rng.standard_normal((4, 512)) * 0.02).astype(np.float32)
    im = np.exp(rng.standard_normal(512)).astype(np.float32)
    for qtype in KTYPES + LEGACY:
        assert qtype in ggml.SUPPORTED
        for imat in (None, im):
            for q in ("kquants", "ggml"):  # this project's port and llama.cpp's own code, through encode
                assert np.array_equal(ggml.encode(x, qtype, imatrix=imat, quantizer=q),
                                      ggml_ref.quantize_chunk(x, qtype, imat)), (qtype.name, q)
        y = ggml.decode(ggml.encode(x, qtype), qtype, x.shape)
        assert y.shape == x.shape
    # 3-D tensors: rows are the last axis
    x3 = x.reshape(2, 2, 512)
    assert np.array_equal(ggml.encode(x3, T.Q4_K, quantizer="kquants").reshape(4, -1), ggml_ref.quantize_chunk(x, T.Q4_K))
    assert np.array_equal(ggml.encode(x, T.F16), x.astype(np.float16))


def test_errors():
    x = np.zeros((2, 300), np.float32)
    with pytest.raises(ValueError):
        kquants.quantize(x, T.Q4_K)
    with pytest.raises(ValueError):
        kquants.quantize(np.zeros((2, 256), np.float32), T.Q4_K, np.ones(128, np.float32))
    with pytest.raises(ValueError):
        kquants.quantize(np.zeros((2, 256), np.float32), T.IQ4_NL)


def test_inf_matches_ggml():
    """±Inf inputs: same bytes as ggml (inf*0 = NaN goes through the bit trick as in C, NaN never
    wins C's `>` comparisons)."""
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((16, 512)) * 0.02).astype(np.float32)
    x[np.arange(16), rng.integers(0, 512, 16)] = np.where(rng.random(16) < 0.5, np.inf, -np.inf)
    x[::2, 7] = np.inf
    im = IMAT["lognormal"]
    for qtype in KTYPES + LEGACY:
        for imat in (None, im):
            assert np.array_equal(kquants.quantize(x, qtype, imat), ggml_ref.quantize_chunk(x, qtype, imat)), qtype.name


def test_nan_is_deterministic_and_local():
    """NaN inputs (the converter refuses them): blocks holding a NaN get deterministic bytes that
    usually, but not always, equal ggml's; every other block is still exact."""
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((4, 512)) * 0.02).astype(np.float32)
    x[0, 5] = np.nan
    x[1, 256] = np.nan  # first element of a super-block
    x[2, ::32] = np.nan  # first element of every block
    for qtype in KTYPES + LEGACY:
        for imat in (None, IMAT["lognormal"]):
            a = kquants.quantize(x, qtype, imat)
            assert np.array_equal(a, kquants.quantize(x, qtype, imat))
            ref = ggml_ref.quantize_chunk(x, qtype, imat)
            bs, ts = GGML_QUANT_SIZES[qtype]
            clean = ~np.isnan(x.reshape(-1, bs)).any(axis=1)
            if imat is not None and bs == 32 and qtype != T.Q8_0:
                # the legacy imatrix paths use the whole row's sum of squares: a NaN anywhere
                # in a row reaches every block of that row
                clean &= np.repeat(~np.isnan(x).any(axis=1), x.shape[1] // bs)
            assert np.array_equal(a.reshape(-1, ts)[clean], ref.reshape(-1, ts)[clean]), qtype.name


@pytest.mark.parametrize("qtype", sorted(ggml.SUPPORTED - {T.F32, T.F16}, key=int), ids=lambda t: t.name)
def test_decode_by_ggml_equals_numpy(qtype, monkeypatch):
    """ggml.decode reads blocks with ggml's own to_float when libggml is there: the same floats as
    gguf-py's numpy dequantizer (the path without it), scales spanning several orders included."""
    rng = np.random.default_rng(int(qtype))
    x = (rng.standard_normal((64, 512)) * rng.exponential(1.0, (64, 1)) * 10.0 ** rng.integers(-3, 3, (64, 1)))
    data = ggml.encode(x.astype(np.float32), qtype)
    fast = ggml.decode(data, qtype, x.shape)
    monkeypatch.setattr(ggml, "_have_ggml", lambda: False)
    slow = ggml.decode(data, qtype, x.shape)
    assert fast.dtype == slow.dtype == np.float32
    assert np.array_equal(fast, slow)
    with pytest.raises(ValueError, match="whole rows"):
        ggml_ref.dequantize_rows(data.reshape(-1)[:-1], qtype, 512)
