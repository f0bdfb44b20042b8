"""Importance matrices: llama.cpp's file layouts, normalization, collection through the reference."""

from __future__ import annotations

import ctypes
import dataclasses
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from convert.errors import ConvertError
from quantize.calibration import (Sample, default_samples, encode_sample, folder_samples, load_calibration,
                                  skimage_data_dir, text_file_samples)
from convert.gguf.imatrix import ImatrixCollector, collect_imatrix, column_permutation
from quantize.imatrix import ImatrixData, ImatrixEntry, importance, imatrix_gguf_bytes, read_imatrix, write_imatrix_gguf

# ---------------------------------------------------------------------------------------------
# fixtures written to llama.cpp's documented layout, independently of quantize.imatrix

DENSE_A = np.array([4.0, 0.5, 9.0, 1e-3, 2.0, 7.5, 0.0, 3.25], np.float32)
DENSE_B = np.arange(1, 17, dtype=np.float32) * 0.75
MOE = np.arange(12, dtype=np.float32).reshape(3, 4) + 1  # 3 experts x 4 columns, expert 1 unused


def _llamacpp_fixture(path: Path) -> Path:
    """What save_imatrix (tools/imatrix/imatrix.cpp) writes, built with gguf-py's GGUFWriter."""
    import gguf

    w = gguf.GGUFWriter(path, "unused")
    w.kv_data[0].pop("general.architecture")  # llama-imatrix writes no architecture
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", ["groups_merged.txt", "extra.txt"])
    w.add_uint32("imatrix.chunk_count", 10)
    w.add_uint32("imatrix.chunk_size", 512)
    # sorted names; in_sum2 ggml [n_per_row, n_mat], counts [1, n_mat] (gguf drops trailing 1-dims)
    w.add_tensor("blk.0.ffn_down.weight.in_sum2", DENSE_A)
    w.add_tensor("blk.0.ffn_down.weight.counts", np.array([5120.0], np.float32))
    w.add_tensor("blk.0.ffn_down_exps.weight.in_sum2", MOE)  # numpy (3, 4) = ggml [4, 3]
    w.add_tensor("blk.0.ffn_down_exps.weight.counts", np.array([[7.0], [0.0], [2.0]], np.float32))
    w.add_tensor("blk.1.attn_q.weight.in_sum2", DENSE_B)
    w.add_tensor("blk.1.attn_q.weight.counts", np.array([5120.4], np.float32))  # lround -> 5120
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _legacy_fixture(path: Path, with_tail: bool = True) -> Path:
    """save_imatrix_legacy's layout: values are (sum / count) * ncall."""
    b = struct.pack("<i", 2)
    for name, ncall, vals in (("blk.0.ffn_up.weight", 4, DENSE_A), ("output.weight", 0, DENSE_B)):
        nb = name.encode()
        b += struct.pack("<i", len(nb)) + nb + struct.pack("<ii", ncall, vals.size) + vals.astype("<f4").tobytes()
    if with_tail:
        b += struct.pack("<i", 9) + struct.pack("<i", 8) + b"wiki.txt"  # chunk count, dataset name
    path.write_bytes(b)
    return path


def test_read_llamacpp_gguf(tmp_path):
    d = read_imatrix(_llamacpp_fixture(tmp_path / "imatrix.gguf"))
    assert not d.legacy
    assert d.datasets == ["groups_merged.txt", "extra.txt"] and (d.chunk_count, d.chunk_size) == (10, 512)
    assert d.names() == ["blk.0.ffn_down.weight", "blk.0.ffn_down_exps.weight", "blk.1.attn_q.weight"]
    a = d["blk.0.ffn_down.weight"]
    assert a.n_mat == 1 and a.n_per_row == 8 and a.counts.tolist() == [5120]
    assert np.array_equal(a.in_sum2, DENSE_A)
    assert d["blk.1.attn_q.weight"].counts.tolist() == [5120]
    e = d["blk.0.ffn_down_exps.weight"]
    assert e.in_sum2.shape == (3, 4) and e.counts.tolist() == [7, 0, 2]
    # llama-quantize's load_imatrix: sums / count in float32; all ones for a zero count
    assert np.array_equal(importance(d, "blk.0.ffn_down.weight"), DENSE_A / np.float32(5120))
    assert np.array_equal(importance(d, "blk.1.attn_q.weight"), DENSE_B / np.float32(5120))
    imp = importance(d, "blk.0.ffn_down_exps.weight").reshape(3, 4)
    assert np.array_equal(imp[0], MOE[0] / np.float32(7)) and np.array_equal(imp[2], MOE[2] / np.float32(2))
    assert np.array_equal(imp[1], np.ones(4, np.float32))
    assert importance(d, "token_embd.weight") is None


