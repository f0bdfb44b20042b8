"""ONNX export (convert/onnx) run in ONNX Runtime (runtimes/onnxruntime.py) against the reference."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from convert import Checkpoint  # noqa: E402


def _run(ckpt_dir, folder, scenarios):
    from validate.harness import Profile, run_validation
    from validate.onnx_artifact import read_onnx
    from validate.scenarios import load_scenarios

    rep = run_validation(Checkpoint(ckpt_dir), [read_onnx(folder)], load_scenarios(scenarios),
                         profile=Profile(threads=2), quiet=True, speed_anchor=False, speed=False)
    return rep["artifacts"][0]


def test_layout_and_manifest(onnx_dirs):
    out = onnx_dirs("fp32")
    names = sorted(p.name for p in (out / "onnx").iterdir())
    assert names == ["decoder_model_merged.onnx", "embed_tokens.onnx", "vision_encoder.onnx", "vision_encoder_4x.onnx"]
    for f in ("config.json", "tokenizer.json", "chat_template.jinja", "preprocessor_config.json", "manifest.json"):
        assert (out / f).is_file(), f
    m = json.loads((out / "manifest.json").read_text())
    files = {a["file"] for a in m["artifacts"]}
    assert {"onnx/decoder_model_merged.onnx", "onnx/embed_tokens.onnx", "config.json"} <= files
    import onnx

    dec = onnx.load(str(out / "onnx" / "decoder_model_merged.onnx"), load_external_data=False)
    ins = [i.name for i in dec.graph.input]
    outs = [o.name for o in dec.graph.output]
    assert ins[:5] == ["inputs_embeds", "attention_mask", "position_ids", "past_conv.0", "past_recurrent.0"]
    assert ins[-1] == "num_logits_to_keep"  # optional: its initializer (0, every position) is the default
    assert "past_key_values.3.key" in ins and "present.3.value" in outs and "present_recurrent.2" in outs
    assert outs[0] == "logits"
    ops = {(n.domain, n.op_type) for n in dec.graph.node}
    assert ("com.microsoft", "LinearAttention") in ops and ("com.microsoft", "CausalConvWithState") in ops
    assert not any(n.op_type in ("Scan", "Loop") for n in dec.graph.node)


def test_same_input_same_bytes(onnx_dirs, tmp_path, tiny_dir):
    from convert.onnx.export import export_onnx

    a = onnx_dirs("fp32")
    b = tmp_path / "again"
    export_onnx(Checkpoint(tiny_dir), b, quant="fp32", mode="both", quiet=True)
    for p in sorted((a / "onnx").iterdir()):
        assert p.read_bytes() == (b / "onnx" / p.name).read_bytes(), p.name
    assert (a / "manifest.json").read_bytes() == (b / "manifest.json").read_bytes()


def test_fp32_every_scenario_with_video(onnx_dirs, tiny_dir):
    row = _run(tiny_dir, onnx_dirs("fp32"), "default")
    assert row["status"] == "pass", row
    by = {s["scenario"]: s for s in row["scenarios"]}
    assert by["video-frames"]["status"] == "pass"  # the processor's video path through the same encoder
    for s in row["scenarios"]:
        assert s["status"] == "pass", s
        assert s["metrics"]["fp32"]["kl_mean"] <= 1e-4 and s["metrics"]["fp32"]["top1_agreement"] >= 0.995, s["scenario"]
    assert all(c["status"] in ("pass", "skipped") for c in row["checks"])


def test_video_equals_transformers_forward(onnx_dirs, tiny_dir):
    """The pipeline's video prefill against transformers' own forward on the processor's outputs."""
    import torch
    from PIL import Image

    from recipes import HERE
    from runtimes.base import Video
    from runtimes.onnxruntime import OnnxRuntime
    from runtimes.reference import ReferenceRuntime

    img = Image.open(HERE / "images" / "rocket.jpg").convert("RGB")
    frames = tuple(img.crop((i * 40, 0, img.width, img.height - i * 40)).resize((448, 448)) for i in range(3))
    ref = ReferenceRuntime(Checkpoint(tiny_dir))
    proc = ref.ckpt.processor
    text = "<|im_start|>user\n" + proc.video_token + "\nWhat happens?<|im_end|>\n<|im_start|>assistant\n"
    enc = proc(text=[text], videos=[list(frames)], do_sample_frames=False, return_tensors="pt")
    with torch.no_grad():
        want = ref.model(**enc).logits[0].numpy()
    ids = enc["input_ids"][0].tolist()
    with OnnxRuntime(onnx_dirs("fp32"), n_threads=2) as rt:
        pre, post = text.split(proc.video_token)
        res = rt.prefill([rt.tokenize(pre), Video(frames), rt.tokenize(post)])
    text_rows = [i for i, t in enumerate(ids) if t != ref.model.config.video_token_id]
    assert res.text_tokens == [ids[i] for i in text_rows]
    assert np.abs(res.logits - want[text_rows]).max() <= 1e-4 * np.abs(want).max()


