"""Static validation of GGUF artifacts (validate.weights): good files pass, planted faults are named."""

import json
from collections import Counter

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader

from convert import Checkpoint, ConvertError
from convert.gguf import transforms
from convert.gguf.plan import build_plan
from validate.gguf_diff import tensor_f32
from validate.faults import raw, rewrite  # noqa: E402
from validate.weights import (artifact_kind, check_metadata, check_tensors, fake_quant_state_dict, iter_fake_quant,
                              load_fake_quant)


def failures(results):
    return {r.name: r.message for r in results if r.status == "fail"}


@pytest.mark.parametrize("quant", ["f16", "q8_0", "Q4_K_M"])
def test_good_artifacts_pass(tiny_gguf, tiny_ckpt, quant):
    dec, mm = tiny_gguf(quant)
    assert artifact_kind(dec) == ("decoder", None)
    assert artifact_kind(mm["16x"]) == ("mmproj", "16x") and artifact_kind(mm["4x"]) == ("mmproj", "4x")
    for path in (dec, mm["16x"], mm["4x"]):
        res = check_tensors(tiny_ckpt, path)
        assert len(res) == len(GGUFReader(path).tensors)
        assert {(r.status, r.matched) for r in res} == {("pass", "exact")}, failures(res)
        assert check_metadata(tiny_ckpt, path) == []
    q = {r.name: r for r in check_tensors(tiny_ckpt, dec)}
    assert "output.weight" not in q  # tied embeddings
    if quant == "Q4_K_M":
        assert q["blk.0.ffn_up.weight"].qtype == "Q4_K" and 0 < q["blk.0.ffn_up.weight"].rel_err < 0.2


def test_planted_tensor_faults(tmp_path, tiny_gguf, tiny_ckpt):
    dec, _ = tiny_gguf("f16")
    norm = raw(dec, "blk.0.attn_norm.weight")
    z = tiny_ckpt.tensor("model.language_model.layers.1.linear_attn.in_proj_z.weight")
    bad = rewrite(dec, tmp_path / "bad.gguf", data={
        "blk.0.attn_norm.weight": norm - np.float32(1),  # the offset norm written without its +1
        "blk.0.ffn_up.weight": raw(dec, "blk.1.ffn_up.weight"), "blk.1.ffn_up.weight": raw(dec, "blk.0.ffn_up.weight"),
        "blk.1.attn_gate.weight": z.astype(np.float16),  # V heads left in HF's grouped order
    })
    f = failures(check_tensors(tiny_ckpt, bad))
    assert set(f) == {"blk.0.attn_norm.weight", "blk.0.ffn_up.weight", "blk.1.ffn_up.weight", "blk.1.attn_gate.weight"}
    assert f["blk.1.attn_gate.weight"].endswith("attn_gate.weight: looks like the source without transform v_rows")
    assert f["blk.0.attn_norm.weight"] == ("bad.gguf: tensor blk.0.attn_norm.weight: "
                                           "looks like the source without transform add_one")
    assert f["blk.0.ffn_up.weight"].startswith("bad.gguf: tensor blk.0.ffn_up.weight: holds the data of blk.1.ffn_up.weight")
    assert "holds the data of blk.0.ffn_up.weight" in f["blk.1.ffn_up.weight"]


def test_planted_swap_of_quantized_bytes_and_structure(tmp_path, tiny_gguf, tiny_ckpt):
    dec, _ = tiny_gguf("Q4_K_M")
    from quantize import ggml

    gate = tiny_ckpt.tensor("model.language_model.layers.0.mlp.gate_proj.weight")
    bad = rewrite(dec, tmp_path / "q4.gguf", drop=("blk.2.ssm_a",), data={
        "blk.0.ffn_up.weight": raw(dec, "blk.1.ffn_up.weight"), "blk.1.ffn_up.weight": raw(dec, "blk.0.ffn_up.weight"),
        "blk.0.ffn_gate.weight": ggml.encode(gate, T.Q5_K)}, types={"blk.0.ffn_gate.weight": T.Q5_K})
    f = failures(check_tensors(tiny_ckpt, bad))
    assert "holds the data of blk.1.ffn_up.weight" in f["blk.0.ffn_up.weight"]
    assert "holds the data of blk.0.ffn_up.weight" in f["blk.1.ffn_up.weight"]
    assert f["blk.2.ssm_a"] == "q4.gguf: tensor blk.2.ssm_a: missing from the artifact"
    assert f["blk.0.ffn_gate.weight"] == "q4.gguf: tensor blk.0.ffn_gate.weight: type Q5_K, expected Q4_K"
    assert set(f) == {"blk.0.ffn_up.weight", "blk.1.ffn_up.weight", "blk.2.ssm_a", "blk.0.ffn_gate.weight"}
    # without type expectations the re-typed tensor is checked at its own type, and passes
    assert "blk.0.ffn_gate.weight" not in failures(check_tensors(tiny_ckpt, bad, expect_types=False))