def test_read_legacy_dat(tmp_path):
    d = read_imatrix(_legacy_fixture(tmp_path / "imatrix.dat"))
    assert d.legacy and d.chunk_count == 9 and d.datasets == ["wiki.txt"] and d.chunk_size == 0
    assert d["blk.0.ffn_up.weight"].counts.tolist() == [4]
    assert np.array_equal(importance(d, "blk.0.ffn_up.weight"), DENSE_A / np.float32(4))
    assert np.array_equal(importance(d, "output.weight"), DENSE_B)  # ncall 0: values as stored
    d2 = read_imatrix(_legacy_fixture(tmp_path / "short.dat", with_tail=False))  # the tail is optional
    assert d2.chunk_count == 0 and d2.datasets == []
    with pytest.raises(ConvertError, match="legacy"):
        write_imatrix_gguf(tmp_path / "x.gguf", d)


def test_read_rejects(tmp_path):
    import gguf

    p = tmp_path / "nometa.gguf"
    w = gguf.GGUFWriter(p, "qwen35")
    w.add_tensor("blk.0.ffn_up.weight.in_sum2", DENSE_A)
    w.add_tensor("blk.0.ffn_up.weight.counts", np.ones(1, np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ConvertError, match="missing imatrix metadata"):
        read_imatrix(p)
    (tmp_path / "junk.dat").write_bytes(b"\x05\x00")
    with pytest.raises(ConvertError, match="legacy"):
        read_imatrix(tmp_path / "junk.dat")
    with pytest.raises(ConvertError, match="no such imatrix file"):
        read_imatrix(tmp_path / "absent.gguf")


def _data() -> ImatrixData:
    return ImatrixData({
        "blk.1.attn_q.weight": ImatrixEntry(DENSE_B, [5120]),
        "blk.0.ffn_down.weight": ImatrixEntry(DENSE_A, [5120]),
        "blk.0.ffn_down_exps.weight": ImatrixEntry(MOE, [7, 0, 2]),
    }, ["groups_merged.txt", "extra.txt"], chunk_count=10, chunk_size=512)


def test_roundtrip_and_fixture_layout(tmp_path):
    ours = write_imatrix_gguf(tmp_path / "ours.gguf", _data())
    back = read_imatrix(ours)
    assert back.names() == _data().names() and back.datasets == _data().datasets
    assert (back.chunk_count, back.chunk_size) == (10, 512)
    for n, e in _data().entries.items():
        assert np.array_equal(back[n].in_sum2, e.in_sum2) and np.array_equal(back[n].counts, e.counts)
        assert np.array_equal(importance(back, n), importance(_data(), n))
    # same keys (order, types), tensor names, shapes and types as the hand-written fixture -- and the same bytes
    import gguf

    fix = _llamacpp_fixture(tmp_path / "fixture.gguf")
    ra, rb = gguf.GGUFReader(ours), gguf.GGUFReader(fix)
    assert [(f.name, f.types) for f in ra.fields.values()] == [(f.name, f.types) for f in rb.fields.values()]
    assert [(t.name, t.tensor_type, t.shape.tolist()) for t in ra.tensors] == \
           [(t.name, t.tensor_type, t.shape.tolist()) for t in rb.tensors]
    assert [t.shape.tolist() for t in ra.tensors][:2] == [[8], [1]]
    assert ours.read_bytes() == fix.read_bytes().replace(np.float32(5120.4).tobytes(), np.float32(5120).tobytes())
    assert not list(tmp_path.glob(".*partial"))


def test_writer_refuses(tmp_path):
    bad = _data()
    bad.entries["blk.0.ffn_down.weight"] = ImatrixEntry(np.array([1.0, np.inf], np.float32), [1])
    with pytest.raises(ConvertError, match="non-finite"):
        write_imatrix_gguf(tmp_path / "x.gguf", bad)
    with pytest.raises(ConvertError, match="cannot write"):
        write_imatrix_gguf(tmp_path / "missing" / "x.gguf", _data())
    assert not list(tmp_path.rglob("*.gguf*"))


# ---------------------------------------------------------------------------------------------
# llama.cpp's own gguf code (libggml-base from llama-cpp-python), through ctypes


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


class _GgufParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.POINTER(ctypes.c_void_p))]


