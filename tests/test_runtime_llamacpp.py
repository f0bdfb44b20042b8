"""The llama.cpp runtime adapter (runtimes/llamacpp.py).

These tests check the adapter's own contract (fresh state per call, every-position logits,
batch splitting, greedy, mtmd chunk layout, errors, quiet logs) on the tiny synthetic model;
agreement with transformers is checked in test_gguf_llamacpp.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python==0.3.36 is not installed (pip install -e '.[llama]')")

from convert.errors import ConvertError  # noqa: E402
from runtimes import RuntimeUnavailableError, load_runtime, runtime_class  # noqa: E402
from runtimes import llamacpp as lcpp  # noqa: E402
from runtimes.llamacpp import LlamaCppRuntime  # noqa: E402

@pytest.fixture(scope="module")
def ggufs(tiny_gguf) -> tuple[Path, Path]:
    """The tiny synthetic model exported to F32 by this project (decoder, 16x projector)."""
    dec, mm = tiny_gguf("f32")
    return dec, mm["16x"]


@pytest.fixture(scope="module")
def rt(ggufs):
    with LlamaCppRuntime(ggufs[0], ggufs[1], n_ctx=1024, n_threads=2) as r:
        yield r


PROMPT = "<|im_start|>user\nHello world, the quick brown fox jumps over the lazy dog.<|im_end|>\n<|im_start|>assistant\n"


def _image(w: int, h: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (max(h // 16, 1), max(w // 16, 1), 3), dtype=np.uint8))
    return small.resize((w, h), Image.BICUBIC)


def _assert_close(a: np.ndarray, b: np.ndarray, rel: float = 1e-5) -> None:
    assert a.shape == b.shape
    scale = max(float(np.abs(b).max()), 1e-6)
    assert float(np.abs(a - b).max()) <= rel * scale, f"max|d| {np.abs(a - b).max():.3g} > {rel} x {scale:.3g}"


# ---------------------------------------------------------------------------------------------
# text


def test_registry(ggufs):
    assert runtime_class("llama.cpp") is LlamaCppRuntime
    with load_runtime("llama.cpp", ggufs[0], n_ctx=256) as r:
        assert r.name == "llama.cpp" and r.n_vocab > 256
    with pytest.raises(ConvertError, match="unknown runtime"):
        runtime_class("nope")


def test_tokenize_round_trip(rt):
    ids = rt.tokenize(PROMPT)
    assert rt.detokenize(ids) == PROMPT
    assert ids[0] == rt.tokenize("<|im_start|>")[0] and len(rt.tokenize("<|im_start|>")) == 1
    assert ids[-1] == rt.tokenize("\n")[0]  # no EOS appended
    assert rt.tokenize("") == []  # no BOS either
    plain = rt.tokenize("<|im_start|>", special=False)
    assert len(plain) > 1 and rt.detokenize(plain) == "<|im_start|>"
    assert rt.tokenize(" the quick") == rt.tokenize(" the") + rt.tokenize(" quick")  # merges are used
    assert len(rt.tokenize(" the")) == 1
    assert rt.detokenize(rt.tokenize("héllo wörld ✓")) == "héllo wörld ✓"


def test_logits_shape_and_fresh_state(rt):
    ids = rt.tokenize(PROMPT)
    a = rt.logits(ids)
    assert a.shape == (len(ids), rt.n_vocab) and a.dtype == np.float32 and np.isfinite(a).all()
    rt.logits(rt.tokenize("the lazy dog is in this image"))  # leave other state behind
    rt.extend(rt.tokenize(" what"))
    b = rt.logits(ids)
    assert np.array_equal(a, b)  # memory (KV cache and recurrent state) cleared every call
    assert rt.logits([]).shape == (0, rt.n_vocab)


def test_prefix_rows_equal(rt):
    ids = rt.tokenize(PROMPT)
    full = rt.logits(ids)
    for k in (1, 5, len(ids) // 2):
        _assert_close(rt.logits(ids[:k]), full[:k])


@pytest.mark.parametrize("n_batch,n_ubatch", [(7, None), (16, 4), (512, 5)])
def test_batch_splits_agree(ggufs, rt, n_batch, n_ubatch):
    ids = rt.tokenize(PROMPT * 2)
    ref = rt.logits(ids)
    with LlamaCppRuntime(ggufs[0], n_ctx=1024, n_batch=n_batch, n_ubatch=n_ubatch, n_threads=2) as r:
        _assert_close(r.logits(ids), ref)
        assert r.greedy(ids, 4) == rt.greedy(ids, 4)  # prompt without all-logits: the split_equal path


def test_greedy_is_argmax_continuation(rt):
    ids = rt.tokenize(PROMPT)
    n = 8
    gen = rt.greedy(ids, n)
    assert len(gen) == n and all(0 <= t < rt.n_vocab for t in gen)
    assert rt.n_past == len(ids) + n
    rows = rt.logits(ids + gen[:-1])[len(ids) - 1:]
    for i, row in enumerate(rows):
        top2 = np.sort(row)[-2:]
        if top2[1] - top2[0] > 1e-3:  # token-by-token and batched kernels differ by ~1e-5
            assert int(row.argmax()) == gen[i], f"step {i}"
    assert rt.greedy(ids, n) == gen  # fresh state: same again


def test_extend_carries_state(rt):
    a, b = rt.tokenize(PROMPT), rt.tokenize("the quick brown fox<|im_end|>\n<|im_start|>user\nwhat is this?")
    whole = rt.logits(a + b)
    first = rt.logits(a)
    second = rt.extend(b)
    assert rt.n_past == len(a) + len(b)
    _assert_close(np.concatenate([first, second]), whole)
    # greedy can continue the same conversation
    rt.logits(a)
    cont = rt.greedy(b, 4, fresh=False)
    assert cont == rt.greedy(a + b, 4)


def test_errors(ggufs, rt, tmp_path):
    with pytest.raises(ConvertError, match="no such file"):
        LlamaCppRuntime(tmp_path / "missing.gguf")
    with pytest.raises(ConvertError, match="no such file"):
        LlamaCppRuntime(ggufs[0], tmp_path / "missing-mmproj.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(ConvertError, match="could not load"):
        LlamaCppRuntime(junk)
    with pytest.raises(ConvertError, match="CLIP cannot be used as main model"):
        LlamaCppRuntime(ggufs[1])  # the projector where the decoder belongs
    with pytest.raises(ValueError, match="out of range"):
        rt.logits([rt.n_vocab])
    with pytest.raises(ValueError, match="exceed the context"):
        rt.logits([5] * (rt.n_ctx + 1))


def test_close_and_context_manager(ggufs):
    r = LlamaCppRuntime(ggufs[0], n_ctx=256)
    with r:
        r.logits([5, 6])
    r.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        r.logits([5])


def test_quiet_by_default(ggufs, capfd):
    with LlamaCppRuntime(ggufs[0], ggufs[1], n_ctx=256) as r:
        r.logits(r.tokenize("hello"))
        r.image_embeddings(_image(448, 448))
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_missing_llama_cpp_python(monkeypatch):
    monkeypatch.setattr(lcpp, "_ll", None)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails
    monkeypatch.setitem(sys.modules, "llama_cpp.llama_cpp", None)
    with pytest.raises(RuntimeUnavailableError, match=r"llama-cpp-python==0\.3\.36"):
        LlamaCppRuntime(__file__)


# ---------------------------------------------------------------------------------------------
# vision (mtmd)


def test_square_image_is_one_chunk(rt):
    img = _image(448, 448)
    layout = rt.image_layout(img)
    assert [(c.kind, c.n_tokens) for c in layout] == [("text", 1), ("image", 64), ("text", 1)]
    assert rt.detokenize(list(layout[0].tokens)) == "<image>" and rt.detokenize(list(layout[2].tokens)) == "</image>"
    emb = rt.image_embeddings(img)
    assert len(emb) == 1 and emb[0].shape == (64, rt.n_embd) and emb[0].dtype == np.float32
    assert np.isfinite(emb[0]).all()
    assert np.array_equal(rt.image_embeddings(img)[0], emb[0])


def test_sliced_image_layout(rt):
    img = _image(896, 448)  # 2 slices side by side, plus the overview
    layout = rt.image_layout(img)
    kinds = [c.kind for c in layout]
    assert kinds == ["text", "image", "text", "image", "text", "image", "text"]
    texts = [rt.detokenize(list(c.tokens)) for c in layout if c.kind == "text"]
    assert texts == ["<image>", "</image><slice>", "</slice><slice>", "</slice>"]
    counts = [c.n_tokens for c in layout if c.kind == "image"]
    emb = rt.image_embeddings(img)
    assert [e.shape[0] for e in emb] == counts and all(e.shape[1] == rt.n_embd for e in emb)
    assert all(c.n_pos == c.n_tokens for c in layout)  # no M-RoPE: one position per embedding

    tall = rt.image_layout(_image(448, 896))  # 2 rows: a newline between them
    assert [rt.detokenize(list(c.tokens)) for c in tall if c.kind == "text"] == [
        "<image>", "</image><slice>", "</slice>\n<slice>", "</slice>"]


def test_eval_multimodal(rt):
    img = _image(896, 448)
    pre, post = "<|im_start|>user\n", "\nwhat is in this image?<|im_end|>\n<|im_start|>assistant\n"
    res = rt.eval_multimodal(pre + rt.media_marker + post, [img])
    assert res.n_past == sum(c.n_pos for c in res.chunks) == rt.n_past
    assert res.logits.shape == (len(res.text_tokens), rt.n_vocab) and np.isfinite(res.logits).all()
    assert len(res.text_positions) == len(res.text_tokens)
    assert rt.detokenize(res.text_tokens).startswith(pre + "<image></image><slice>")
    toks, rows = res.after_last_media()
    assert rt.detokenize(toks) == "</slice>" + post and rows.shape[0] == len(toks)
    assert res.text_positions[-1] == res.n_past - 1
    # the text before the image sees no image: its rows equal plain text logits
    n_pre = len(rt.tokenize(pre + "<image>"))
    _assert_close(res.logits[:n_pre], rt.logits(rt.tokenize(pre + "<image>")))
    # fresh state each call, and a following turn continues it
    again = rt.eval_multimodal(pre + rt.media_marker + post, [img])
    assert np.array_equal(again.logits, res.logits)
    nxt = rt.extend(rt.tokenize("the fox<|im_end|>"))
    assert nxt.shape[0] == len(rt.tokenize("the fox<|im_end|>")) and rt.n_past == res.n_past + nxt.shape[0]
    with pytest.raises(ValueError, match="media markers"):
        rt.eval_multimodal("no marker here", [img])


def test_vision_needs_mmproj(ggufs):
    with LlamaCppRuntime(ggufs[0], n_ctx=256) as r:
        with pytest.raises(ConvertError, match="without an mmproj"):
            r.image_embeddings(_image(448, 448))