def test_prompt_is_one_call_and_state_carries(onnx_dirs, tiny_dir):
    from runtimes.onnxruntime import OnnxRuntime
    from runtimes.reference import ReferenceRuntime

    ref = ReferenceRuntime(Checkpoint(tiny_dir))
    rng = np.random.default_rng(0)
    ids = [int(t) for t in rng.integers(0, ref.n_vocab, 540)]
    want = ref.logits(ids)
    with OnnxRuntime(onnx_dirs("fp32"), n_threads=2) as rt:
        a = rt.prefill([ids[:512]])
        assert rt.n_decoder_calls == 1  # a 512-token prompt is one decoder call
        b = rt.prefill([ids[512:530]], fresh=False)  # a second turn continues the same state
        c = np.concatenate([rt.extend([t]) for t in ids[530:]])
        assert rt.n_decoder_calls == 2 + 10
    got = np.concatenate([a.logits, b.logits, c])
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    # generation asks the decoder for the last row only (num_logits_to_keep): same tokens as the reference
    with OnnxRuntime(onnx_dirs("fp32"), n_threads=2) as rt:
        assert rt.engine._keep
        assert rt.extend_last(ids[:300]).shape == (1, ref.n_vocab)
        assert np.abs(rt.logits(ids[:300])[-1] - want[299]).max() <= 1e-4 * np.abs(want).max()
        assert rt.greedy(ids[:300], 12) == ref.greedy(ids[:300], 12)


def test_portable_equals_fused(onnx_dirs, tiny_alt_dir):
    """tiny-alt: 2 key heads for 6 value heads, 3 layers per full-attention layer."""
    from runtimes.onnxruntime import OnnxRuntime
    from runtimes.reference import ReferenceRuntime

    ref = ReferenceRuntime(Checkpoint(tiny_alt_dir))
    ids = [int(t) for t in np.random.default_rng(1).integers(0, ref.n_vocab, 150)]
    want = ref.logits(ids)
    import onnx

    port = onnx_dirs("fp32", portable=True, ckpt_dir=tiny_alt_dir)
    dec = onnx.load(str(port / "onnx" / "decoder_model_merged.onnx"))
    assert all(n.domain in ("", "ai.onnx") for n in dec.graph.node)  # standard ONNX only
    for folder in (onnx_dirs("fp32", ckpt_dir=tiny_alt_dir), port):
        with OnnxRuntime(folder, n_threads=2) as rt:
            got = np.concatenate([rt.prefill([ids[:140]]).logits, rt.extend(ids[140:])])
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), folder.name


@pytest.mark.parametrize("quant", ["fp16", "int4"])
def test_quantized_pass_their_tolerances(onnx_dirs, tiny_dir, quant):
    row = _run(tiny_dir, onnx_dirs(quant), "quick")
    assert row["status"] == "pass", [s.get("failures") for s in row["scenarios"]] + row["checks"]
    tensors = next(c for c in row["checks"] if c["check"] == "tensors")
    assert tensors["status"] == "pass"