@pytest.mark.parametrize("fault", ["rope", "scale", "merge", "arch", "file_type"])
def test_planted_metadata_faults(tmp_path, tiny_gguf, tiny_ckpt, fault):
    dec, mm = tiny_gguf("f16")
    if fault == "rope":
        p = rewrite(dec, tmp_path / "rope.gguf", kv={"qwen35.rope.dimension_count": 32})
        assert check_metadata(tiny_ckpt, p) == ["rope.gguf: qwen35.rope.dimension_count: expected 16, found 32"]
    elif fault == "scale":
        p = rewrite(mm["16x"], tmp_path / "mm.gguf", kv={"clip.vision.projector.scale_factor": 2})
        assert artifact_kind(p) == ("mmproj", "16x")  # from the tensors, not the key under test
        assert check_metadata(tiny_ckpt, p) == ["mm.gguf: clip.vision.projector.scale_factor: expected 4, found 2"]
    elif fault == "merge":
        merges = GGUFReader(dec).fields["tokenizer.ggml.merges"].contents()
        p = rewrite(dec, tmp_path / "tok.gguf", kv={"tokenizer.ggml.merges": merges[:5] + merges[6:]})
        assert check_metadata(tiny_ckpt, p) == [f"tok.gguf: tokenizer.ggml.merges: 1 merge missing (e.g. {merges[5]!r})"]
    elif fault == "file_type":
        p = rewrite(dec, tmp_path / "ft.gguf", kv={"general.file_type": 7})  # says Q8_0, holds F16
        assert check_metadata(tiny_ckpt, p) == ["ft.gguf: general.file_type: file type Q8_0, but no tensor is Q8_0"]
        f = failures(check_tensors(tiny_ckpt, p))
        assert f["blk.0.ffn_up.weight"].startswith("ft.gguf: tensor blk.0.ffn_up.weight: type F16, expected Q8_0")
    else:
        p = rewrite(dec, tmp_path / "llama.gguf", arch="llama")
        with pytest.raises(ConvertError, match=r"^llama.gguf: general.architecture 'llama' is not MiniCPM-V 4.6"):
            artifact_kind(p)


def test_llamacpp_converter_output_passes(tmp_path, tiny_dir, tiny_ckpt):
    from validate.upstream import upstream_convert_many

    try:
        dec, mm = upstream_convert_many([(tiny_dir, tmp_path / "dec.gguf", "f16", False, "16x"),
                                         (tiny_dir, tmp_path / "mm.gguf", "f16", True, "16x")])
    except ConvertError as e:
        pytest.skip(str(e))
    for p in (dec, mm):
        res = check_tensors(tiny_ckpt, p)
        assert {r.status for r in res} == {"pass"}, failures(res)
        assert check_metadata(tiny_ckpt, p) == []


def test_llama_quantize_from_f16_passes(tmp_path, tiny_gguf, tiny_ckpt):
    """llama-quantize on an F16 file: block types match the source re-quantized through F16."""
    pytest.importorskip("llama_cpp")
    from validate.upstream import upstream_quantize

    q = upstream_quantize(tiny_gguf("f16")[0], tmp_path / "q.gguf", "Q4_K_M")
    res = check_tensors(tiny_ckpt, q)
    assert {r.status for r in res} == {"pass"}, failures(res)
    assert "exact-from-f16" in {r.matched for r in res}


def test_imatrix_exact_or_bound(tmp_path, tiny_ckpt):
    from convert.gguf.export import export_gguf
    from quantize.imatrix import ImatrixData, ImatrixEntry, write_imatrix_gguf

    rng = np.random.default_rng(0)
    plans = build_plan(tiny_ckpt, "decoder", T.F32)
    data = ImatrixData({p.name: ImatrixEntry(rng.gamma(0.5, 2.0, p.shape[-1]) * 10, [10])
                        for p in plans if p.name.startswith("blk.") and len(p.shape) == 2}, ["rand"], 1, 16)
    imat = write_imatrix_gguf(tmp_path / "imatrix.gguf", data)
    dec = export_gguf(tiny_ckpt, tmp_path / "out", quant="Q4_K_M", mode="16x", quiet=True, imatrix=imat)[0]
    assert {r.status for r in check_tensors(tiny_ckpt, dec)} == {"pass"}  # found at the recorded path
    moved = imat.rename(tmp_path / "elsewhere.gguf")
    assert {r.status for r in check_tensors(tiny_ckpt, dec, imatrix=moved)} == {"pass"}
    res = {r.name: r for r in check_tensors(tiny_ckpt, dec)}  # the recorded file is gone: bounds
    assert res["blk.0.ffn_up.weight"].status == "bound" and res["blk.0.ffn_up.weight"].matched == "bound"
    assert res["blk.0.attn_norm.weight"].status == "pass"  # F32: independent of the imatrix
    assert res["token_embd.weight"].status == "bound"
    assert not failures(res.values())
    # a swap still shows without the imatrix
    bad = rewrite(dec, tmp_path / "swap.gguf", data={"blk.0.ffn_up.weight": raw(dec, "blk.1.ffn_up.weight")})
    f = failures(check_tensors(tiny_ckpt, bad))
    assert list(f) == ["blk.0.ffn_up.weight"] and "looks like the data of blk.1.ffn_up.weight" in f["blk.0.ffn_up.weight"]


