"""Random MiniCPM-V 4.6 shapes: checkpoints the project's rules were not tuned on.

`draw_preset(seed)` returns a Preset whose sizes come from a seeded generator: hidden and FFN
widths that are and are not multiples of 32 and 256 (every k-quant fallback), key/value head
ratios, full-attention intervals, Gated DeltaNet head counts and ratios, vision widths, depths and
insert layers, fp32 or bf16, sharded or not. What a size may be is only what the architecture and
llama.cpp require (ModelSpec rejects the rest); nothing here knows the presets' numbers.

`plain_folder(dir)` turns a built checkpoint into what bare `save_pretrained` calls of the model,
the image processor and the tokenizer write: preprocessor_config.json only (no processor or video
processor config) and the chat template only in tokenizer_config.json, so the processor has no
chat template of its own.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from .presets import FULL, LIN, Preset

# widths drawn from: multiples of 256, of 32 but not 256, and of neither (even, as heads need)
_HIDDEN = {"256": (256, 512), "32": (192, 288, 320, 352, 416, 480), "odd": (200, 264, 300, 344, 376)}
_FFN = {"256": (512, 768, 1024), "32": (384, 448, 544, 640, 704), "odd": (420, 520, 600, 700)}


def _layers(n: int, interval: int) -> list[str]:
    return [FULL if (i + 1) % interval == 0 else LIN for i in range(n)]


def draw_preset(seed: int) -> Preset:
    """A random small MiniCPM-V 4.6 shape (tests, trust sweeps); the same seed, the same preset."""
    r = random.Random(f"minicpmv-edge draw {seed}")
    hidden = r.choice(_HIDDEN[r.choice(list(_HIDDEN))])
    ffn = r.choice(_FFN[r.choice(list(_FFN))])
    interval = r.choice((2, 3, 4))
    n_layers = r.randint(interval, 2 * interval + 1)  # at least one full-attention layer
    n_heads = r.choice((2, 3, 4, 6, 8))
    kv = r.choice([k for k in (1, 2, 3, 4) if n_heads % k == 0])
    head_dim = r.choice((32, 64, 128))
    k_heads = r.choice((1, 2, 4))
    v_heads = k_heads * r.choice((1, 2, 3))
    lin_dim = r.choice((32, 64))
    v_layers = r.randint(2, 5)
    v_heads_n = r.choice((2, 3, 4))
    v_hidden = v_heads_n * r.choice((16, 32))
    v_ffn = r.choice((2 * v_hidden, 4 * v_hidden, 3 * v_hidden + 8))
    text = dict(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=n_layers,
                full_attention_interval=interval, layer_types=_layers(n_layers, interval),
                num_attention_heads=n_heads, num_key_value_heads=kv, head_dim=head_dim,
                linear_key_head_dim=lin_dim, linear_value_head_dim=lin_dim,
                linear_num_key_heads=k_heads, linear_num_value_heads=v_heads)
    vision = dict(hidden_size=v_hidden, intermediate_size=v_ffn, num_hidden_layers=v_layers,
                  num_attention_heads=v_heads_n)
    dtype = r.choice(("bfloat16", "float32"))
    shard = r.choice((None, "1MB"))
    return Preset(f"drawn-{seed}", text=text, vision=vision, top=dict(insert_layer_id=r.randrange(v_layers)),
                  bpe_vocab_size=r.choice((1024, 1536, 2048)), padded_vocab=False, dtype=dtype,
                  max_shard_size=shard)


def describe(p: Preset) -> str:
    t, v = p.text, p.vision
    return (f"hidden {t['hidden_size']}, ffn {t['intermediate_size']}, {t['num_hidden_layers']} layers "
            f"(full attention every {t['full_attention_interval']}), heads {t['num_attention_heads']}/"
            f"{t['num_key_value_heads']}x{t['head_dim']}, DeltaNet heads {t['linear_num_key_heads']}/"
            f"{t['linear_num_value_heads']}x{t['linear_key_head_dim']}; vision {v['hidden_size']} x "
            f"{v['num_hidden_layers']} layers, insert {p.top['insert_layer_id']}; {p.dtype}"
            f"{', sharded' if p.max_shard_size else ''}")


def plain_folder(path: str | Path) -> None:
    """Make a built checkpoint look like bare `save_pretrained` calls of model, image processor and
    tokenizer (see the module docstring)."""
    path = Path(path)
    tc = path / "tokenizer_config.json"
    cfg = json.loads(tc.read_text(encoding="utf-8"))
    tpl = path / "chat_template.jinja"
    if "chat_template" not in cfg and tpl.is_file():
        cfg["chat_template"] = tpl.read_text(encoding="utf-8")
        tc.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for name in ("processor_config.json", "video_preprocessor_config.json", "chat_template.jinja", "chat_template.json"):
        (path / name).unlink(missing_ok=True)
