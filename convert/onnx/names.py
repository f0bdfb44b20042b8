"""The export modules' parameter names (what an ONNX file's initializers are called) as transformers'
names: one table, read by the int4 carry-over (convert/onnx/carry.py) and the static checks
(validate/onnx_weights.py)."""

from __future__ import annotations

# role -> (module parameter prefix, transformers prefix), first match wins
PREFIX = {
    "decoder": [("lm_head.", "lm_head."), ("", "model.language_model.")],
    "embed": [("embed_tokens.", "model.language_model.embed_tokens.")],
    "vision": [("patch_embedding.", "model.vision_tower.embeddings.patch_embedding."),
               ("position_embedding.", "model.vision_tower.embeddings.position_embedding."),
               ("layers.", "model.vision_tower.encoder.layers."),
               ("post_layernorm.", "model.vision_tower.post_layernorm."),
               ("vit_merger.", "model.vision_tower.vit_merger."),
               ("merger.", "model.merger.mlp.0.")],
}


def hf_name(role: str, name: str) -> str | None:
    for src, dst in PREFIX[role]:
        if name.startswith(src):
            return dst + name[len(src):]
    return None
