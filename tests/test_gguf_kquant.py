"""One-pass k-quant export against llama.cpp's own llama_model_quantize: the same type and bytes for
every tensor, on a shape where every row is a multiple of 256 with 8 layers (`tiny-k`, so Q4_K/Q5_K/Q6_K
blocks and the use_more_bits pattern are exercised) and one that triggers every fallback (`tiny-alt`)."""

import re

import pytest
from gguf import GGMLQuantizationType as T

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[llama]')")

from convert import Checkpoint, ConvertError  # noqa: E402
from convert.gguf.export import export_gguf, parse_quant, plan_outputs  # noqa: E402
from quantize.mixtures import MIXTURES, Overrides  # noqa: E402
from validate.gguf_diff import diff  # noqa: E402
from validate.upstream import upstream_quantize  # noqa: E402


@pytest.fixture(scope="module", params=["tiny-k", "tiny-alt"])
def shape(request, tmp_path_factory):
    d = request.getfixturevalue("tiny_k_dir" if request.param == "tiny-k" else "tiny_alt_dir")
    c = Checkpoint(d)
    f32 = export_gguf(c, tmp_path_factory.mktemp("f32"), quant="f32", quiet=True)[0]
    return request.param, c, f32


def _same(tmp_path, c, f32, quant, overrides=None, **upstream_kw):
    ours = export_gguf(c, tmp_path / "ours", quant=quant, quiet=True, overrides=overrides)[0]
    theirs = upstream_quantize(f32, tmp_path / "theirs.gguf", quant, **upstream_kw)
    d = diff(ours, theirs)
    assert d.is_identical(), f"{quant}: {d.summary()}"
    return ours


@pytest.mark.parametrize("quant", sorted(MIXTURES))
def test_mixture_bit_identical(tmp_path, shape, quant):
    _same(tmp_path, shape[1], shape[2], quant)


def test_mixture_exercises_the_rules(tmp_path, shape):
    """The shapes do what they are for: Q6_K bumps on tiny-k, fallbacks on tiny-alt."""
    name, c, _ = shape
    plans = {p.name: p.qtype for p in plan_outputs(c, tmp_path, "Q4_K_M")[0].plans}
    types = set(plans.values())
    if name == "tiny-k":
        assert {T.Q4_K, T.Q6_K} <= types and T.Q5_0 not in types
        n = c.spec.text.num_layers
        bumped = [i for i in range(n) if plans[f"blk.{i}.ffn_down.weight"] == T.Q6_K]
        assert 0 < len(bumped) < n
    else:
        assert {T.Q5_0, T.Q8_0, T.F16} <= types  # Q4_K->Q5_0, Q6_K->Q8_0, not a multiple of 32 -> F16


@pytest.mark.parametrize("case", ["pure", "output", "token_embd", "tensor_type"])
def test_overrides_bit_identical(tmp_path, shape, case):
    _, c, f32 = shape
    ov, kw = {
        "pure": (Overrides(pure=True), dict(pure=True)),
        "output": (Overrides(output_type=T.Q8_0), dict(output_type=T.Q8_0)),
        "token_embd": (Overrides(token_embedding_type=T.Q5_K), dict(token_embedding_type=T.Q5_K)),
        "tensor_type": (Overrides(tensor_types=[(re.compile(r"ffn_up"), T.Q8_0), (re.compile(r"attn_gate"), T.Q5_K)]),
                        dict(tensor_types=[("ffn_up", T.Q8_0), ("attn_gate", T.Q5_K)])),
    }[case]
    if case == "token_embd" and c.spec.text.hidden_size % 256:
        # llama.cpp applies this override without a fallback and aborts; this tool says why
        with pytest.raises(ConvertError, match="token_embd.weight: rows of .* cannot be stored as Q5_K"):
            export_gguf(c, tmp_path / "ours", quant="Q4_K_M", quiet=True, overrides=ov)
        return
    _same(tmp_path, c, f32, "Q4_K_M", overrides=ov, **kw)


def test_quant_flag_parsing():
    assert parse_quant("q4_k_m").mixture is MIXTURES["Q4_K_M"] and parse_quant("F16").float_type == T.F16
    with pytest.raises(ConvertError, match="unknown --quant 'Q4_K_X'"):
        parse_quant("Q4_K_X")


def test_real_siglip_dims_take_kquants_only_where_rows_fit():
    """On the real config, a Q4_K_M projector keeps patch/position embeddings F32, puts k-quants only
    where rows are a multiple of 256 (the mergers), falls back to Q5_0 on 1152-wide rows and to F16 on
    the 4304-wide ViT ffn_down."""
    import copy

    from convert import ModelSpec
    from convert.gguf.export import quantized_plan
    from convert.gguf.plan import plan_from_spec
    from convert.synth.presets import REAL_CONFIG

    spec = ModelSpec.from_config(copy.deepcopy(REAL_CONFIG))
    plans, fallbacks = quantized_plan(plan_from_spec(spec, "mmproj", T.F32), parse_quant("Q4_K_M"), spec.vision.num_layers)
    ty = {p.name: p.qtype for p in plans}
    assert ty["v.patch_embd.weight"] == T.F32 and ty["v.position_embd.weight"] == T.F32
    assert ty["mm.up.weight"] in (T.Q4_K, T.Q6_K) and ty["v.vit_merger.ds_ffn_up.weight"] in (T.Q4_K, T.Q6_K)
    assert ty["v.blk.0.attn_q.weight"] == T.Q5_0 and ty["v.blk.0.ffn_up.weight"] == T.Q5_0
    assert ty["v.blk.5.ffn_down.weight"] == T.F16
    assert "v.blk.5.ffn_down.weight" in fallbacks


