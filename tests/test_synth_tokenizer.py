"""The synthetic checkpoint's tokenizer and processor files load offline and behave like the real model's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from convert.synth import tokenizer as st
from convert.synth.make_corpus import make_corpus

TINY_BPE = 2048
PAD_BPE = 1024
FULL_VOCAB = 248094

ROUND_TRIP = [
    "Hello, world! It's a test; we'll see what they've done.",
    "你好，世界！今天早上小明终于修好了墙上的时钟。",
    "駅の近くに新しいパン屋ができました。カタカナ：コンピューター",
    "한글은 아름답고 과학적인 문자입니다.",
    "emoji 🙂🚀 zwj 👩‍💻 flag 🇯🇵 skin 👍🏽 heart ❤️ and text",
    "  leading, trailing  \t\ttabs\n\n\n   \r\nmixed   runs    ",
    "def f(x):\n    return {k: v ** 2 for k, v in x.items()}  # ok\n",
    "numbers 3.14159 1,234,567 2026-06-01T12:34:56Z 0x1F #42 -7e-3",
    "rare 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ʕ•ᴥ•ʔ ∮ ∯ ∰ and a NUL \x00 byte, bell \x07",
    "Привет, Καλημέρα, مرحبا, नमस्ते, Xin chào, crème brûlée",
    "specials inline <|im_start|>user\nhi<|im_end|> <think>x</think> <image_id>3</image_id>",
    "",
]


def _config(ids: dict[str, int], vocab_size: int) -> dict:
    # Minimal config so AutoProcessor/AutoTokenizer see model_type minicpmv4_6 (the builder writes the real one).
    return {"model_type": "minicpmv4_6", "architectures": ["MiniCPMV4_6ForConditionalGeneration"],
            "text_config": {"model_type": "qwen3_5_text", "vocab_size": vocab_size},
            "vision_config": {"model_type": "minicpmv4_6_vision"},
            "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    d = tmp_path_factory.mktemp("tiny")
    ids = st.write_tokenizer(d, bpe_vocab_size=TINY_BPE)
    st.write_processor_files(d, scale_resolution=448, patch_size=14)
    (d / "config.json").write_text(json.dumps(_config(ids, max(ids.values()) + 1)))
    return d, ids


@pytest.fixture(scope="module")
def tiny_4x(tiny, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny4x")
    for f in tiny[0].iterdir():
        shutil.copy(f, d / f.name)
    st.write_processor_files(d, scale_resolution=448, patch_size=14, downsample_mode="4x")
    return d


@pytest.fixture(scope="module")
def padded(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    d = tmp_path_factory.mktemp("padded")
    ids = st.write_tokenizer(d, bpe_vocab_size=PAD_BPE, padded_vocab_size=FULL_VOCAB)
    st.write_processor_files(d, scale_resolution=448, patch_size=14)
    (d / "config.json").write_text(json.dumps(_config(ids, FULL_VOCAB)))
    return d, ids


def _tok(d):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(d)


def _proc(d):
    from transformers import AutoProcessor
    return AutoProcessor.from_pretrained(d)


def _image(width: int, height: int):
    from PIL import Image
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_corpus_is_what_the_script_generates():
    assert st.CORPUS.read_bytes() == make_corpus().encode("utf-8")
    assert 100_000 < st.CORPUS.stat().st_size < 400_000


def test_real_ids_table():
    s = st.SPECIAL_TOKENS
    assert (s["<|endoftext|>"], s["<|im_start|>"], s["<|im_end|>"]) == (248044, 248045, 248046)
    assert (s["<|vision_start|>"], s["<|image_pad|>"], s["<|video_pad|>"]) == (248053, 248056, 248057)
    assert (s["<tool_call>"], s["<|fim_prefix|>"], s["<tool_response>"]) == (248058, 248060, 248066)
    assert (s["<think>"], s["</think>"]) == (248068, 248069)
    assert [s[t] for t in ("<image>", "</image>", "<slice>", "</slice>", "<image_id>", "</image_id>")] == list(
        range(248070, 248076))


@pytest.mark.parametrize("layout", ["tiny", "padded"])
def test_each_special_token_is_one_id(layout, request):
    d, ids = request.getfixturevalue(layout)
    tok = _tok(d)
    if layout == "tiny":
        assert list(ids.values()) == list(range(TINY_BPE, TINY_BPE + len(st.SPECIAL_TOKENS)))
    else:
        assert ids == st.SPECIAL_TOKENS
    assert list(ids) == list(st.SPECIAL_TOKENS)
    for text, i in ids.items():
        assert tok.encode(text, add_special_tokens=False) == [i], text
        assert tok.convert_ids_to_tokens(i) == text
    # Special flags as in Qwen3 tokenizers: think/tool/fim tokens are plain added tokens.
    flags = {t.content: t.special for t in tok.added_tokens_decoder.values()}
    assert flags["<|im_start|>"] and flags["<|image_pad|>"] and flags["<image>"] and flags["</image_id>"]
    assert not any(flags[t] for t in ("<think>", "</think>", "<tool_call>", "<|fim_pad|>", "<|file_sep|>"))
    assert tok.decode([ids["<|im_start|>"], ids["<think>"]], skip_special_tokens=True) == "<think>"


def test_bpe_ids_and_gap(tiny, padded):
    for (d, _), n in ((tiny, TINY_BPE), (padded, PAD_BPE)):
        vocab = json.loads((d / "tokenizer.json").read_text())["model"]["vocab"]
        bpe = {t: i for t, i in vocab.items() if t not in st.SPECIAL_TOKENS}
        assert sorted(bpe.values()) == list(range(n))
    tok = _tok(padded[0])
    assert tok.convert_ids_to_tokens(PAD_BPE) is None and tok.convert_ids_to_tokens(248043) is None
    ids = tok.encode("".join(ROUND_TRIP), add_special_tokens=False)
    assert all(i < PAD_BPE or i in st.SPECIAL_TOKENS.values() for i in ids)


def test_byte_level_alphabet_is_complete(tiny):
    # GPT-2's byte -> printable char map: printable Latin-1 maps to itself, the rest to U+0100 onwards.
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet = {chr(b) for b in keep} | {chr(256 + i) for i in range(256 - len(keep))}
    vocab = json.loads((tiny[0] / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(alphabet) == 256 and alphabet <= set(vocab)


def test_qwen35_pipeline(tiny):
    from transformers.models.qwen3_5.tokenization_qwen3_5 import Qwen3_5Tokenizer
    ref = json.loads(Qwen3_5Tokenizer()._tokenizer.to_str())
    ours = json.loads((tiny[0] / "tokenizer.json").read_text())
    for key in ("normalizer", "pre_tokenizer", "decoder"):
        assert ours[key] == ref[key], key


@pytest.mark.parametrize("layout", ["tiny", "padded"])
def test_round_trip(layout, request):
    tok = _tok(request.getfixturevalue(layout)[0])
    for s in ROUND_TRIP:
        assert tok.decode(tok.encode(s, add_special_tokens=False)) == s, repr(s)
    # Learned merges are real: corpus-like text takes well under one token per byte.
    text = "The old ferry waited beside the copper roofs before dawn."
    assert len(tok.encode(text, add_special_tokens=False)) < len(text.encode()) / 2


def test_tokenizer_config(tiny):
    d, ids = tiny
    tok = _tok(d)
    assert type(tok).__name__ == "TokenizersBackend"
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", ids["<|im_end|>"])
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", ids["<|endoftext|>"])
    assert tok.bos_token is None and tok.model_max_length == st.MODEL_MAX_LENGTH
    for name, text in st.EXTRA_SPECIAL_TOKENS.items():
        assert getattr(tok, name) == text
    assert (tok.image_token_id, tok.video_token_id) == (ids["<|image_pad|>"], ids["<|video_pad|>"])
    template = st.CHAT_TEMPLATE.read_text()
    assert (d / "chat_template.jinja").read_text() == template
    assert json.loads((d / "tokenizer_config.json").read_text())["chat_template"] == template


def test_deterministic(tmp_path):
    for sub in ("a", "b"):
        st.write_tokenizer(tmp_path / sub, bpe_vocab_size=TINY_BPE)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_vocab_size_limits(tmp_path):
    st._train_bpe(16384)  # the full preset's size fits the shipped corpus
    with pytest.raises(ValueError, match="corpus supports"):
        st.write_tokenizer(tmp_path, bpe_vocab_size=60000)


def _run(proc, images, mode=None):
    msgs = [{"role": "user", "content": [{"type": "image"}] * len(images) + [{"type": "text", "text": "Describe."}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    kw = {"downsample_mode": mode} if mode else {}
    out = proc(images=images, text=text, **kw)
    return out, proc.tokenizer.decode(out["input_ids"][0])


def test_processor_16x_and_4x(tiny, tiny_4x):
    proc = _proc(tiny[0])
    assert type(proc).__name__ == "MiniCPMV4_6Processor" and proc.image_processor.downsample_mode == "16x"
    out, _ = _run(proc, [_image(448, 448)])
    assert out["input_ids"][0].tolist().count(proc.image_token_id) == 64
    proc4 = _proc(tiny_4x)
    assert proc4.image_processor.downsample_mode == "4x"
    out, text = _run(proc4, [_image(448, 448)])
    pad = "<|image_pad|>"
    assert out["input_ids"][0].tolist().count(proc4.image_token_id) == 256
    assert f"<|im_start|>user\n<image_id>0</image_id><image>{pad * 256}</image>\nDescribe.<|im_end|>\n" in text


def test_processor_slices(tiny):
    proc = _proc(tiny[0])
    out, text = _run(proc, [_image(1344, 896), _image(448, 448)])
    pad = "<|image_pad|>"
    row = f"<slice>{pad * 64}</slice>" * 3
    first = f"<image_id>0</image_id><image>{pad * 70}</image>{row}\n{row}\n"
    second = f"<image_id>1</image_id><image>{pad * 64}</image>\n"
    assert f"<|im_start|>user\n{first}{second}Describe.<|im_end|>\n" in text
    assert out["input_ids"][0].tolist().count(proc.image_token_id) == 70 + 6 * 64 + 64
    assert out["target_sizes"].tolist() == [[28, 40]] + [[32, 32]] * 6 + [[32, 32]]


def test_chat_template(tiny):
    proc = _proc(tiny[0])
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<|image_pad|>\nWhat is this?<|im_end|>\n"
                    "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    thinking = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False, enable_thinking=True)
    assert thinking.endswith("<|im_start|>assistant\n<think>\n")
    video = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "And this?"}]}]
    assert "<|im_start|>user\n<|video_pad|>\nAnd this?<|im_end|>" in proc.apply_chat_template(video, tokenize=False)
    # History: reasoning of earlier turns is dropped, the tokenizer renders the same template.
    hist = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>\nhm\n</think>\n\nHello!"},
            {"role": "user", "content": "Bye"}]
    assert "<|im_start|>assistant\nHello!<|im_end|>\n" in proc.tokenizer.apply_chat_template(hist, tokenize=False)


def test_video_placeholders(tiny):
    proc = _proc(tiny[0])
    msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    out = proc(text=text, videos=[np.zeros((2, 448, 448, 3), np.uint8)], do_sample_frames=False)
    pad = "<|video_pad|>"
    assert f"<image_id>0</image_id><image>{pad * 64}</image><image>{pad * 64}</image>\n" in proc.tokenizer.decode(
        out["input_ids"][0])
