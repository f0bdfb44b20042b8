"""Chat layouts (convert/chat.py) on checkpoints whose chat template is not where, or not what,
MiniCPM-V 4.6's is, each written by transformers' own save_pretrained from the tiny model:

* (a) `tokenizer`: model + tokenizer (legacy format: the template in tokenizer_config.json) + image
  processor saved one by one; the processor has no template;
* (b) `placeholders`: a fine-tune's template that predates images (renders text items only);
* (c) `chatml`: no template anywhere.

Calibration and the validation scenarios still put every image where its item was, and the
quantize CLIs run and say which layout they used.
"""

import shutil

import numpy as np
import pytest

from convert.chat import DESCRIPTIONS, chat_layout
from convert.synth.tokenizer import CHAT_TEMPLATE

_IMAGE_BRANCH = """{%- if item.type == 'image' or 'image' in item or 'image_url' in item -%}
                {{- '<|image_pad|>\\n' -}}
            {%- elif item.type == 'video' or 'video' in item -%}
                {{- '<|video_pad|>\\n' -}}
            {%- elif item.type == 'text' or 'text' in item -%}"""

LAYOUT_LINE = {"a": DESCRIPTIONS["tokenizer"], "b": DESCRIPTIONS["placeholders"].format(source="tokenizer"),
               "c": DESCRIPTIONS["chatml"]}


def _text_only_template() -> str:
    tpl = CHAT_TEMPLATE.read_text(encoding="utf-8")
    assert _IMAGE_BRANCH in tpl  # the synthetic template changed: update the branch above
    return tpl.replace(_IMAGE_BRANCH, "{%- if item.type == 'text' -%}")


@pytest.fixture(scope="module")
def variants(tiny_dir, tmp_path_factory) -> dict:
    from transformers import AutoProcessor

    root = tmp_path_factory.mktemp("chat-layouts")
    out = {}
    for v in "abc":
        d = root / v
        d.mkdir()
        for name in ("config.json", "generation_config.json", "model.safetensors"):
            shutil.copy(tiny_dir / name, d / name)
        proc = AutoProcessor.from_pretrained(tiny_dir, local_files_only=True)
        if v == "a":
            proc.image_processor.save_pretrained(d)  # preprocessor_config.json only
            proc.tokenizer.save_pretrained(d, save_jinja_files=False)
        else:
            tpl = _text_only_template() if v == "b" else None
            proc.chat_template = proc.tokenizer.chat_template = tpl
            proc.save_pretrained(d)
        out[v] = d
    return out


def test_variants_are_the_failing_cases(variants):
    """What each folder holds, and that the processor's own template path fails on it as reported."""
    from transformers import AutoProcessor

    files = {v: sorted(p.name for p in d.iterdir()) for v, d in variants.items()}
    assert "chat_template.jinja" not in files["a"] and "processor_config.json" not in files["a"]
    assert "chat_template.jinja" in files["b"] and "chat_template.jinja" not in files["c"]
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    procs = {v: AutoProcessor.from_pretrained(d, local_files_only=True) for v, d in variants.items()}
    assert procs["a"].chat_template is None and procs["a"].tokenizer.chat_template
    assert "<|image_pad|>" not in procs["b"].apply_chat_template(msgs, tokenize=False)
    assert procs["c"].chat_template is None and procs["c"].tokenizer.chat_template is None


def _image_turn(ids: list[int], tok, img_id: int) -> list[int]:
    """The user turn that holds the image: from its <|im_start|> through its <|im_end|>."""
    first = ids.index(img_id)
    last = len(ids) - 1 - ids[::-1].index(img_id)
    start = max(i for i in range(first) if ids[i] == tok.convert_tokens_to_ids("<|im_start|>"))
    end = next(i for i in range(last, len(ids)) if ids[i] == tok.convert_tokens_to_ids("<|im_end|>"))
    return ids[start:end + 1]


