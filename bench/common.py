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


def held_out_reference(ckpt, threads: int) -> tuple[list[int], "object"]:
    """(ids, float32 reference logits) of the held-out conversations, concatenated."""
    from runtimes.reference import ReferenceRuntime

    ref = ReferenceRuntime(ckpt, n_threads=threads)
    ids = [t for p in held_out_ids(ref.tokenizer) for t in p]
    logits = ref.logits(ids)
    ref.close()
    return ids, logits


def decoder_params(ckpt) -> int:
    """The decoder's weights: bits per weight count the whole decoder file over them, as llama.cpp reports it."""
    import math

    return sum(math.prod(ckpt.info(n).shape) for n in ckpt.names() if n.startswith("model.language_model."))


def measure_decoder(label: str, dec, ids: list[int], ref_logits, n_params: int, threads: int) -> dict:
    """One GGUF decoder in llama.cpp against the reference logits: a table row (also printed)."""
    from runtimes.llamacpp import LlamaCppRuntime
    from validate.metrics import logits_agreement

    with LlamaCppRuntime(dec, n_ctx=max(2048, len(ids) + 16), n_threads=threads) as rt:
        m = logits_agreement(ref_logits, rt.logits(ids))
    size = dec.stat().st_size
    print(f"{label}: KL {m['kl_mean']:.5f} (p99 {m['kl_p99']:.4f}), top-1 {m['top1_agreement']:.4f}", flush=True)
    return {"type": label, "kl_mean": m["kl_mean"], "kl_p99": m["kl_p99"], "top1": m["top1_agreement"],
            "positions": m["positions"], "bytes": size, "bpw": 8 * size / n_params}


def print_decoder_table(rows: list[dict], first_column: str = "type") -> None:
    print(f"| {first_column} | KL mean | KL p99 | top-1 agreement | decoder size | bits/weight |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['type']} | {r['kl_mean']:.5f} | {r['kl_p99']:.4f} | {100 * r['top1']:.2f}% | "
              f"{r['bytes'] / 2**20:.1f} MiB | {r['bpw']:.2f} |")