@pytest.mark.parametrize("mmq", ["q8_0", "Q4_K_M"])
def test_quantized_mmproj_loads_in_mtmd(tmp_path, tiny_k_dir, mmq):
    """llama-quantize refuses `clip` files; this project quantizes the projector, and mtmd runs it."""
    import numpy as np
    from PIL import Image

    from runtimes.llamacpp import LlamaCppRuntime
    from runtimes.reference import ReferenceRuntime
    from validate.metrics import embedding_agreement

    dec, mm = export_gguf(Checkpoint(tiny_k_dir), tmp_path, quant="Q4_K_M", mmproj_quant=mmq, quiet=True)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).resize((448, 448), Image.BICUBIC)
    ref = ReferenceRuntime(tiny_k_dir).image_embeddings(img)
    with LlamaCppRuntime(dec, mm, n_ctx=1024) as rt:
        got = rt.image_embeddings(img)
    m = embedding_agreement(ref[0], got[0])
    print(f"mmproj {mmq}: {m}")
    assert len(got) == len(ref) and got[0].shape == ref[0].shape
    assert m["cosine"] >= (0.999 if mmq == "q8_0" else 0.98), m


@pytest.fixture(scope="module")
def imatrix_file(tmp_path_factory, shape):
    """An importance matrix of this shape's model from the default image+text calibration set."""
    from convert.gguf.imatrix import collect_imatrix
    from quantize.calibration import load_calibration
    from quantize.imatrix import write_imatrix_gguf

    _, c, _ = shape
    samples, dataset = load_calibration("default", tokenizer=c.tokenizer, n=8, seqlen=256, seed=0)
    data = collect_imatrix(c, samples, seqlen=256, datasets=[dataset], quiet=True)
    return write_imatrix_gguf(tmp_path_factory.mktemp("imat") / "imatrix.gguf", data)


@pytest.mark.parametrize("quant", ["Q4_K_M", "Q5_K_M", "Q6_K", "Q3_K_M", "Q2_K", "Q4_0", "Q5_1"])
def test_mixture_with_imatrix_bit_identical(tmp_path, shape, imatrix_file, quant):
    """With an importance matrix, the bytes equal llama_model_quantize fed the same importances."""
    from quantize.imatrix import importance, read_imatrix

    _, c, f32 = shape
    ours = export_gguf(c, tmp_path / "ours", quant=quant, quiet=True, imatrix=imatrix_file)[0]
    data = read_imatrix(imatrix_file)
    theirs = upstream_quantize(f32, tmp_path / "theirs.gguf", quant, imatrix={n: importance(data, n) for n in data.names()})
    d = diff(ours, theirs)
    # the quantize.imatrix.* keys are what the llama-quantize CLI adds; the library call does not
    assert sorted(d.keys_only_a) == sorted(k for k in d.keys_only_a if k.startswith("quantize.imatrix."))
    d.keys_only_a = []
    assert d.is_identical(), f"{quant}: {d.summary()}"
    plain = export_gguf(c, tmp_path / "plain", quant=quant, quiet=True)[0]
    weighted = {p.qtype for p in plan_outputs(c, tmp_path, quant)[0].plans} - {T.F32, T.F16, T.Q8_0}
    # the imatrix changes every type that uses it (Q8_0 ignores it: tiny-alt's Q6_K all falls back to Q8_0)
    assert bool(diff(ours, plain).tensors_bytes_differ) == bool(weighted)


def test_one_value_head_weights_stay_as_they_came(tmp_path):
    """A Gated DeltaNet with one value head has [1, hidden] ssm_alpha / ssm_beta: ggml_n_dims is 1,
    so llama-quantize leaves them unquantized (F32 from an F32 file). A drawn shape the presets lack."""
    from convert.synth.build import build_synthetic
    from convert.synth.draw import draw_preset

    p = draw_preset(103)
    assert p.text["linear_num_value_heads"] == 1
    build_synthetic(p, tmp_path / "m", seed=0, report=False, quiet=True)
    c = Checkpoint(tmp_path / "m")
    f32 = export_gguf(c, tmp_path / "f32", quant="f32", quiet=True)[0]
    ours = _same(tmp_path, c, f32, "Q4_K_M")
    from gguf import GGUFReader

    assert {t.tensor_type.name for t in GGUFReader(ours).tensors if ".ssm_alpha." in t.name} == {"F32"}
