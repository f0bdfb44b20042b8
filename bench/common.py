"""What the benchmark scripts share: the checkpoint to measure and the held-out chat prompts."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def open_checkpoint(path: str | None):
    """--model, or the embedded tiny synthetic model."""
    from convert import Checkpoint

    if path:
        return Checkpoint(path)
    from convert.synth.build import default_model

    return Checkpoint(default_model())


def held_out_conversations() -> list[str]:
    """recipes/chat_prompts.json's conversations (not in any calibration set), as chat-template text."""
    from recipes import load

    return load("chat_prompts")["conversations"]


def held_out_ids(tokenizer) -> list[list[int]]:
    """Each held-out conversation through the chat template, as token ids."""
    return [tokenizer.encode(tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True),
                             add_special_tokens=False) for c in held_out_conversations()]
