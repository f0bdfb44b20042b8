"""HF -> GGUF tensor name tables, as data.

Each row: (HF name pattern, GGUF name template, transforms). `{bid}` in a pattern matches a
block index and is substituted into the template. Transform names are looked up in
`transforms.TRANSFORMS`; they run in order. Names follow llama.cpp's gguf-py tables for the
`qwen35` architecture and the `minicpmv4_6` projector.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_L = r"model\.language_model\."
_LB = _L + r"layers\.(?P<bid>\d+)\."
_V = r"model\.vision_tower\."
_VB = _V + r"encoder\.layers\.(?P<bid>\d+)\."
_M = _V + r"vit_merger\."

# Decoder (arch qwen35). Offset RMSNorms store w with output x*(1+w): GGUF wants 1+w,
# except the gated `linear_attn.norm`, which is a plain w.
DECODER_TABLE: list[tuple[str, str, tuple[str, ...]]] = [
    (_L + r"embed_tokens\.weight", "token_embd.weight", ()),
    (r"lm_head\.weight", "output.weight", ()),
    (_L + r"norm\.weight", "output_norm.weight", ("add_one",)),
    (_LB + r"input_layernorm\.weight", "blk.{bid}.attn_norm.weight", ("add_one",)),
    (_LB + r"post_attention_layernorm\.weight", "blk.{bid}.post_attention_norm.weight", ("add_one",)),
    (_LB + r"mlp\.gate_proj\.weight", "blk.{bid}.ffn_gate.weight", ()),
    (_LB + r"mlp\.up_proj\.weight", "blk.{bid}.ffn_up.weight", ()),
    (_LB + r"mlp\.down_proj\.weight", "blk.{bid}.ffn_down.weight", ()),
    # full attention; q rows are per head [q, gate], which llama.cpp splits with views
    (_LB + r"self_attn\.q_proj\.weight", "blk.{bid}.attn_q.weight", ()),
    (_LB + r"self_attn\.k_proj\.weight", "blk.{bid}.attn_k.weight", ()),
    (_LB + r"self_attn\.v_proj\.weight", "blk.{bid}.attn_v.weight", ()),
    (_LB + r"self_attn\.o_proj\.weight", "blk.{bid}.attn_output.weight", ()),
    (_LB + r"self_attn\.q_norm\.weight", "blk.{bid}.attn_q_norm.weight", ("add_one",)),
    (_LB + r"self_attn\.k_norm\.weight", "blk.{bid}.attn_k_norm.weight", ("add_one",)),
    # Gated DeltaNet; V heads go from grouped-by-K-head (HF) to tiled (ggml_repeat) order
    (_LB + r"linear_attn\.in_proj_qkv\.weight", "blk.{bid}.attn_qkv.weight", ("v_rows_after_qk",)),
    (_LB + r"linear_attn\.in_proj_z\.weight", "blk.{bid}.attn_gate.weight", ("v_rows",)),
    (_LB + r"linear_attn\.in_proj_b\.weight", "blk.{bid}.ssm_beta.weight", ("v_heads",)),
    (_LB + r"linear_attn\.in_proj_a\.weight", "blk.{bid}.ssm_alpha.weight", ("v_heads",)),
    (_LB + r"linear_attn\.conv1d\.weight", "blk.{bid}.ssm_conv1d.weight", ("squeeze", "v_rows_after_qk")),
    (_LB + r"linear_attn\.dt_bias", "blk.{bid}.ssm_dt.bias", ("v_heads",)),
    (_LB + r"linear_attn\.A_log", "blk.{bid}.ssm_a", ("neg_exp", "v_heads")),
    (_LB + r"linear_attn\.norm\.weight", "blk.{bid}.ssm_norm.weight", ()),
    (_LB + r"linear_attn\.out_proj\.weight", "blk.{bid}.ssm_out.weight", ("v_cols",)),
]

# Tensors a checkpoint may carry that the decoder GGUF leaves out on purpose.
DECODER_SKIP = (
    r"model\.vision_tower\..*", r"model\.merger\..*",
    # MTP heads: not used by llama.cpp's qwen35 inference; writing the nextn keys without
    # them makes the file unloadable (see README).
    r"(model\.)?mtp\..*",
)

# Vision projector (clip, projector minicpmv4_6).
MMPROJ_TABLE: list[tuple[str, str, tuple[str, ...]]] = [
    (_V + r"embeddings\.patch_embedding\.weight", "v.patch_embd.weight", ()),
    (_V + r"embeddings\.patch_embedding\.bias", "v.patch_embd.bias", ()),
    (_V + r"embeddings\.position_embedding\.weight", "v.position_embd.weight", ()),
    (_VB + r"layer_norm1\.(?P<wb>weight|bias)", "v.blk.{bid}.ln1.{wb}", ()),
    (_VB + r"layer_norm2\.(?P<wb>weight|bias)", "v.blk.{bid}.ln2.{wb}", ()),
    (_VB + r"self_attn\.q_proj\.(?P<wb>weight|bias)", "v.blk.{bid}.attn_q.{wb}", ()),
    (_VB + r"self_attn\.k_proj\.(?P<wb>weight|bias)", "v.blk.{bid}.attn_k.{wb}", ()),
    (_VB + r"self_attn\.v_proj\.(?P<wb>weight|bias)", "v.blk.{bid}.attn_v.{wb}", ()),
    (_VB + r"self_attn\.out_proj\.(?P<wb>weight|bias)", "v.blk.{bid}.attn_out.{wb}", ()),
    (_VB + r"mlp\.fc1\.(?P<wb>weight|bias)", "v.blk.{bid}.ffn_up.{wb}", ()),
    (_VB + r"mlp\.fc2\.(?P<wb>weight|bias)", "v.blk.{bid}.ffn_down.{wb}", ()),
    (_V + r"post_layernorm\.(?P<wb>weight|bias)", "v.post_ln.{wb}", ()),
    # the window-attention token compressor (16x only)
    (_M + r"layer_norm1\.(?P<wb>weight|bias)", "v.vit_merger.ln1.{wb}", ()),
    (_M + r"self_attn\.q_proj\.(?P<wb>weight|bias)", "v.vit_merger.attn_q.{wb}", ()),
    (_M + r"self_attn\.k_proj\.(?P<wb>weight|bias)", "v.vit_merger.attn_k.{wb}", ()),
    (_M + r"self_attn\.v_proj\.(?P<wb>weight|bias)", "v.vit_merger.attn_v.{wb}", ()),
    (_M + r"self_attn\.out_proj\.(?P<wb>weight|bias)", "v.vit_merger.attn_out.{wb}", ()),
    (_M + r"pre_norm\.(?P<wb>weight|bias)", "v.vit_merger.ds_ln.{wb}", ()),
    (_M + r"linear_1\.(?P<wb>weight|bias)", "v.vit_merger.ds_ffn_up.{wb}", ()),
    (_M + r"linear_2\.(?P<wb>weight|bias)", "v.vit_merger.ds_ffn_down.{wb}", ()),
    # the final merger into the LLM space
    (r"model\.merger\.mlp\.0\.pre_norm\.(?P<wb>weight|bias)", "mm.input_norm.{wb}", ()),
    (r"model\.merger\.mlp\.0\.linear_1\.(?P<wb>weight|bias)", "mm.up.{wb}", ()),
    (r"model\.merger\.mlp\.0\.linear_2\.(?P<wb>weight|bias)", "mm.down.{wb}", ()),
]

MMPROJ_SKIP = (r"model\.language_model\..*", r"lm_head\..*", r"(model\.)?mtp\..*")

# 4x mode keeps every token: the compressor is not part of that projector.
MMPROJ_SKIP_4X = (_M + r".*",)


@dataclass(frozen=True)
class Mapped:
    hf_name: str
    gguf_name: str
    transforms: tuple[str, ...]
    bid: int | None


class NameMap:
    def __init__(self, table, skip):
        self._rows = [(re.compile(p), t, tr) for p, t, tr in table]
        self._skip = [re.compile(p) for p in skip]

    def map(self, hf_name: str) -> Mapped | None:
        """The mapping, None for a name that is skipped on purpose, KeyError for an unknown one."""
        if any(rx.fullmatch(hf_name) for rx in self._skip):
            return None
        for rx, tmpl, tr in self._rows:
            m = rx.fullmatch(hf_name)
            if m:
                g = m.groupdict()
                bid = int(g["bid"]) if g.get("bid") is not None else None
                return Mapped(hf_name, tmpl.format(**g), tr, bid)
        raise KeyError(hf_name)


DECODER = NameMap(DECODER_TABLE, DECODER_SKIP)
MMPROJ_16X = NameMap(MMPROJ_TABLE, MMPROJ_SKIP)
MMPROJ_4X = NameMap(MMPROJ_TABLE, MMPROJ_SKIP + MMPROJ_SKIP_4X)
