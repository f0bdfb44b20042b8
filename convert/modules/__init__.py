"""Traceable export modules: the one set of PyTorch graphs ONNX, ExecuTorch and Core ML are built from.

Each is a plain `torch.nn.Module` over transformers' own weights (shared with the loaded model),
equal to transformers in eager PyTorch (tests/test_export_modules.py), without data-dependent
Python control flow, so `torch.export` traces it with dynamic shapes:

- `VisionEncoder(model, spec, mode)`: pixels [1, 3, 14h, 14w] -> image_features [n, text_hidden];
- `TokenEmbedding(model)`: input_ids [1, T] -> inputs_embeds [1, T, H];
- `TextDecoder(model, spec.text)`: inputs_embeds, attention_mask, position_ids, state -> logits, state.
"""

from .text import StateSpec, TextDecoder, TokenEmbedding, state_specs
from .vision import VisionEncoder, grid_multiple, unpack

__all__ = ["VisionEncoder", "TokenEmbedding", "TextDecoder", "StateSpec", "state_specs", "unpack", "grid_multiple"]
