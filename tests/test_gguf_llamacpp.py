"""The exported GGUFs in llama.cpp (llama-cpp-python 0.3.36) against the transformers reference."""

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[llama]')")

from recipes import load as load_recipe  # noqa: E402
from runtimes.llamacpp import LlamaCppRuntime  # noqa: E402
from validate.metrics import embedding_agreement, logits_agreement  # noqa: E402


def chat_token_ids(runtime):
    """The fixed chat conversations through the chat template, concatenated (256+ tokens)."""
    tok = runtime.tokenizer
    ids = []
    for conv in load_recipe("chat_prompts")["conversations"]:
        text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        ids += runtime.tokenize(text)
    return ids


@pytest.fixture(scope="module")
def prompt(reference):
    ids = chat_token_ids(reference)
    assert len(ids) >= 256
    return ids


@pytest.fixture(scope="module")
def ref_logits(reference, prompt):
    return reference.logits(prompt)


def _llama_logits(path, ids):
    with LlamaCppRuntime(path, n_ctx=2048) as rt:
        return rt.logits(ids)


def test_f32_logits_match_reference(tiny_gguf, prompt, ref_logits):
    dec, _ = tiny_gguf("f32")
    m = logits_agreement(ref_logits, _llama_logits(dec, prompt))
    print("F32", m)
    assert m["positions"] >= 256
    assert m["rel_err"] <= 1e-3, m
    assert m["top1_agreement"] >= 0.995, m


@pytest.mark.parametrize("quant", ["f16", "bf16", "q8_0"])
def test_lossy_types_no_worse_than_llamacpp_converter(tmp_path, tiny_gguf, tiny_dir, prompt, ref_logits, quant):
    from convert.errors import ConvertError
    from validate.upstream import upstream_convert

    dec, _ = tiny_gguf(quant)
    ours = logits_agreement(ref_logits, _llama_logits(dec, prompt))
    try:
        theirs_path = upstream_convert(tiny_dir, tmp_path / "upstream.gguf", quant)
    except ConvertError as e:
        pytest.skip(str(e))
    theirs = logits_agreement(ref_logits, _llama_logits(theirs_path, prompt))
    print(quant, "ours", ours, "llama.cpp converter", theirs)
    assert ours["kl_mean"] <= theirs["kl_mean"] * (1 + 1e-6) + 1e-9
    assert ours["top1_agreement"] >= theirs["top1_agreement"]
    assert ours["top1_agreement"] >= 0.95 and ours["kl_mean"] < 0.01, ours


def test_greedy_matches_reference(tiny_gguf, reference, prompt):
    dec, _ = tiny_gguf("f32")
    with LlamaCppRuntime(dec, n_ctx=2048) as rt:
        got = rt.greedy(prompt[:64], 16)
    assert got == reference.greedy(prompt[:64], 16)


def test_second_shape_logits(tmp_path, tiny_alt_dir):
    """n_k != n_v (ratio 3), full-attention interval 3, hidden 320: the same agreement."""
    from convert import Checkpoint
    from convert.gguf.export import export_gguf
    from runtimes.reference import ReferenceRuntime

    ref = ReferenceRuntime(tiny_alt_dir)
    ids = chat_token_ids(ref)
    dec = export_gguf(Checkpoint(tiny_alt_dir), tmp_path, quant="f32", quiet=True)[0]
    m = logits_agreement(ref.logits(ids), _llama_logits(dec, ids))
    print("tiny-alt F32", m)
    assert m["rel_err"] <= 1e-3 and m["top1_agreement"] >= 0.995, m