@pytest.fixture(scope="module")
def ggml():
    pytest.importorskip("llama_cpp")
    from quantize import ggml_ref

    lib = ctypes.CDLL(os.fspath(ggml_ref.library_path()))
    P, I64, S = ctypes.c_void_p, ctypes.c_int64, ctypes.c_char_p
    for name, res, args in [
        ("ggml_init", P, [_InitParams]), ("ggml_free", None, [P]), ("ggml_tensor_overhead", ctypes.c_size_t, []),
        ("ggml_new_tensor_2d", P, [P, ctypes.c_int, I64, I64]), ("ggml_set_name", P, [P, S]),
        ("ggml_get_data", P, [P]), ("ggml_get_name", S, [P]), ("ggml_nelements", I64, [P]),
        ("ggml_get_first_tensor", P, [P]), ("ggml_get_next_tensor", P, [P, P]),
        ("gguf_init_empty", P, []), ("gguf_free", None, [P]), ("gguf_set_val_str", None, [P, S, S]),
        ("gguf_set_arr_str", None, [P, S, ctypes.POINTER(S), ctypes.c_size_t]),
        ("gguf_set_val_u32", None, [P, S, ctypes.c_uint32]), ("gguf_add_tensor", None, [P, P]),
        ("gguf_write_to_file", ctypes.c_bool, [P, S, ctypes.c_bool]),
        ("gguf_init_from_file", P, [S, _GgufParams]), ("gguf_find_key", I64, [P, S]),
        ("gguf_get_kv_type", ctypes.c_int, [P, I64]), ("gguf_get_arr_type", ctypes.c_int, [P, I64]),
        ("gguf_get_arr_n", ctypes.c_size_t, [P, I64]), ("gguf_get_arr_str", S, [P, I64, ctypes.c_size_t]),
        ("gguf_get_val_u32", ctypes.c_uint32, [P, I64]), ("gguf_get_val_str", S, [P, I64]),
        ("gguf_get_n_tensors", I64, [P]),
    ]:
        f = getattr(lib, name)
        f.restype, f.argtypes = res, args
    return lib


def _llamacpp_save(lib, path: Path, d: ImatrixData) -> None:
    """IMatrixCollector::save_imatrix (imatrix.cpp l. 532-640), step by step, with ggml's gguf writer."""
    names = d.names()
    size = sum(2 * (lib.ggml_tensor_overhead() + 4 * d[n].in_sum2.size + 64) for n in names) + 4096
    ctx = lib.ggml_init(_InitParams(size, None, False))
    g = lib.gguf_init_empty()
    lib.gguf_set_val_str(g, b"general.type", b"imatrix")
    arr = (ctypes.c_char_p * len(d.datasets))(*[s.encode() for s in d.datasets])
    lib.gguf_set_arr_str(g, b"imatrix.datasets", arr, len(d.datasets))
    lib.gguf_set_val_u32(g, b"imatrix.chunk_count", d.chunk_count)
    lib.gguf_set_val_u32(g, b"imatrix.chunk_size", d.chunk_size)
    for n in names:
        e = d[n]
        for suffix, vals, ne in ((".in_sum2", e.in_sum2.reshape(-1), (e.n_per_row, e.n_mat)),
                                 (".counts", e.counts.astype(np.float32), (1, e.n_mat))):
            t = lib.ggml_new_tensor_2d(ctx, 0, *ne)
            lib.ggml_set_name(t, (n + suffix).encode())
            buf = np.ascontiguousarray(vals, np.float32)
            ctypes.memmove(lib.ggml_get_data(t), buf.ctypes.data, buf.nbytes)
            lib.gguf_add_tensor(g, t)
    assert lib.gguf_write_to_file(g, os.fsencode(path), False)
    lib.gguf_free(g)
    lib.ggml_free(ctx)