def test_int4_dequantization_is_ort_own(onnx_dirs):
    """The weights the static check and the fake-quant reference read back are what MatMulNBits
    multiplies with: one-hot rows through the real node give W^T's rows."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    from validate.onnx_weights import dequant_matmulnbits, read_weights

    path = onnx_dirs("int4") / "onnx" / "decoder_model_merged_q4.onnx"
    model = onnx.load(str(path))
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    attrs = {a.name: a.i for a in node.attribute}
    inits = [t for t in model.graph.initializer if t.name in node.input]
    K, N = attrs["K"], attrs["N"]
    g = helper.make_graph([helper.make_node("MatMulNBits", ["x", *node.input[1:]], ["y"], domain="com.microsoft",
                                            **attrs)], "one", [helper.make_tensor_value_info("x", 1, [K, K])],
                          [helper.make_tensor_value_info("y", 1, [K, N])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": np.eye(K, dtype=np.float32)})[0]
    from onnx import numpy_helper

    w = dequant_matmulnbits(node, {t.name: numpy_helper.to_array(t) for t in inits})
    assert np.abs(y - w.T).max() <= 1e-6 * np.abs(w).max()
    names = {x.onnx_name for x in read_weights(path, "decoder")}
    assert node.input[1] in names


def test_static_check_finds_a_changed_weight(onnx_dirs, tmp_path, tiny_dir):
    import shutil

    import onnx
    from onnx import numpy_helper

    from validate.onnx_artifact import check_weights
    from runtimes.onnxruntime import onnx_files

    src = onnx_dirs("fp32")
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    p = bad / "onnx" / "decoder_model_merged.onnx"
    m = onnx.load(str(p))
    t = next(t for t in m.graph.initializer if t.name == "layers.1.mlp.up_proj.weight")
    a = numpy_helper.to_array(t).copy()
    a[3, 5] += 0.5
    t.CopyFrom(numpy_helper.from_array(a, t.name))
    onnx.save(m, str(p))
    res = check_weights(Checkpoint(tiny_dir), onnx_files(bad))
    assert res["status"] == "fail" and "layers.1.mlp.up_proj.weight" in res["message"]
    assert check_weights(Checkpoint(tiny_dir), onnx_files(src))["status"] == "pass"


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd)


def test_bad_input_is_one_line(onnx_dirs, tmp_path, tiny_dir):
    out = tmp_path / "o"
    r = _cli("-m", "convert", "onnx", "--model", str(tiny_dir), "--quant", "q4_k_m", "--out", str(out))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--quant 'q4_k_m'" in r.stderr
    assert not out.exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    r = _cli("-m", "convert", "onnx", "--model", str(tiny_dir), "--out", str(other), "--no-validate")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "did not write" in r.stderr
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]
    # a corrupt .onnx given to validate
    import shutil

    bad = tmp_path / "corrupt"
    shutil.copytree(onnx_dirs("fp32"), bad)
    (bad / "onnx" / "embed_tokens.onnx").write_bytes(b"\x08\x07garbage" * 10)
    r = _cli("-m", "validate", str(bad), "--model", str(tiny_dir), "--scenarios", "text-chat",
             "--json", str(tmp_path / "v.json"), "--report", str(tmp_path / "v.html"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "embed_tokens.onnx" in r.stderr, r.stderr
    assert not (tmp_path / "v.json").exists()
    # a model the modules cannot express: rejected before anything is written
    cfg_dir = tmp_path / "badcfg"
    shutil.copytree(tiny_dir, cfg_dir)
    cfg = json.loads((cfg_dir / "config.json").read_text())
    cfg["text_config"]["linear_value_head_dim"] = 2 * cfg["text_config"]["linear_key_head_dim"]
    (cfg_dir / "config.json").write_text(json.dumps(cfg))
    r = _cli("-m", "convert", "onnx", "--model", str(cfg_dir), "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error:")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("fmt,sym", [("gptq", True), ("awq", False)])
def test_gptq_awq_integers_carried_bit_for_bit(tmp_path, tiny_ckpt, fmt, sym):
    """A quantized folder's codes, scales and zero points go into MatMulNBits as they are: the node
    holds the same integers, and its dequantized weight is the folder's own dequantization exactly."""
    import onnx
    import torch
    from onnx import numpy_helper

    from convert.hf_quant import BLOCK, linear_modules, read_quantized, write_quantized_checkpoint
    from convert.onnx.export import export_onnx
    from convert.quantized_source import open_checkpoint
    from quantize.qweight import Scheme
    from quantize.rtn import rtn
    from validate.onnx_weights import _unpack_u4, read_weights

    scheme = Scheme(bits=4, group_size=64, sym=sym)
    mods = [n for n in linear_modules(tiny_ckpt) if n.startswith(BLOCK) and not n.endswith(("in_proj_a", "in_proj_b"))]
    res = {n: rtn(torch.from_numpy(tiny_ckpt.tensor(f"{n}.weight")), scheme, n) for n in mods}
    folder = write_quantized_checkpoint(tiny_ckpt, res, tmp_path / fmt, fmt, quiet=True)
    out = tmp_path / f"{fmt}-onnx"
    export_onnx(open_checkpoint(folder), out, quant="int4", quiet=True)
    _, qws, _ = read_quantized(folder)
    dec = out / "onnx" / "decoder_model_merged_q4.onnx"
    got = {w.hf_name: w for w in read_weights(dec, "decoder")}
    model = onnx.load(str(dec))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = {n.input[1]: n for n in model.graph.node if n.op_type == "MatMulNBits"}
    for m, qw in qws.items():
        w = got[f"{m}.weight"]
        assert w.kind == "matmulnbits" and w.block_size == 64
        assert np.array_equal(w.value, qw.dequantize().numpy()), m  # bit for bit
        node = nodes[w.onnx_name]
        n_out, k = qw.shape
        codes = _unpack_u4(inits[node.input[1]]).reshape(n_out, -1)[:, :k]
        assert np.array_equal(codes, qw.q.numpy()), m
        zps = _unpack_u4(inits[node.input[3]]).reshape(n_out, -1)[:, :k // 64]
        assert np.array_equal(zps, qw.zeros.numpy()), m
        assert np.array_equal(inits[node.input[2]].reshape(n_out, -1), qw.scales.numpy()), m
    man = json.loads((out / "manifest.json").read_text())
    entry = next(a for a in man["artifacts"] if a.get("role") == "decoder")
    assert entry["carried_over"] == {"from": fmt, "weights": len(qws), "requantized": {}}


def test_ort_format_for_mobile(tmp_path, tiny_dir):
    """--ort: the .ort files ORT Mobile loads, and the operator list for a reduced build; same logits."""
    from convert.onnx.export import export_onnx
    from runtimes.onnxruntime import OnnxRuntime

    out = tmp_path / "ort"
    export_onnx(Checkpoint(tiny_dir), out, quant="int4", ort_format=True, quiet=True)
    names = sorted(p.name for p in (out / "onnx").iterdir())
    assert "decoder_model_merged_q4.ort" in names and "required_operators.config" in names
    ops = (out / "onnx" / "required_operators.config").read_text()
    assert "com.microsoft" in ops and "LinearAttention" in ops and "MatMulNBits" in ops
    ids = list(range(5, 60))
    with OnnxRuntime(out, n_threads=2) as a, OnnxRuntime(out, n_threads=2, ort_format=True) as b:
        assert b.engine.files["decoder"].suffix == ".ort"
        assert np.allclose(a.logits(ids), b.logits(ids), atol=1e-3)
