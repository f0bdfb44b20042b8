"""Quantized HF checkpoints (GPTQ v1, AWQ GEMM, compressed-tensors): exact packing, the folder writer,
and loading through the real transformers loaders on CPU against a fake-quant reference."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch

from convert.errors import ConvertError
from convert.hf_quant import BLOCK, linear_modules, write_quantized_checkpoint
from quantize.packing import UNPACKERS, pack, pack_cols, pack_rows, packed_layout
from quantize.qweight import QuantizedWeight, Scheme

GROUP = 64  # divides the tiny model's in-features (256, 512)
PROMPT = [{"role": "user", "content": "Describe a cat sitting in the sun, in two short sentences."}]
# the dtype each format stores its scales in (compressed-tensors: the model's, bf16 here)
SCALE_DTYPE = {"gptq": torch.float16, "awq": torch.float16, "compressed-tensors": torch.bfloat16}
CASES = [("gptq", True), ("awq", False), ("awq", True), ("compressed-tensors", True)]


def rtn(name: str, w: torch.Tensor, scheme: Scheme, g_idx: torch.Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest with GPTQ's quantizer conventions (sym: zero = 2^(bits-1), scale = 2*absmax/maxq;
    asym: range widened to include 0, zero = round(-min/scale), kept >= 1 so GPTQ v1 can store it).
    g_idx: each input column's group (default i // group_size)."""
    out_f, in_f = w.shape
    if g_idx is None:
        g_idx = torch.arange(in_f) // scheme.group_size
    n_groups = in_f // scheme.group_size
    q = torch.empty(out_f, in_f, dtype=torch.int32)
    scales, zeros = torch.empty(out_f, n_groups), torch.empty(out_f, n_groups, dtype=torch.int32)
    for g in range(n_groups):
        cols = (g_idx == g).nonzero().flatten()
        wg = w[:, cols]
        if scheme.sym:
            s = (2 * wg.abs().amax(-1) / scheme.maxq).clamp(min=1e-8)
            z = torch.full(s.shape, (scheme.maxq + 1) // 2, dtype=torch.int32)
        else:
            lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
            s = ((hi - lo) / scheme.maxq).clamp(min=1e-8)
            z = torch.round(-lo / s).clamp(1, scheme.maxq).to(torch.int32)
        q[:, cols] = torch.clamp(torch.round(wg / s[:, None]) + z[:, None], 0, scheme.maxq).to(torch.int32)
        scales[:, g], zeros[:, g] = s, z
    return QuantizedWeight(name, scheme, q, scales, zeros, g_idx.to(torch.int32))


def targets(ckpt) -> list[str]:
    """Every decoder linear except the GDN gates' in_proj_a/in_proj_b (usually left dense)."""
    return [n for n in linear_modules(ckpt) if n.startswith(BLOCK) and not n.endswith(("in_proj_a", "in_proj_b"))]


@pytest.fixture(scope="module")
def results(tiny_ckpt):
    """sym -> {module name: RTN result} for the tiny model."""
    out = {}
    for sym in (True, False):
        scheme = Scheme(bits=4, group_size=GROUP, sym=sym)
        out[sym] = {n: rtn(n, torch.from_numpy(tiny_ckpt.tensor(f"{n}.weight")), scheme) for n in targets(tiny_ckpt)}
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_ckpt, results):
    """(fmt, sym) -> a written folder, built on first use."""
    root = tmp_path_factory.mktemp("hfq")
    cache = {}

    def get(fmt: str, sym: bool):
        if (fmt, sym) not in cache:
            out = root / f"{fmt}-{'sym' if sym else 'asym'}"
            cache[fmt, sym] = write_quantized_checkpoint(tiny_ckpt, results[sym], out, fmt, quiet=True,
                                                         meta={"algorithm": "rtn", "damp_percent": 0.05})
        return cache[fmt, sym]

    return get