def test_calibration_places_the_image(variants, tiny_ckpt):
    from convert import Checkpoint
    from quantize.calibration import calibration_layout, default_samples, encode_sample

    samples = default_samples(2, seqlen=256)
    assert samples[0].image is not None and samples[1].image is None
    assert calibration_layout(tiny_ckpt, samples) == DESCRIPTIONS["processor"]
    ref = encode_sample(tiny_ckpt.processor, samples[0], seqlen=256)
    ref_ids = ref.input_ids[0].tolist()
    img_id = tiny_ckpt.processor.image_token_id
    assert ref.n_image_tokens > 0
    for v, d in variants.items():
        ckpt = Checkpoint(d)
        assert calibration_layout(ckpt, samples) == LAYOUT_LINE[v]
        enc = encode_sample(ckpt.processor, samples[0], seqlen=256)
        ids = enc.input_ids[0].tolist()
        assert enc.n_image_tokens == ref.n_image_tokens, v
        assert np.array_equal(enc.pixel_values.numpy(), ref.pixel_values.numpy()), v
        # the image turn (header, <image_id>, <image>, slices, question) is the same token for token
        assert _image_turn(ids, ckpt.tokenizer, img_id) == _image_turn(ref_ids, tiny_ckpt.tokenizer, img_id), v
        if v in "ab":  # the same template text around it: the whole sample is the same
            assert ids == ref_ids, v
        text = encode_sample(ckpt.processor, samples[1], seqlen=256).input_ids[0].tolist()
        assert img_id not in text and text[0] == ckpt.tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_chatml_layout(variants):
    from convert import Checkpoint

    tok = Checkpoint(variants["c"]).tokenizer
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    layout = chat_layout(tok)
    assert layout.kind == "chatml"
    assert layout.render(msgs, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<|image_pad|>\nWhat is this?<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_scenarios_keep_image_parts(variants, tiny_ckpt):
    from convert import Checkpoint
    from validate.scenarios import ImagePart, TextPart, build_turns, load_scenarios

    def shape(turns):
        return [[p.index if isinstance(p, ImagePart) else p.text for p in turn] for turn in turns]

    for sc in load_scenarios("image-448-16x,two-images,multi-turn"):
        ref = build_turns(sc, tiny_ckpt.tokenizer)
        for v in "bc":
            tok = Checkpoint(variants[v]).tokenizer
            got = build_turns(sc, tok)
            if v == "b":  # the template minus its image branch: the same prompt
                assert shape(got) == shape(ref), (v, sc.name)
            else:  # ChatML: the same turns; only the generation prompt has no empty think block
                assert [p.index for t in got for p in t if isinstance(p, ImagePart)] == \
                       [p.index for t in ref for p in t if isinstance(p, ImagePart)], sc.name
                assert all(t[-1].text.endswith("<|im_start|>assistant\n") for t in got), sc.name
            if sc.needs_vision:
                first = got[0]
                assert first[0].text.endswith("<|im_start|>user\n") and isinstance(first[1], ImagePart), (v, sc.name)
                assert all(p.ids == tuple(tok.encode(p.text, add_special_tokens=False))
                           for t in got for p in t if isinstance(p, TextPart))


@pytest.mark.parametrize("v", ["a", "b", "c"])
def test_quantize_clis(variants, tmp_path, capsys, v):
    """imatrix and gptq on each variant: exit 0, the layout line, image tokens in the statistics."""
    from quantize.cli import main

    model = str(variants[v])
    code = main(["imatrix", "--model", model, "--samples", "2", "--seqlen", "256", "--out",
                 str(tmp_path / "imatrix.gguf"), "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    assert f"calibration layout: {LAYOUT_LINE[v]}\n" in out and "(1 with an image)" in out, out
    code = main(["gptq", "--model", model, "--calib-samples", "2", "--seqlen", "256", "--out", str(tmp_path / "gptq"),
                 "--no-validate", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    assert f"calibration layout: {LAYOUT_LINE[v]}\n" in out and " 0 image tokens" not in out, out
    if v == "c":
        txt = tmp_path / "calib.txt"
        txt.write_text("The quick brown fox jumps over the lazy dog. " * 80, encoding="utf-8")
        code = main(["imatrix", "--model", model, "--calib", str(txt), "--samples", "1", "--seqlen", "128", "--out",
                     str(tmp_path / "text.gguf"), "--quiet"])
        out, err = capsys.readouterr()
        assert code == 0 and "calibration layout: plain text chunks" in out, err[-2000:]


def test_reference_embeddings_follow_the_runtime_mode(tiny_ckpt):
    """The harness asks a runtime for embeddings without a mode: the transformers runtimes must use
    their own, as their layout does (a 16x default under a 4x layout broke metrics.cosine)."""
    from PIL import Image

    from runtimes.reference import ReferenceRuntime

    img = Image.new("RGB", (448, 448), (120, 30, 200))
    for mode in ("16x", "4x"):
        rt = ReferenceRuntime(tiny_ckpt, mode=mode)
        counts = [c.n_tokens for c in rt.image_layout(img) if c.kind == "image"]
        assert [e.shape[0] for e in rt.image_embeddings(img)] == counts, mode
        rt.close()
