"""The synthetic checkpoint's tokenizer and processor files.

A byte-level BPE trained on the shipped corpus (`corpus.txt`) with Qwen3.5's exact normalizer,
pre-tokenizer and decoder, plus the real model's added tokens at their real ids, so that
`AutoTokenizer` / `AutoProcessor` load the folder offline and build multimodal inputs exactly as
for openbmb/MiniCPM-V-4.6 (slices, 16x/4x placeholder counts, `<image_id>N</image_id>`).
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus.txt"
CHAT_TEMPLATE = HERE / "chat_template.jinja"

# Qwen3.5's pre-tokenizer regex, verbatim from transformers' qwen3_5/tokenization_qwen3_5.py.
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# (text, special) in id order. The first 26 sit at their real Qwen3.5 ids (248044..248069); the
# special flags follow Qwen3 tokenizers (tool/think/fim/repo tokens are plain added tokens).
_ADDED: list[tuple[str, bool]] = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
    # MiniCPM-V's own markers: their real ids are not known to this project, so they take the next
    # free ids (248070..248075) in this order. Special, as in the real model's extra_special_tokens.
    ("<image>", True), ("</image>", True), ("<slice>", True), ("</slice>", True),
    ("<image_id>", True), ("</image_id>", True),
]
FIRST_REAL_ID = 248044
SPECIAL_TOKENS: dict[str, int] = {text: FIRST_REAL_ID + i for i, (text, _) in enumerate(_ADDED)}

# Named tokens the MiniCPM-V 4.6 processor reads off the tokenizer (`tokenizer.image_token`, ...).
EXTRA_SPECIAL_TOKENS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "image_start_token": "<image>",
    "image_end_token": "</image>",
    "slice_start_token": "<slice>",
    "slice_end_token": "</slice>",
    "image_id_start_token": "<image_id>",
    "image_id_end_token": "</image_id>",
}
MODEL_MAX_LENGTH = 262144  # the text model's max_position_embeddings


def _train_bpe(bpe_vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab_size, min_frequency=0, show_progress=False, special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 byte symbols: any string encodes
    )
    # Read bytes and decode ourselves: text-mode reading would fold the corpus's "\r\n" runs.
    tok.train_from_iterator([CORPUS.read_bytes().decode("utf-8")], trainer)
    got = tok.get_vocab_size()
    if got != bpe_vocab_size:
        raise ValueError(f"the corpus supports {got} BPE tokens, fewer than the {bpe_vocab_size} asked for")
    return tok


def write_tokenizer(out_dir: Path, *, bpe_vocab_size: int, padded_vocab_size: int | None = None) -> dict[str, int]:
    """Train a byte-level BPE on the corpus the project ships and write tokenizer.json, tokenizer_config.json
    (with the chat template) into out_dir. Returns {special token text: id}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if padded_vocab_size is None:
        ids = {text: bpe_vocab_size + i for i, (text, _) in enumerate(_ADDED)}
    else:
        ids = dict(SPECIAL_TOKENS)
        if bpe_vocab_size > FIRST_REAL_ID or max(ids.values()) >= padded_vocab_size:
            raise ValueError(f"bpe_vocab_size {bpe_vocab_size} / padded size {padded_vocab_size} clash with the real ids")

    from tokenizers import Tokenizer

    tj = json.loads(_train_bpe(bpe_vocab_size).to_str())
    tj["model"].update(continuing_subword_prefix="", end_of_word_suffix="")  # as Qwen3_5Tokenizer builds it
    tj["added_tokens"] = [
        {"id": ids[text], "content": text, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": special}
        for text, special in _ADDED
    ]
    if padded_vocab_size is not None:
        # `tokenizers` renumbers added tokens that are missing from the model's vocab to
        # len(vocab), len(vocab)+1, ... whatever id tokenizer.json gives them; a gap after the BPE
        # ids is only kept when the model vocab itself holds the tokens at those ids. So they are
        # listed in both places (the BPE never merges up to them: no merge produces "<|...|>").
        tj["model"]["vocab"].update({text: ids[text] for text, _ in _ADDED})
    tok = Tokenizer.from_str(json.dumps(tj))
    wrong = {t: tok.token_to_id(t) for t, i in ids.items() if tok.token_to_id(t) != i}
    if wrong:
        raise AssertionError(f"added tokens landed at the wrong ids: {wrong}")
    tok.save(str(out_dir / "tokenizer.json"), pretty=True)

    template = CHAT_TEMPLATE.read_text(encoding="utf-8")
    config = {
        "tokenizer_class": "TokenizersBackend",  # what transformers 5 maps model_type minicpmv4_6 to
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "errors": "replace",
        "chat_template": template,  # same text as chat_template.jinja, for readers that only look here
        "extra_special_tokens": EXTRA_SPECIAL_TOKENS,
        "added_tokens_decoder": {
            str(ids[text]): {"content": text, "lstrip": False, "normalized": False, "rstrip": False,
                             "single_word": False, "special": special}
            for text, special in _ADDED
        },
    }
    _write_json(out_dir / "tokenizer_config.json", config)
    # transformers 5 saves the template as its own file; gguf's SpecialVocab reads it too.
    (out_dir / "chat_template.jinja").write_text(template, encoding="utf-8")
    return ids


def write_processor_files(out_dir: Path, *, scale_resolution: int, patch_size: int, downsample_mode: str = "16x",
                          max_slice_nums: int = 9) -> None:
    """Write preprocessor_config.json, video_preprocessor_config.json (if the processor needs it), processor_config.json."""
    if downsample_mode not in ("16x", "4x"):
        raise ValueError(f"downsample_mode must be '16x' or '4x', not {downsample_mode!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    common = {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "downsample_mode": downsample_mode,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "max_slice_nums": max_slice_nums,
        "patch_size": patch_size,
        "resample": 3,  # PIL bicubic
        "rescale_factor": 1 / 255,
        "scale_resolution": scale_resolution,
        "slice_mode": True,
        "use_image_id": True,
    }
    _write_json(out_dir / "preprocessor_config.json",
                {**common, "image_processor_type": "MiniCPMV4_6ImageProcessor", "processor_class": "MiniCPMV4_6Processor"})
    # Needed: MiniCPMV4_6Processor.__init__ reads the video processor's slice_mode/downsample_mode.
    _write_json(out_dir / "video_preprocessor_config.json",
                {**common, "video_processor_type": "MiniCPMV4_6VideoProcessor", "processor_class": "MiniCPMV4_6Processor",
                 "do_sample_frames": True, "max_num_frames": 128, "stack_frames": 1})
    _write_json(out_dir / "processor_config.json", {"processor_class": "MiniCPMV4_6Processor"})


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=True) + "\n", encoding="utf-8")