def _llamacpp_load(lib, path: Path) -> tuple[dict[str, np.ndarray], list[str], int]:
    """common_imatrix_load (GGUF branch) + llama-quantize's load_imatrix, through ggml's gguf reader."""
    ctx = ctypes.c_void_p()
    g = lib.gguf_init_from_file(os.fsencode(path), _GgufParams(False, ctypes.pointer(ctx)))
    assert g, "ggml's gguf reader rejected the file"
    for k in (b"imatrix.datasets", b"imatrix.chunk_count", b"imatrix.chunk_size"):
        assert lib.gguf_find_key(g, k) != -1
    kd = lib.gguf_find_key(g, b"imatrix.datasets")
    assert lib.gguf_get_kv_type(g, kd) == 9 and lib.gguf_get_arr_type(g, kd) == 8  # array of string
    datasets = [lib.gguf_get_arr_str(g, kd, i).decode() for i in range(lib.gguf_get_arr_n(g, kd))]
    assert lib.gguf_get_val_str(g, lib.gguf_find_key(g, b"general.type")) == b"imatrix"
    chunk_count = lib.gguf_get_val_u32(g, lib.gguf_find_key(g, b"imatrix.chunk_count"))  # aborts unless u32
    lib.gguf_get_val_u32(g, lib.gguf_find_key(g, b"imatrix.chunk_size"))
    pairs: dict[str, list] = {}
    t = lib.ggml_get_first_tensor(ctx)
    while t:
        name = lib.ggml_get_name(t).decode()
        for i, sfx in enumerate((".in_sum2", ".counts")):
            if name.endswith(sfx):
                assert ctypes.c_int.from_address(t).value == 0  # GGML_TYPE_F32 (first field of ggml_tensor)
                n = lib.ggml_nelements(t)
                vals = np.ctypeslib.as_array(ctypes.cast(lib.ggml_get_data(t), ctypes.POINTER(ctypes.c_float)), (n,))
                pairs.setdefault(name[: -len(sfx)], [None, None])[i] = vals.copy()
        t = lib.ggml_get_next_tensor(ctx, t)
    out = {}
    for name, (sums, counts) in pairs.items():
        counts = np.array([round(float(c)) for c in counts], np.int64)  # lround
        ne0 = sums.size // counts.size
        e = np.empty(sums.size, np.float32)
        for j, c in enumerate(counts):
            c = np.float32(c)
            e[j * ne0:(j + 1) * ne0] = sums[j * ne0:(j + 1) * ne0] / c if c > 0 else 1
        out[name] = e
    lib.gguf_free(g)
    lib.ggml_free(ctx)
    return out, datasets, chunk_count


def test_bytes_equal_llamacpp_writer(ggml, tmp_path):
    d = _data()
    _llamacpp_save(ggml, tmp_path / "ref.gguf", d)
    assert write_imatrix_gguf(tmp_path / "ours.gguf", d).read_bytes() == (tmp_path / "ref.gguf").read_bytes()
    assert imatrix_gguf_bytes(d) == (tmp_path / "ref.gguf").read_bytes()
    zero = ImatrixData({"blk.0.ffn_up.weight": ImatrixEntry(DENSE_A, [0])}, datasets=["d"])  # zero counts
    _llamacpp_save(ggml, tmp_path / "zero.gguf", zero)
    assert imatrix_gguf_bytes(zero) == (tmp_path / "zero.gguf").read_bytes()
    assert np.array_equal(importance(read_imatrix(tmp_path / "zero.gguf"), "blk.0.ffn_up.weight"), np.ones(8, np.float32))
    # llama.cpp can write an empty dataset list, which gguf-py cannot: we read it, and refuse to write it
    bare = ImatrixData({"blk.0.ffn_up.weight": ImatrixEntry(DENSE_A, [2])})
    _llamacpp_save(ggml, tmp_path / "bare.gguf", bare)
    assert read_imatrix(tmp_path / "bare.gguf").datasets == []
    with pytest.raises(ConvertError, match="dataset"):
        imatrix_gguf_bytes(bare)