@pytest.mark.parametrize("preset", ["tiny", "tiny-alt"])
def test_inverse_transforms(request, preset):
    ckpt = Checkpoint(request.getfixturevalue("tiny_dir" if preset == "tiny" else "tiny_alt_dir"))
    rng = np.random.default_rng(1)
    seen, reordered = set(), False
    for p in build_plan(ckpt, "decoder", T.F32):
        if not p.transforms:
            continue
        shape = ckpt.info(p.source).shape
        x = rng.standard_normal(shape).astype(np.float32)
        y = transforms.apply(p.transforms, x, ckpt.spec)
        back = transforms.invert(p.transforms, y, ckpt.spec, shape)
        assert back.shape == x.shape and back.dtype == np.float32
        if {"add_one", "neg_exp"} & set(p.transforms):
            np.testing.assert_allclose(back, x, rtol=1e-6, atol=1e-6)
        else:
            assert np.array_equal(back, x), p.name
            reordered |= y.shape == x.shape and not np.array_equal(y, x)
        seen.update(p.transforms)
    assert seen == set(transforms.TRANSFORMS) == set(transforms.INVERSES)
    t = ckpt.spec.text
    assert reordered == (t.linear_num_value_heads != t.linear_num_key_heads)


def test_fake_quant_reference(tiny_gguf, tiny_ckpt, reference):
    from validate.metrics import logits_agreement

    dec, mm = tiny_gguf("Q4_K_M")
    sd = fake_quant_state_dict(tiny_ckpt, [dec, mm["16x"]])
    L = "model.language_model."
    assert L + "layers.0.input_layernorm.weight" not in sd  # F32 tensors are the source as is
    assert "model.vision_tower.encoder.layers.0.mlp.fc1.weight" in sd  # the F16 projector
    plans = {p.name: p for p in build_plan(tiny_ckpt, "decoder", T.F32)}
    arts = {t.name: t for t in GGUFReader(dec).tensors}
    for name in ("blk.0.attn_qkv.weight", "blk.0.ssm_out.weight", "blk.0.ssm_beta.weight", "token_embd.weight"):
        p = plans[name]
        back = transforms.invert(p.transforms, tensor_f32(arts[name]), tiny_ckpt.spec, tiny_ckpt.info(p.source).shape)
        assert np.array_equal(sd[p.source].numpy(), back), name
    tokens = reference.tokenize("The quick brown fox jumps over the lazy dog, and then some.")
    fp32 = reference.logits(tokens)
    prev = load_fake_quant(reference, sd)
    try:
        assert reference.model.lm_head.weight.data_ptr() == reference.model.model.language_model.embed_tokens.weight.data_ptr()
        fq = reference.logits(tokens)
    finally:
        load_fake_quant(reference, prev)
    assert np.array_equal(reference.logits(tokens), fp32)  # restored
    assert logits_agreement(fp32, fq)["kl_mean"] > 0
    # streamed one tensor at a time (what the harness's reference does): the same model
    keep = {k: v.clone() for k, v in reference.model.state_dict().items()}
    try:
        load_fake_quant(reference, iter_fake_quant(tiny_ckpt, [dec, mm["16x"]]), restore=False)
        assert np.array_equal(reference.logits(tokens), fq)
    finally:
        reference.model.load_state_dict(keep)
    assert np.array_equal(reference.logits(tokens), fp32)
    assert Counter(v.dtype for v in sd.values()) == Counter({sd[L + "embed_tokens.weight"].dtype: len(sd)})


def test_override_types_recorded_in_the_manifest_pass(tmp_path, tiny_ckpt):
    """`convert gguf --tensor-type` writes types the mixture's rules do not give; the manifest says
    so, and the static checks then hold each tensor to its own type (without it: a type failure)."""
    import re

    from convert.gguf.export import export_gguf
    from quantize.mixtures import Overrides
    from validate.artifacts import discover

    ov = Overrides(tensor_types=[(re.compile("ffn_down"), T.Q8_0)])
    export_gguf(tiny_ckpt, tmp_path, quant="Q4_K_M", overrides=ov, quiet=True)
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["artifacts"][0]["overrides"] == {"tensor_type": ["ffn_down=Q8_0"]}
    checks = {c["check"]: c for c in discover(tmp_path)[0].static_checks(tiny_ckpt)}
    assert checks["tensors"]["status"] == "pass", checks["tensors"]["message"]
    (tmp_path / "manifest.json").unlink()
    checks = {c["check"]: c for c in discover(tmp_path)[0].static_checks(tiny_ckpt)}
    assert checks["tensors"]["status"] == "fail" and "type Q8_0, expected" in checks["tensors"]["message"]
