"""`python -m convert coreml`: the vision package, checked on Linux from its own bytes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("coremltools")

from convert.checkpoint import Checkpoint  # noqa: E402
from convert.coreml.export import export_coreml  # noqa: E402
from validate.coreml_artifact import PROXY, read_coreml, validate_coreml  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module", params=[("tiny", "16x", "int4"),
                                        pytest.param(("tiny-alt", "4x", "int8"), marks=pytest.mark.slow)],
                ids=["tiny-16x-int4", "tiny-alt-4x-int8"])
def exported(request, tiny_dir, tiny_alt_dir, tmp_path_factory):
    name, mode, quant = request.param
    ckpt = Checkpoint(tiny_dir if name == "tiny" else tiny_alt_dir)
    out = tmp_path_factory.mktemp(f"coreml-{name}") / "out"
    # a short prefill and context keep the tiny conversions quick (the prefill's token loop is unrolled)
    export_coreml(ckpt, out, mode=mode, quant=quant, max_context=64, prefill=4, quiet=True)
    return ckpt, out, mode


def _spec_path(pkg):
    return pkg / "Data" / "com.apple.CoreML" / "model.mlmodel"


def test_vision_package_passes(exported):
    ckpt, out, mode = exported
    art = read_coreml(out)
    pkg = art["packages"]["vision"]
    assert pkg.name == f"MiniCPM-V-4.6-vision-{mode}.mlpackage"
    info = art["info"]["vision"]
    assert info["default_shape"] == [448, 448] and info["pixel_shapes"][0] == [448, 448]
    step = 56 if mode == "16x" else 28  # patch 14 x the merges: every shape the processor can make
    assert all(h % step == 0 and w % step == 0 for h, w in info["pixel_shapes"])
    rep = validate_coreml(ckpt, out, quiet=True)
    assert rep["status"] == "pass", [c["message"] for c in rep["checks"]]
    assert sorted(c["check"] for c in rep["checks"]) == sorted(["program", "operators", "weights", "proxy",
                                                                 "decoder program", "decoder operators", "decoder weights"])
    slices = rep["proxy"]["vision"]["slices"]
    assert rep["proxy"]["vision"]["runtime"] == PROXY and min(s["cosine"] for s in slices) > 0.9995
    # the manifest's hashes are the files' own
    import hashlib

    entries = [a for a in art["manifest"]["artifacts"] if a.get("kind") == "mlpackage"]
    assert sorted(e["part"] for e in entries) == ["decoder", "vision"]
    for entry in entries:
        for f in entry["files"]:
            assert hashlib.sha256((out / entry["file"] / f["path"]).read_bytes()).hexdigest() == f["sha256"]
        assert not (out / entry["file"] / "executorch_debug_handle_mapping.json").exists()


def _faulty(out, tmp_path, part="vision"):
    dst = tmp_path / "faulty"
    shutil.copytree(out, dst)
    return dst, read_coreml(dst)["packages"][part]


def _ops(spec, function="main"):
    fn = spec.mlProgram.functions[function]
    return [op for blk in fn.block_specializations.values() for op in blk.operations]


def test_weight_swapped_is_named(exported, tmp_path):
    from coremltools.proto import Model_pb2

    ckpt, out, _ = exported
    dst, pkg = _faulty(out, tmp_path)
    spec = Model_pb2.Model()
    spec.ParseFromString(_spec_path(pkg).read_bytes())
    consts = {op.outputs[0].name: op for op in _ops(spec) if op.type == "const"}
    q = consts["p_layers_0_self_attn_q_proj_weight_to_fp16"].attributes["val"].blobFileValue
    k = consts["p_layers_0_self_attn_k_proj_weight_to_fp16"].attributes["val"].blobFileValue
    q.offset, k.offset = k.offset, q.offset  # layer 0's q and k projections read each other's bytes
    _spec_path(pkg).write_bytes(spec.SerializeToString(deterministic=True))
    rep = validate_coreml(ckpt, dst, quiet=True)
    weights = next(c for c in rep["checks"] if c["check"] == "weights")
    assert weights["status"] == "fail"
    assert any("layers.0.self_attn.q_proj.weight" in d for d in weights["details"])
    assert any("layers.0.self_attn.k_proj.weight" in d for d in weights["details"])


def test_wrong_image_size_is_named(exported, tmp_path):
    from coremltools.proto import Model_pb2

    ckpt, out, _ = exported
    dst, pkg = _faulty(out, tmp_path)
    spec = Model_pb2.Model()
    spec.ParseFromString(_spec_path(pkg).read_bytes())
    arr = spec.description.input[0].type.multiArrayType
    arr.shape[2] = arr.shape[3] = 224
    arr.enumeratedShapes.shapes[0].shape[2] = arr.enumeratedShapes.shapes[0].shape[3] = 224
    _spec_path(pkg).write_bytes(spec.SerializeToString(deterministic=True))
    rep = validate_coreml(ckpt, dst, quiet=True)
    prog = next(c for c in rep["checks"] if c["check"] == "program")
    assert prog["status"] == "fail" and "pixel_values" in prog["message"] and "224" in prog["message"]
    assert rep["status"] == "fail"


def test_decoder_state_missing_is_named(exported, tmp_path):
    from coremltools.proto import Model_pb2

    ckpt, out, _ = exported
    dst, pkg = _faulty(out, tmp_path, "decoder")
    spec = Model_pb2.Model()
    spec.ParseFromString(_spec_path(pkg).read_bytes())
    fn = next(f for f in spec.description.functions if f.name == "decode")
    gone = fn.state[0].name
    del fn.state[0]
    _spec_path(pkg).write_bytes(spec.SerializeToString(deterministic=True))
    rep = validate_coreml(ckpt, dst, quiet=True)
    prog = next(c for c in rep["checks"] if c["check"] == "decoder program")
    assert prog["status"] == "fail" and f"function decode: state {gone} is missing" in prog["message"]


def test_decoder_weight_swapped_is_named(exported, tmp_path):
    from coremltools.proto import Model_pb2

    ckpt, out, _ = exported
    dst, pkg = _faulty(out, tmp_path, "decoder")
    spec = Model_pb2.Model()
    spec.ParseFromString(_spec_path(pkg).read_bytes())
    ops = {op.outputs[0].name: op for op in _ops(spec, "decode") if op.type == "constexpr_blockwise_shift_scale"
           and "mlp_gate_proj" in op.outputs[0].name}
    assert len(ops) >= 2, sorted(ops)
    a, b = sorted(ops)[:2]  # two layers' gate_proj integers read each other's bytes
    va = ops[a].inputs["data"].arguments[0].value.blobFileValue
    vb = ops[b].inputs["data"].arguments[0].value.blobFileValue
    va.offset, vb.offset = vb.offset, va.offset
    _spec_path(pkg).write_bytes(spec.SerializeToString(deterministic=True))
    rep = validate_coreml(ckpt, dst, quiet=True)
    w = next(c for c in rep["checks"] if c["check"] == "decoder weights")
    assert w["status"] == "fail" and any("mlp.gate_proj.weight" in d for d in w["details"]), w["message"]


def test_stateful_decoder_arithmetic(tiny_ckpt, reference):
    """The decoder program's arithmetic in PyTorch (float32 states): a prefill chunk, then single steps,
    then a new conversation at position 0, each position's logits equal to transformers' own."""
    import torch

    from convert.coreml.decoder import StatefulDecoder

    ids = reference.tokenize("Pack light: a rain shell, warm layers and two litres of water, please.")
    with torch.no_grad():
        ref = reference.model(input_ids=torch.tensor([ids])).logits[0]
        emb = reference.model.get_input_embeddings()(torch.tensor([ids]))
        dec = StatefulDecoder(reference.model, tiny_ckpt.spec.text, 64, state_dtype=torch.float32).eval()
        got = [dec(emb[:, :6], torch.arange(6))[0]]
        got += [dec(emb[:, t:t + 1], torch.tensor([t]))[0] for t in range(6, len(ids))]
        again = dec(emb[:, :6], torch.arange(6))[0]
    want = torch.cat([ref[5:6], ref[6:]])
    assert torch.allclose(torch.stack(got), want, atol=1e-4, rtol=1e-4)
    assert torch.allclose(again, ref[5], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_cli_same_bytes(tiny_dir, tmp_path):
    run = [sys.executable, "-m", "convert", "coreml", "--model", str(tiny_dir), "--quiet", "--max-context", "64",
           "--prefill-len", "4"]
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        r = subprocess.run(run + ["--out", str(out)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    sha = [{x["file"]: x["sha256"] for x in m["artifacts"]} for m in (ma, mb)]
    assert sha[0] == sha[1]  # same input, same bytes (package files included)


def test_cli_bad_input(tiny_dir, tmp_path):
    run = [sys.executable, "-m", "convert", "coreml", "--model", str(tiny_dir), "--quiet"]
    for bad, msg in ((["--max-context", "8"], "--max-context"), (["--quant", "int3"], "--quant"),
                     (["--mode", "8x"], "--mode"), (["--parts", "vision,audio"], "--parts"),
                     (["--prefill-len", "1"], "--prefill-len")):
        r = subprocess.run(run + ["--out", str(tmp_path / "bad")] + bad, capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and msg in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()
