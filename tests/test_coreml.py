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


@pytest.fixture(scope="module", params=[("tiny", "16x"), ("tiny-alt", "4x")], ids=["tiny-16x", "tiny-alt-4x"])
def exported(request, tiny_dir, tiny_alt_dir, tmp_path_factory):
    name, mode = request.param
    ckpt = Checkpoint(tiny_dir if name == "tiny" else tiny_alt_dir)
    out = tmp_path_factory.mktemp(f"coreml-{name}") / "out"
    export_coreml(ckpt, out, mode=mode, quiet=True)
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
    assert [c["check"] for c in rep["checks"]] == ["program", "operators", "weights", "proxy"]
    slices = rep["proxy"]["vision"]["slices"]
    assert rep["proxy"]["vision"]["runtime"] == PROXY and min(s["cosine"] for s in slices) > 0.9995
    # the manifest's hashes are the files' own
    import hashlib

    entry = next(a for a in art["manifest"]["artifacts"] if a.get("kind") == "mlpackage")
    for f in entry["files"]:
        assert hashlib.sha256((pkg / f["path"]).read_bytes()).hexdigest() == f["sha256"]
    assert not (pkg / "executorch_debug_handle_mapping.json").exists()


def _faulty(out, tmp_path):
    dst = tmp_path / "faulty"
    shutil.copytree(out, dst)
    return dst, read_coreml(dst)["packages"]["vision"]


def _ops(spec):
    fn = spec.mlProgram.functions["main"]
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


@pytest.mark.slow
def test_cli_same_bytes(tiny_dir, tmp_path):
    run = [sys.executable, "-m", "convert", "coreml", "--model", str(tiny_dir), "--quiet"]
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        r = subprocess.run(run + ["--out", str(out)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    sha = [{x["file"]: x["sha256"] for x in m["artifacts"]} for m in (ma, mb)]
    assert sha[0] == sha[1]  # same input, same bytes (package files included)


def test_cli_bad_input(tiny_dir, tmp_path):
    run = [sys.executable, "-m", "convert", "coreml", "--model", str(tiny_dir), "--quiet"]
    for bad, msg in ((["--parts", "decoder"], "not built"), (["--quant", "int3"], "--quant"),
                     (["--mode", "8x"], "--mode"), (["--parts", "vision,audio"], "--parts")):
        r = subprocess.run(run + ["--out", str(tmp_path / "bad")] + bad, capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and msg in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()