def test_llamacpp_reads_ours(ggml, tmp_path):
    d = _data()
    imp, datasets, chunks = _llamacpp_load(ggml, write_imatrix_gguf(tmp_path / "ours.gguf", d))
    assert datasets == d.datasets and chunks == d.chunk_count and sorted(imp) == d.names()
    for n in d.names():
        assert np.array_equal(imp[n], importance(read_imatrix(tmp_path / "ours.gguf"), n)), n


# ---------------------------------------------------------------------------------------------
# collection on the tiny model


def _image(w=300, h=200, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], -1) * 200
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8), "RGB")


def _chat(text: str, image=None, answer: str = "It shows a smooth colour gradient with some noise.") -> Sample:
    content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": text}]
    return Sample("s", ({"role": "user", "content": content},
                        {"role": "assistant", "content": [{"type": "text", "text": answer}]}), image)


SAMPLES = [_chat("What is in this picture?", _image()),
           _chat("Summarize: the night train waited beside the frozen canal while the kettle boiled.")]


def _direct_inputs(model, processor, samples, module_name: str, seqlen: int) -> list:
    """Inputs of one linear layer from an independently hooked forward of the same samples."""
    import torch

    seen = []
    mod = model.get_submodule(module_name)
    h = mod.register_forward_hook(lambda m, a, o: seen.append(a[0].detach().reshape(-1, a[0].shape[-1]).double()))
    try:
        with torch.no_grad():
            for s in samples:
                e = encode_sample(processor, s, seqlen=seqlen)
                kw = {} if e.pixel_values is None else {"pixel_values": e.pixel_values, "target_sizes": e.target_sizes}
                model(input_ids=e.input_ids, use_cache=False, **kw)
    finally:
        h.remove()
    return seen


@pytest.fixture(scope="module")
def tiny_imatrix(reference, tiny_ckpt):
    stats = {}
    d = collect_imatrix(tiny_ckpt, SAMPLES, seqlen=128, datasets=["t"], model=reference.model, quiet=True,
                        stats=stats)
    return d, stats


def test_ffn_down_matches_direct(tiny_imatrix, reference, tiny_ckpt):
    d, stats = tiny_imatrix
    spec = tiny_ckpt.spec
    n = spec.text.num_layers - 1
    mod = f"model.language_model.layers.{n}.mlp.down_proj"
    xs = _direct_inputs(reference.model, tiny_ckpt.processor, SAMPLES, mod, 128)
    want = sum((x * x).sum(0) for x in xs).numpy()
    e = d[f"blk.{n}.ffn_down.weight"]
    assert e.counts.tolist() == [sum(x.shape[0] for x in xs)] == [stats["tokens"]]
    assert e.in_sum2.dtype == np.float32 and e.in_sum2.shape == (spec.text.intermediate_size,)
    np.testing.assert_allclose(e.in_sum2, want, rtol=1e-6)
    assert stats["images"] == 1 and stats["image_tokens"] > 0
    assert (d.chunk_count, d.chunk_size, d.datasets) == (2, 128, ["t"])
    # every matrix llama-imatrix sees in a qwen35 decoder, nothing else (tied embeddings: no output.weight)
    from convert.gguf.plan import expected_shapes

    want_names = {k for k, s in expected_shapes(spec, "decoder").items()
                  if k.startswith("blk.") and len(s) == 2 and "ssm_conv1d" not in k}
    assert set(d.names()) == want_names
    assert all(e.counts.tolist() == [stats["tokens"]] for e in d.entries.values())


def test_ssm_out_permuted(tiny_imatrix, reference, tiny_ckpt):
    from convert.gguf import transforms

    d, _ = tiny_imatrix
    spec = tiny_ckpt.spec
    t = spec.text
    assert t.linear_num_key_heads != t.linear_num_value_heads  # the tiny preset exercises the reorder
    i = t.linear_layers[0]
    mod = f"model.language_model.layers.{i}.linear_attn.out_proj"
    xs = _direct_inputs(reference.model, tiny_ckpt.processor, SAMPLES, mod, 128)
    raw = sum((x * x).sum(0) for x in xs).numpy()
    want = transforms.v_cols(raw[None, :], spec)[0]
    got = d[f"blk.{i}.ssm_out.weight"].in_sum2
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert not np.allclose(got, raw, rtol=1e-3)
    # the permuted statistics describe the converted weight's columns: W_gguf @ x[perm] == W_hf @ x
    hf = f"model.language_model.layers.{i}.linear_attn.out_proj.weight"
    w_hf = tiny_ckpt.tensor(hf)
    w_gguf = transforms.apply(("v_cols",), w_hf, spec)
    perm = column_permutation(("v_cols",), w_hf.shape[1], spec)
    x = xs[0][:5].numpy()
    np.testing.assert_allclose(w_gguf @ x[:, perm].T, w_hf @ x.T, rtol=1e-4, atol=1e-5)