def random_qw(out_f: int, in_f: int, scheme: Scheme, g_idx=None, seed: int = 0) -> QuantizedWeight:
    gen = torch.Generator().manual_seed(seed)
    g = in_f // scheme.group_size
    q = torch.randint(0, scheme.maxq + 1, (out_f, in_f), generator=gen, dtype=torch.int32)
    if scheme.sym:
        zeros = torch.full((out_f, g), 1 << (scheme.bits - 1), dtype=torch.int32)
    else:
        zeros = torch.randint(1, scheme.maxq + 1, (out_f, g), generator=gen, dtype=torch.int32)
    scales = torch.rand(out_f, g, generator=gen) * 0.01 + 1e-4
    if g_idx is None:
        g_idx = torch.arange(in_f) // scheme.group_size
    return QuantizedWeight("m", scheme, q, scales, zeros, g_idx.to(torch.int32))


# -- packing ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,bits,sym", [("gptq", 4, True), ("gptq", 4, False), ("gptq", 8, True), ("gptq", 2, False),
                                          ("awq", 4, True), ("awq", 4, False),
                                          ("compressed-tensors", 4, True), ("compressed-tensors", 8, True)])
def test_pack_roundtrip(fmt, bits, sym):
    scheme = Scheme(bits=bits, group_size=32, sym=sym)
    qw = random_qw(48, 128, scheme, seed=bits)
    packed = pack(qw, fmt)
    assert all(t.dtype == torch.int32 for k, t in packed.items() if k in ("qweight", "qzeros", "weight_packed"))
    back = UNPACKERS[fmt](packed, scheme, "m")
    assert torch.equal(back.q, qw.q) and torch.equal(back.zeros, qw.zeros) and torch.equal(back.g_idx, qw.g_idx)
    assert torch.equal(back.scales, qw.scales.to(SCALE_DTYPE[fmt]).float())
    qw.bias = torch.rand(48)  # the writer plans shards from packed_layout and packs later
    assert packed_layout(qw, fmt) == {k: (v.dtype, tuple(v.shape)) for k, v in pack(qw, fmt).items()}
    assert "bias" in packed_layout(qw, fmt)


@pytest.mark.parametrize("fmt", ["gptq", "awq", "compressed-tensors"])
def test_pack_in_row_blocks(monkeypatch, fmt):
    """Packing runs over row blocks (bounded int64 temporaries): any block size gives the same words."""
    import quantize.packing as packing

    qw = random_qw(48, 256, Scheme(bits=4, group_size=32, sym=True), seed=3)
    whole = pack(qw, fmt)
    for codes in (1, 300, 1000):  # one output row per block, blocks that do not divide the rows
        monkeypatch.setattr(packing, "_BLOCK_CODES", codes)
        blocks = pack(qw, fmt)
        assert all(torch.equal(blocks[k], whole[k]) for k in whole)


