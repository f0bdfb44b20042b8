"""Synthetic checkpoint presets: HF configs as data.

`full` is this project's own copy of the real MiniCPM-V 4.6 config values (never read from
elsewhere at run time). The small presets keep the real structure and change sizes only.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

LIN, FULL = "linear_attention", "full_attention"

# The real model's config.json (text_config / vision_config / top level).
REAL_CONFIG: dict[str, Any] = {
    "architectures": ["MiniCPMV4_6ForConditionalGeneration"],
    "model_type": "minicpmv4_6",
    "insert_layer_id": 6,
    "image_size": 448,
    "drop_vision_last_layer": False,
    "image_token_id": 248056,
    "video_token_id": 248057,
    "tie_word_embeddings": True,
    "downsample_mode": "16x",
    "merge_kernel_size": [2, 2],
    "merger_times": 1,
    "text_config": {
        "model_type": "qwen3_5_text",
        "vocab_size": 248094,
        "hidden_size": 1024,
        "intermediate_size": 3584,
        "num_hidden_layers": 24,
        "layer_types": [LIN, LIN, LIN, FULL] * 6,
        "full_attention_interval": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 256,
        "attn_output_gate": True,
        "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": 128,
        "linear_value_head_dim": 128,
        "linear_num_key_heads": 16,
        "linear_num_value_heads": 16,
        "max_position_embeddings": 262144,
        "rms_norm_eps": 1e-06,
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25},
        "eos_token_id": 248046,
        "pad_token_id": 248044,
    },
    "vision_config": {
        "model_type": "minicpmv4_6_vision",
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "num_channels": 3,
        "image_size": 980,
        "patch_size": 14,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-06,
        "window_kernel_size": [2, 2],
    },
}


@dataclass(frozen=True)
class Preset:
    name: str
    text: dict[str, Any]  # overrides of text_config
    vision: dict[str, Any]  # overrides of vision_config
    top: dict[str, Any]  # overrides of the top level
    bpe_vocab_size: int  # merges learned on the shipped corpus
    padded_vocab: bool  # special tokens at their real ids, vocab padded to the real size
    dtype: str  # "bfloat16" or "float32"
    max_shard_size: str | None = None


def _layers(pattern: list[str], n: int) -> list[str]:
    return [pattern[i % len(pattern)] for i in range(n)]


PRESETS: dict[str, Preset] = {
    # The embedded default: seconds to build, a few MB; n_k != n_v linear heads so the V-head
    # reorder is exercised; the vision grid stays 70x70 because llama.cpp hard-codes it.
    "tiny": Preset(
        "tiny",
        text=dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, layer_types=_layers([LIN, LIN, LIN, FULL], 4),
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, linear_key_head_dim=64,
                  linear_value_head_dim=64, linear_num_key_heads=2, linear_num_value_heads=4),
        vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4),
        top=dict(insert_layer_id=1),
        bpe_vocab_size=2048, padded_vocab=False, dtype="bfloat16",
    ),
    # Another shape: hidden not a multiple of 256, an FFN not a multiple of 32 (every k-quant fallback),
    # a 3-layer attention interval, 3 value heads per key head.
    "tiny-alt": Preset(
        "tiny-alt",
        text=dict(hidden_size=320, intermediate_size=600, num_hidden_layers=6, full_attention_interval=3,
                  layer_types=_layers([LIN, LIN, FULL], 6), num_attention_heads=5, num_key_value_heads=1, head_dim=64,
                  linear_key_head_dim=32, linear_value_head_dim=32, linear_num_key_heads=2, linear_num_value_heads=6),
        vision=dict(hidden_size=96, intermediate_size=200, num_hidden_layers=3, num_attention_heads=3),
        top=dict(insert_layer_id=0),
        bpe_vocab_size=1536, padded_vocab=False, dtype="float32",
    ),
    # Every quantizable row a multiple of 256 and 8 layers, so k-quant mixtures are fully exercised.
    "tiny-k": Preset(
        "tiny-k",
        text=dict(hidden_size=256, intermediate_size=768, num_hidden_layers=8, layer_types=_layers([LIN, LIN, LIN, FULL], 8),
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, linear_key_head_dim=64,
                  linear_value_head_dim=64, linear_num_key_heads=2, linear_num_value_heads=4),
        vision=dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4),
        top=dict(insert_layer_id=0),
        bpe_vocab_size=2048, padded_vocab=False, dtype="bfloat16",
    ),
    # The real shapes (about 1.3 B parameters), bf16, sharded like HF checkpoints.
    "full": Preset("full", text={}, vision={}, top={}, bpe_vocab_size=16384, padded_vocab=True,
                   dtype="bfloat16", max_shard_size="1GB"),
}


def preset_config(preset: Preset, special_ids: dict[str, int], vocab_size: int) -> dict[str, Any]:
    """The HF config.json for a preset, with token ids from the synthetic tokenizer."""
    cfg = copy.deepcopy(REAL_CONFIG)
    cfg.update(preset.top)
    cfg["text_config"].update(preset.text)
    cfg["vision_config"].update(preset.vision)
    tc = cfg["text_config"]
    tc["vocab_size"] = vocab_size
    tc["eos_token_id"] = special_ids["<|im_end|>"]
    tc["pad_token_id"] = special_ids["<|endoftext|>"]
    cfg["image_token_id"] = special_ids["<|image_pad|>"]
    cfg["video_token_id"] = special_ids["<|video_pad|>"]
    cfg["torch_dtype"] = preset.dtype
    return cfg