def test_column_permutations_match_converter(reference, tiny_ckpt):
    """For every hooked weight, the vector permutation equals what the converter does to columns."""
    from convert.gguf import transforms
    from convert.gguf.names import DECODER

    spec = tiny_ckpt.spec
    with ImatrixCollector(reference.model, spec) as col:
        accs = dict(col.accs)
    for hf in tiny_ckpt.names():
        m = DECODER.map(hf)
        if m is None or m.gguf_name not in accs:
            continue
        n_out, n_in = tiny_ckpt.info(hf).shape
        probe = transforms.apply(m.transforms, np.tile(np.arange(n_in, dtype=np.float32), (n_out, 1)), spec)
        assert (probe == probe[:1]).all(), m.gguf_name
        perm = accs[m.gguf_name].perm
        assert np.array_equal(probe[0], np.arange(n_in) if perm is None else perm), m.gguf_name


def test_output_weight_only_when_untied(reference, tiny_ckpt):
    import torch

    spec = tiny_ckpt.spec
    assert spec.tie_word_embeddings
    with ImatrixCollector(reference.model, spec, process_output=True) as col:
        assert "output.weight" not in col.accs
    untied = dataclasses.replace(spec, tie_word_embeddings=False)
    with ImatrixCollector(reference.model, untied, process_output=True) as col, torch.no_grad():
        reference.model(input_ids=torch.tensor([[1, 2, 3, 4]]), use_cache=False)
        e = col.entries()["output.weight"]
    assert e.counts.tolist() == [4] and e.n_per_row == spec.text.hidden_size


def test_images_change_statistics(reference, tiny_ckpt):
    text = "Describe the colours you would expect in a sunset over the sea."
    with_img = collect_imatrix(tiny_ckpt, [_chat(text, _image(seed=1))], seqlen=256, model=reference.model, quiet=True)
    text_only = collect_imatrix(tiny_ckpt, [_chat(text)], seqlen=256, model=reference.model, quiet=True)
    for n in ("blk.0.attn_qkv.weight", "blk.0.ffn_down.weight"):
        a, b = with_img[n], text_only[n]
        assert a.counts[0] > b.counts[0] + 60  # 64 image tokens plus their markers
        assert not np.allclose(a.in_sum2 / a.counts[0], b.in_sum2 / b.counts[0], rtol=0.05)


def test_seqlen_too_small_for_image(tiny_ckpt):
    with pytest.raises(ConvertError, match="too small for image sample"):
        encode_sample(tiny_ckpt.processor, SAMPLES[0], seqlen=32)
    e = encode_sample(tiny_ckpt.processor, _chat("x", _image(1344, 896)), seqlen=128)  # sliced less to fit
    assert e.n_tokens <= 128 and e.target_sizes.shape[0] == 1 and e.n_image_tokens == 28 * 40 // 16  # no slices


# ---------------------------------------------------------------------------------------------
# calibration sets


def test_default_set():
    a = default_samples(6, seqlen=128, seed=0)
    assert [s.image is not None for s in a] == [True, False] * 3
    assert all(s.messages[-1]["role"] == "assistant" for s in a)
    root = skimage_data_dir()
    assert all(len(list(root.glob(s.name.split("-image-")[1] + ".*"))) == 1 for s in a if s.image)
    b = default_samples(6, seqlen=128, seed=0)
    assert [s.messages for s in a] == [s.messages for s in b]
    pixels = [[np.asarray(s.image).tobytes() for s in x if s.image] for x in (a, b)]
    assert pixels[0] == pixels[1]
    assert [s.messages for s in default_samples(6, seqlen=128, seed=1)] != [s.messages for s in a]
    assert all(s.image is None for s in default_samples(4, seqlen=128, images=False))
    many = [s for s in default_samples(50, seqlen=64) if s.image is not None]  # 25 image samples, 21 images
    first = {s.name.split("-image-")[1]: s.image.size for s in many[:21]}
    assert len(first) == 21  # every image once, as it is, then seeded crops
    assert all(s.image.size != first[s.name.split("-image-")[1]] for s in many[21:])