def _test_image(w=448, h=448, seed=0):
    """A deterministic picture with structure at several scales (gradients, shapes, noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    img = np.stack([np.sin(7 * x + 3 * y), np.cos(5 * y - 2 * x), np.sin(11 * x * y)], -1) * 0.5 + 0.5
    img[(x - 0.3) ** 2 + (y - 0.4) ** 2 < 0.02] = (1.0, 0.2, 0.1)
    img += rng.normal(0, 0.03, img.shape)
    return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8), "RGB")


@pytest.mark.parametrize("quant", ["f32", "f16"])
@pytest.mark.parametrize("mode, n_tokens", [("16x", 64), ("4x", 256)])
def test_image_embeddings_match_reference(tiny_gguf, reference, quant, mode, n_tokens):
    dec, mm = tiny_gguf(quant)
    img = _test_image()
    ref = reference.image_embeddings(img, mode=mode)
    assert [r.shape[0] for r in ref] == [n_tokens]
    with LlamaCppRuntime(dec, mm[mode], n_ctx=2048) as rt:
        got = rt.image_embeddings(img)
    assert [g.shape[0] for g in got] == [n_tokens]
    m = embedding_agreement(ref[0], got[0])
    print(quant, mode, m)
    assert m["cosine"] >= 0.9999, m


TOKENIZER_STRINGS = [
    "", " ", "  ", "\n", "\n\n\n", "\t\tindent", "Hello world", "hello   world  ", " leading space", "trailing space ",
    "The quick brown fox jumps over the lazy dog.", "It's, we're, they've, I'm, you'll, he'd", "ALL CAPS TEXT", "MiXeD cAsE",
    "12345", "3.14159265358979", "1,000,000 and 2026-11-23", "0x1F 0b1010 1e-6", "phone: +1 (555) 010-9999",
    "你好，世界", "我们今天去公园散步吧。", "日本語のテキストです", "カタカナとひらがな", "한국어 문장입니다", "Привет, мир",
    "Ελληνικά γράμματα", "مرحبا بالعالم", "שלום עולם", "हिन्दी पाठ", "ภาษาไทย", "Tiếng Việt có dấu",
    "emoji 😀🎉👍🏽", "flags 🇯🇵🇫🇷", "family 👨‍👩‍👧‍👦", "math ∑∫√∞ ≤ ≥ ≠", "arrows → ← ↑ ↓", "©®™ §¶ °C",
    "ﬁ ligature", "full\u3000width　space",
    "def f(x):\n    return x * 2\n", "for (int i = 0; i < n; ++i) { sum += a[i]; }", "<div class=\"a\">text</div>",
    "SELECT * FROM t WHERE id = 42;", "{\"key\": [1, 2, 3], \"ok\": true}", "path/to/file.txt C:\\Windows\\System32",
    "https://example.com/a?b=c&d=e#f", "user@example.com", "mixed English 和中文 and 日本語 text",
    "tabs\tand\nnewlines\r\nmixed", "    four spaces", "!!!???...", "a" * 50, "ab" * 30, "\u200b zero width",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "<think>\n\n</think>\n\nanswer",
    "<image_id>0</image_id><image><|image_pad|><|image_pad|></image>", "<slice><|image_pad|></slice>\n<slice></slice>",
    "<|endoftext|><|video_pad|><tool_call></tool_call><|vision_start|><|vision_end|>",
]


# Not in NFC: Qwen3.5's HF tokenizer normalizes to NFC first, llama.cpp's BPE does not normalize.
NON_NFC_STRINGS = ["e\u0301 combining accent", "caf\u00e9 vs cafe\u0301", "\u212b angstrom sign", "\u1100\u1161 jamo"]


def test_tokenization_parity(tiny_gguf, reference):
    dec, _ = tiny_gguf("f16")
    tok = reference.tokenizer
    strings = TOKENIZER_STRINGS + list(tok.get_added_vocab())  # every special token alone too
    assert len(strings) >= 50
    with LlamaCppRuntime(dec, n_ctx=512) as rt:
        mismatches = [(s, rt.tokenize(s), reference.tokenize(s)) for s in strings if rt.tokenize(s) != reference.tokenize(s)]
    assert not mismatches, mismatches[:3]


def test_tokenization_non_nfc_is_the_only_difference(tiny_gguf, reference):
    """Known difference (llama.cpp, not this project): llama.cpp skips the NFC step, so on non-NFC text its
    tokens equal the HF tokens of the NFC form, and differ from HF's tokens of the raw text's bytes."""
    import unicodedata

    dec, _ = tiny_gguf("f16")
    with LlamaCppRuntime(dec, n_ctx=512) as rt:
        for s in NON_NFC_STRINGS:
            assert unicodedata.normalize("NFC", s) != s
            assert rt.tokenize(unicodedata.normalize("NFC", s)) == reference.tokenize(s)
            assert rt.tokenize(s) != reference.tokenize(s)
