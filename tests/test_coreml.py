"""`python -m convert coreml`: the vision and decoder packages, checked on Linux from their own bytes, and
their weights run through the harness by the coreml-proxy runtime."""

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
    # a short prefill keeps the tiny conversions quick (the prefill's token loop is unrolled); the default
    # context holds every scenario
    # tiny: int4 with the vocabulary matrices in int8 (both quantized paths in one package)
    export_coreml(ckpt, out, mode=mode, quant=quant, prefill=4, head_quant="int8" if quant == "int4" else None,
                  quiet=True)
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
    assert "int4 quantization of the source" in w["message"]


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


def test_proxy_harness(exported, tmp_path):
    """Every quick scenario through the harness in the coreml-proxy runtime: the package's weights (int4 /
    int8 decompressed as Core ML does) in the export modules, float16, against both references."""
    ckpt, out, mode = exported
    rep = tmp_path / "rep.json"
    r = subprocess.run([sys.executable, "-m", "validate", str(out), "--model", str(ckpt.path), "--runtime", PROXY,
                        "--scenarios", "quick" if mode == "16x" else "text-chat,image-448-4x", "--no-speed-anchor",
                        "--quiet", "--json", str(rep), "--report", str(tmp_path / "rep.html")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    row = json.loads(rep.read_text())["artifacts"][0]
    assert row["runtime"] == PROXY and row["files"]["executed_by"].startswith("weights from the package")
    ran = [s for s in row["scenarios"] if s["status"] == "pass"]
    assert len(ran) >= 2 and any(s["kind"] == "image" for s in ran)
    for s in ran:  # far nearer the package's own fake-quant reference than the weights' rounding is to fp32
        m = s["metrics"]
        assert m["fake-quant"]["kl_mean"] < 0.2 * m["fake-quant-vs-fp32"]["kl_mean"], (s["scenario"], m)
    checks = {c["check"]: c for c in row["checks"]}
    assert checks["manifest"]["status"] == "pass" and checks["decoder weights"]["status"] == "pass"


@pytest.mark.skipif(sys.platform == "darwin", reason="Core ML runs on macOS")
def test_coreml_runtime_needs_macos(exported):
    """Off macOS a Core ML folder is validated only in the proxy, and only when asked for."""
    ckpt, out, _ = exported
    for extra in ([], ["--runtime", "coreml"]):
        r = subprocess.run([sys.executable, "-m", "validate", str(out), "--model", str(ckpt.path), *extra],
                           capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
        assert "needs macOS" in r.stderr and "--runtime coreml-proxy" in r.stderr
    assert not (out / "validation.json").exists()


@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML's predict() exists only on macOS")
def test_coreml_runtime_on_macos(exported, tmp_path):
    """Core ML itself (the coreml runtime, chosen by default on macOS) on the quick scenarios: the verdict as
    for any runtime. Run by .github/workflows/coreml-macos.yml; never run where this was written."""
    ckpt, out, _ = exported
    rep = tmp_path / "rep.json"
    r = subprocess.run([sys.executable, "-m", "validate", str(out), "--model", str(ckpt.path), "--scenarios", "quick",
                        "--no-speed-anchor", "--quiet", "--json", str(rep), "--report", str(tmp_path / "r.html")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert json.loads(rep.read_text())["artifacts"][0]["runtime"] == "coreml"


def test_macos_workflow_runs_real_commands():
    """The macOS job file parses, and its commands are this project's (the options exist)."""
    import yaml

    from convert.cli import build_parser
    from validate.cli import build_parser as validate_parser

    from pathlib import Path

    wf = yaml.safe_load((Path(__file__).resolve().parents[1] / ".github/workflows/coreml-macos.yml").read_text())
    steps = wf["jobs"]["coreml"]["steps"]
    assert wf["jobs"]["coreml"]["runs-on"].startswith("macos")
    runs = [" ".join(st["run"].split()) for st in steps if "run" in st]
    for cmd in runs:
        for prog, parser in (("python -m convert ", build_parser()), ("python -m validate ", validate_parser())):
            if cmd.startswith(prog):
                parser.parse_args(cmd[len(prog):].split())  # SystemExit on an unknown option
    assert any(c.startswith("python -m convert coreml") for c in runs)


def test_folded_constant_fault_is_named(exported, tmp_path):
    """A parameter Core ML folded into a derived constant (a norm's 1 + w) whose bytes change is named by the
    check, and the proxy refuses to run without it."""
    import struct

    from convert.coreml.read import decoder_names, package_weights
    from runtimes.reference import load_reference_model
    from validate.coreml_artifact import _source

    ckpt, out, _ = exported
    dst, pkg = _faulty(out, tmp_path, "decoder")
    hf = load_reference_model(ckpt, quiet=True)
    _, folds = package_weights(pkg, decoder_names(hf, ckpt.spec), lambda n: _source(ckpt, n))
    name = "model.language_model.layers.0.input_layernorm.weight"
    fname, const, how = folds[name]
    assert how == "1 + w"
    from coremltools.proto import Model_pb2

    spec = Model_pb2.Model()
    spec.ParseFromString(_spec_path(pkg).read_bytes())
    op = next(o for o in _ops(spec, fname) if o.outputs[0].name == const)
    blob = op.attributes["val"].blobFileValue
    weights = pkg / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    raw = bytearray(weights.read_bytes())
    _, _, size, data = struct.unpack_from("<IIQQ", raw, blob.offset)  # MIL blob metadata: sentinel, type, size, offset
    raw[data:data + size] = bytes(b ^ 0x80 if i % 2 else b for i, b in enumerate(raw[data:data + size]))  # negate
    weights.write_bytes(bytes(raw))
    rep = validate_coreml(ckpt, dst, quiet=True)
    w = next(c for c in rep["checks"] if c["check"] == "decoder weights")
    assert w["status"] == "fail" and any(name in d for d in w["details"]), w["message"]
    from convert.errors import ConvertError
    from validate.coreml_proxy import CoremlProxyRuntime

    with pytest.raises(ConvertError, match="input_layernorm"):
        CoremlProxyRuntime(dst, source=str(ckpt.path))


@pytest.mark.slow
def test_cli_same_bytes(tiny_dir, tmp_path):
    run = [sys.executable, "-m", "convert", "coreml", "--model", str(tiny_dir), "--quiet", "--max-context", "64",
           "--prefill-len", "4", "--no-validate"]
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
                     (["--prefill-len", "1"], "--prefill-len"), (["--head-quant", "int2"], "--head-quant"),
                     (["--scenarios", "nosuchset"], "nosuchset")):
        r = subprocess.run(run + ["--out", str(tmp_path / "bad")] + bad, capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and msg in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()