def test_folder_samples(tmp_path):
    _image().save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("What is this?\n---\nA gradient.\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("Just a question without an answer.", encoding="utf-8")
    _image(seed=3).save(tmp_path / "c.jpg")
    (tmp_path / "notes.md").write_text("ignored")
    s = folder_samples(tmp_path)
    assert [x.name for x in s] == ["a", "b", "c"]
    assert s[0].image is not None and s[0].messages == (
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A gradient."}]})
    assert s[1].image is None and len(s[1].messages) == 1
    assert s[2].messages[0]["content"][1]["text"] == "Describe this image."
    picks = [[x.name for x in folder_samples(tmp_path, 2, seed=s)] for s in (0, 0, 5)]
    assert picks[0] == picks[1] and len(picks[0]) == 2 and all(p == sorted(p) for p in picks)
    _image().save(tmp_path / "a.jpg")
    with pytest.raises(ConvertError, match="two image files"):
        folder_samples(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConvertError, match="no samples"):
        load_calibration(empty)


def test_text_file_chunks(tmp_path, tiny_ckpt):
    p = tmp_path / "calib.txt"
    p.write_text(Path(__file__).read_text(encoding="utf-8")[:6000], encoding="utf-8")
    s = text_file_samples(p, tiny_ckpt.tokenizer, seqlen=100)
    assert len(s) > 3 and all(len(x.token_ids) == 100 for x in s)
    assert len(text_file_samples(p, tiny_ckpt.tokenizer, 2, seqlen=100)) == 2
    e = encode_sample(tiny_ckpt.processor, s[0], seqlen=100)
    assert e.input_ids[0].tolist() == list(s[0].token_ids)


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_deterministic(tmp_path, tiny_dir, capsys):
    from quantize.cli import main

    args = ["imatrix", "--model", str(tiny_dir), "--samples", "4", "--seqlen", "128", "--quiet"]
    assert main(args + ["--out", str(tmp_path / "a.gguf")]) == 0
    assert main(args + ["--out", str(tmp_path / "b.gguf")]) == 0
    assert main(args + ["--seed", "1", "--out", str(tmp_path / "c.gguf")]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "(2 with an image)" in out
    a, b, c = ((tmp_path / f"{x}.gguf").read_bytes() for x in "abc")
    assert a == b and a != c
    d = read_imatrix(tmp_path / "a.gguf")
    assert (d.chunk_count, d.chunk_size) == (4, 128) and d.datasets[0].startswith("minicpmv-edge:default")
    assert d.n_tokens <= 4 * 128


def test_cli_default_model_and_errors(tmp_path, tiny_dir, capsys, monkeypatch):
    from quantize.cli import main

    monkeypatch.setattr("convert.synth.build.default_model", lambda quiet=False: tiny_dir)
    folder = tmp_path / "calib"
    folder.mkdir()
    (folder / "q.txt").write_text("How do leap years work?\n---\nEvery four years, with exceptions.")
    assert main(["imatrix", "--calib", str(folder), "--out", str(tmp_path / "f.gguf"), "--quiet"]) == 0
    assert "no --model given: using the embedded default" in capsys.readouterr().out
    assert read_imatrix(tmp_path / "f.gguf").chunk_count == 1

    for argv, msg in [
        (["--model", str(tmp_path / "nope")], "no such folder"),
        (["--model", str(tiny_dir), "--calib", str(tmp_path / "missing")], "--calib"),
        (["--model", str(tiny_dir), "--seqlen", "0"], "--seqlen 0"),
    ]:
        assert main(["imatrix", *argv, "--out", str(tmp_path / "x.gguf"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and msg in err, err
    assert not (tmp_path / "x.gguf").exists()