def test_pack_layouts_by_hand():
    # GPTQ: nibble j of qweight[r, o] is q[o, 8r + j]; sym 4-bit zeros (8) are stored as 7 -> 0x77777777
    scheme = Scheme(bits=4, group_size=8, sym=True)
    q = torch.arange(16, dtype=torch.int32).repeat(8, 1)  # q[o, i] = i
    qw = QuantizedWeight("m", scheme, q, torch.ones(8, 2), torch.full((8, 2), 8, dtype=torch.int32),
                         (torch.arange(16) // 8).to(torch.int32))
    t = pack(qw, "gptq")
    assert t["qweight"].shape == (2, 8) and t["qweight"][0, 0].item() == 0x76543210
    assert t["qweight"][1, 0].view(torch.uint32).item() == 0xFEDCBA98
    assert (t["qzeros"].view(torch.uint32) == 0x77777777).all()
    # AWQ: nibble j of a word holds column 8k + [0,2,4,6,1,3,5,7][j]
    row = torch.arange(8, dtype=torch.int32)[None]
    assert pack_cols(row, 4, (0, 2, 4, 6, 1, 3, 5, 7)).item() == 0x75316420
    # compressed-tensors: along the input dim, first element in the low bits
    assert pack_cols(row, 4).item() == 0x76543210 and pack_rows(row.t(), 4).item() == 0x76543210


def test_pack_refusals():
    sym, asym = Scheme(bits=4, group_size=32, sym=True), Scheme(bits=4, group_size=32, sym=False, act_order=True)
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(0))
    act = random_qw(32, 128, asym, g_idx=perm // 32)
    with pytest.raises(ConvertError, match="no g_idx"):
        pack(act, "awq")
    assert torch.equal(UNPACKERS["gptq"](pack(act, "gptq"), asym).g_idx, act.g_idx)  # GPTQ stores act-order
    zero0 = random_qw(32, 128, Scheme(bits=4, group_size=32, sym=False))
    zero0.zeros[3, 1] = 0
    with pytest.raises(ConvertError, match="zero point of 0"):
        pack(zero0, "gptq")
    assert torch.equal(UNPACKERS["awq"](pack(zero0, "awq"), zero0.scheme).zeros, zero0.zeros)  # AWQ stores 0
    with pytest.raises(ConvertError, match="^asymmetric compressed-tensors does not load in transformers 5.23"):
        pack(zero0, "compressed-tensors")
    bad_sym = random_qw(32, 128, sym)
    bad_sym.zeros[0, 0] = 7
    with pytest.raises(ConvertError, match="symmetric but some zero points differ from 8"):
        pack(bad_sym, "gptq")
    with pytest.raises(ConvertError, match="4-bit codes only"):
        pack(random_qw(32, 128, Scheme(bits=8, group_size=32, sym=True)), "awq")
    big = random_qw(32, 128, sym)
    big.scales[0, 0] = 1e6
    with pytest.raises(ConvertError, match="overflows float16"):
        pack(big, "gptq")


# -- the folder ------------------------------------------------------------------------------------

def test_config_keys(folders, tiny_ckpt):
    src_cfg = tiny_ckpt.config
    dense = [n for n in linear_modules(tiny_ckpt) if n not in targets(tiny_ckpt)]

    gptq = json.loads((folders("gptq", True) / "config.json").read_text())
    qc = gptq.pop("quantization_config")
    assert gptq == src_cfg  # the rest of the config is the source's
    assert {k: qc[k] for k in ("quant_method", "bits", "group_size", "desc_act", "sym", "format", "checkpoint_format",
                               "backend", "block_name_to_quantize", "damp_percent", "true_sequential")} == {
        "quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": False, "sym": True, "format": "gptq",
        "checkpoint_format": "gptq", "backend": "torch", "block_name_to_quantize": BLOCK, "damp_percent": 0.05,
        "true_sequential": True}
    assert qc["modules_in_block_to_quantize"] == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "linear_attn.in_proj_qkv", "linear_attn.in_proj_z"],
        ["self_attn.o_proj", "linear_attn.out_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    assert qc["meta"]["algorithm"] == "rtn"

    qc = json.loads((folders("awq", False) / "config.json").read_text())["quantization_config"]
    assert {k: qc[k] for k in ("quant_method", "bits", "group_size", "zero_point", "version", "backend")} == {
        "quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm",
        "backend": "torch_awq"}
    assert qc["modules_to_not_convert"] == ["model.vision_tower", "model.merger", "lm_head",
                                            "linear_attn.in_proj_a", "linear_attn.in_proj_b"]
    assert json.loads((folders("awq", True) / "config.json").read_text())["quantization_config"]["zero_point"] is False

    qc = json.loads((folders("compressed-tensors", True) / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["format"], qc["quantization_status"]) == ("compressed-tensors", "pack-quantized", "compressed")
    assert qc["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert qc["config_groups"]["group_0"]["weights"] == {
        "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": GROUP, "dynamic": False,
        "actorder": None}
    assert qc["ignore"] == dense and "lm_head" in dense and f"{BLOCK}.0.linear_attn.in_proj_a" in dense


def test_folder_contents(folders, tiny_ckpt):
    out = folders("compressed-tensors", True)
    src_files = {p.name for p in tiny_ckpt.path.iterdir()}
    assert {p.name for p in out.iterdir()} == src_files | {"manifest.json"}
    for name in ("tokenizer.json", "chat_template.jinja", "preprocessor_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (tiny_ckpt.path / name).read_bytes()
    man = json.loads((out / "manifest.json").read_text())
    kinds = {a["file"]: a["kind"] for a in man["artifacts"]}
    assert kinds["model.safetensors"] == "weights" and kinds["config.json"] == "config"
    assert not list(out.parent.glob(".*partial"))


def test_deterministic_and_dense_updates(tmp_path, tiny_ckpt, results):
    from safetensors.torch import load_file

    norm = f"{BLOCK}.0.input_layernorm.weight"
    new = torch.linspace(-0.5, 0.5, tiny_ckpt.info(norm).shape[0])
    a = write_quantized_checkpoint(tiny_ckpt, results[True], tmp_path / "a", "gptq", dense_updates={norm: new}, quiet=True)
    b = write_quantized_checkpoint(tiny_ckpt, results[True], tmp_path / "b", "gptq", dense_updates={norm: new}, quiet=True)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    sd = load_file(a / "model.safetensors")
    assert sd[norm].dtype == torch.bfloat16 and torch.equal(sd[norm], new.to(torch.bfloat16))
    emb = "model.language_model.embed_tokens.weight"
    assert sd[emb].view(torch.uint16).numpy().tobytes() == np.asarray(tiny_ckpt.raw(emb)).tobytes()  # copied as is
    assert f"{BLOCK}.0.mlp.up_proj.weight" not in sd and sd[f"{BLOCK}.0.mlp.up_proj.qweight"].dtype == torch.int32
    # a re-run replaces the folder it wrote; a foreign folder is refused
    write_quantized_checkpoint(tiny_ckpt, results[True], a, "awq", quiet=True)
    assert json.loads((a / "config.json").read_text())["quantization_config"]["quant_method"] == "awq"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ConvertError, match="did not write"):
        write_quantized_checkpoint(tiny_ckpt, results[True], tmp_path / "other", "awq", quiet=True)


def test_refusals_leave_nothing(tmp_path, tiny_ckpt, results, monkeypatch):
    out = tmp_path / "ct"
    with pytest.raises(ConvertError) as e:
        write_quantized_checkpoint(tiny_ckpt, results[False], out, "compressed-tensors", quiet=True)
    assert str(e.value) == ("asymmetric compressed-tensors does not load in transformers 5.23; "
                            "use --format awq or a symmetric scheme")
    assert not out.exists()
    # GPTQ's loader selects modules by suffix in every layer: a layer left out is refused
    partial = {n: qw for n, qw in results[True].items() if n != f"{BLOCK}.1.mlp.up_proj"}
    with pytest.raises(ConvertError, match="same modules quantized in every decoder layer"):
        write_quantized_checkpoint(tiny_ckpt, partial, out, "gptq", quiet=True)
    # a failure while writing removes the temporary folder
    import convert.hf_quant as hq

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hq, "copy_side_files", full_disk)
    with pytest.raises(ConvertError, match="No space left"):
        write_quantized_checkpoint(tiny_ckpt, results[True], out, "awq", quiet=True)
    assert list(tmp_path.iterdir()) == []


# -- loading through the real loaders --------------------------------------------------------------

def test_missing_extra_is_one_line(folders, monkeypatch):
    from runtimes.base import RuntimeUnavailableError, load_runtime

    monkeypatch.setitem(sys.modules, "gptqmodel", None)  # makes `import gptqmodel` raise ImportError
    with pytest.raises(RuntimeUnavailableError) as e:
        load_runtime("transformers-quant", folders("gptq", True))
    msg = str(e.value)
    assert "\n" not in msg and "gptqmodel" in msg and msg.endswith("pip install -e '.[hf-quant]'")
    monkeypatch.setitem(sys.modules, "compressed_tensors", None)
    with pytest.raises(RuntimeUnavailableError, match="compressed-tensors"):
        load_runtime("transformers-quant", folders("compressed-tensors", True))


def fake_quant_logits(ckpt, results: dict[str, QuantizedWeight], fmt: str, ids: list[int]) -> np.ndarray:
    """The source model in fp16 with each target linear's weight replaced by its dequantized result,
    scales rounded to the dtype the format stores them in, the weight then rounded to fp16 (the
    loaders dequantize into the compute dtype)."""
    from transformers import MiniCPMV4_6ForConditionalGeneration

    model = MiniCPMV4_6ForConditionalGeneration.from_pretrained(ckpt.path, dtype=torch.float16, local_files_only=True).eval()
    with torch.no_grad():
        for name, qw in results.items():
            g = qw.g_idx.long()
            s = qw.scales.to(SCALE_DTYPE[fmt]).float()
            w = s[:, g] * (qw.q.float() - qw.zeros[:, g].float())
            model.get_submodule(name).weight.copy_(w.to(torch.float16))
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float().numpy()


def check_loader(fmt: str, folder, ckpt, results: dict[str, QuantizedWeight], label: str) -> None:
    """Load `folder` through the real loader and compare its logits on a chat prompt with the fake-quant reference."""
    from runtimes.base import load_runtime
    from runtimes.hf_quant import LOADER_DEPS

    for mod, _ in LOADER_DEPS[fmt]:
        pytest.importorskip(mod, reason="the hf-quant extra is not installed (pip install -e '.[hf-quant]')")
    with load_runtime("transformers-quant", folder) as rt:
        ids = rt.tokenize(ckpt.tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False))
        got = rt.logits(ids)
        cont = rt.greedy(ids, 3)
        assert len(cont) == 3 and cont[0] == int(got[-1].argmax())
        assert rt.detokenize(ids) == ckpt.tokenizer.decode(ids)
        # modules the loader made quantized: gptqmodel kernels, or compressed-tensors' scheme attribute
        quantized = {n: type(m).__name__ for n, m in rt.model.named_modules()
                     if type(m).__name__ in ("TorchLinear", "AwqTorchLinear") or hasattr(m, "quantization_scheme")}
        load_s = rt.load_seconds
    want = fake_quant_logits(ckpt, results, fmt, ids)
    # Bound: 4 fp16 ulps at the logits' magnitude. The loaders dequantize exactly; what differs is
    # the matmul layout (x @ W^T vs F.linear), whose fp16 rounding differs by an ulp here and there.
    ulp = 2.0 ** (math.floor(math.log2(float(np.abs(want).max()))) - 10)
    diff = float(np.abs(got - want).max())
    agree = float((got.argmax(-1) == want.argmax(-1)).mean())
    print(f"\n{label}: modules {sorted(set(quantized.values()))}, load {load_s:.1f} s, {len(ids)} tokens, "
          f"max|logit| {np.abs(want).max():.2f}, max|diff| {diff:.5f} (bound {4 * ulp:.5f}), argmax agreement {agree:.3f}")
    assert set(quantized) == set(results)  # exactly the target linears, nothing else
    assert diff <= 4 * ulp


@pytest.mark.parametrize("fmt,sym", CASES, ids=[f"{f}-{'sym' if s else 'asym'}" for f, s in CASES])
def test_loader_matches_fake_quant(fmt, sym, folders, tiny_ckpt, results):
    check_loader(fmt, folders(fmt, sym), tiny_ckpt, results[sym], f"{fmt} {'sym' if sym else 'asym'}")


def test_gptq_act_order_sharded(tmp_path, tiny_ckpt):
    """desc_act with a non-monotonic g_idx, asymmetric, written in several shards with an index."""
    scheme = Scheme(bits=4, group_size=GROUP, sym=False, act_order=True)
    gen = torch.Generator().manual_seed(1)
    res = {}
    for n in targets(tiny_ckpt):
        w = torch.from_numpy(tiny_ckpt.tensor(f"{n}.weight"))
        perm = torch.randperm(w.shape[1], generator=gen)
        g_idx = torch.empty(w.shape[1], dtype=torch.int64)
        g_idx[perm] = torch.arange(w.shape[1]) // GROUP
        res[n] = rtn(n, w, scheme, g_idx)
    out = write_quantized_checkpoint(tiny_ckpt, res, tmp_path / "gptq-act", "gptq", quiet=True, max_shard_bytes=1 << 20)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["desc_act"] is True
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    check_loader("gptq", out, tiny_ckpt, res, "gptq asym act-order, sharded")
