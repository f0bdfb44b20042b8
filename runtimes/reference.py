"""The PyTorch reference: transformers' MiniCPMV4_6ForConditionalGeneration in float32.

Every artifact is compared against this runtime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from convert.checkpoint import Checkpoint

from .base import Runtime


class ReferenceRuntime(Runtime):
    name = "transformers"

    def __init__(self, model: str | Path | Checkpoint, *, n_threads: int | None = None, dtype: str = "float32"):
        import torch
        from transformers import MiniCPMV4_6ForConditionalGeneration

        self.ckpt = model if isinstance(model, Checkpoint) else Checkpoint(model)
        if n_threads:
            torch.set_num_threads(n_threads)
        self.torch = torch
        self.model = MiniCPMV4_6ForConditionalGeneration.from_pretrained(
            self.ckpt.path, dtype=getattr(torch, dtype), local_files_only=True).eval()
        self.tokenizer = self.ckpt.tokenizer

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        if special:
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        # split_special_tokens makes special-token text ordinary text, as llama.cpp's parse_special=False
        return list(self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def logits(self, tokens: list[int]) -> np.ndarray:
        with self.torch.no_grad():
            ids = self.torch.tensor([tokens], dtype=self.torch.long)
            out = self.model(input_ids=ids, use_cache=False)
        return out.logits[0].float().numpy()

    def greedy(self, tokens: list[int], n: int) -> list[int]:
        with self.torch.no_grad():
            ids = self.torch.tensor([tokens], dtype=self.torch.long)
            out = self.model.generate(input_ids=ids, attention_mask=self.torch.ones_like(ids), max_new_tokens=n,
                                      min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        return [int(t) for t in out[0, len(tokens):]]

    def image_inputs(self, image, mode: str = "16x") -> dict:
        """Processor outputs for one image (pixel_values, target_sizes) in `mode`."""
        proc = self.ckpt.processor
        return proc.image_processor([image], downsample_mode=mode, return_tensors="pt")

    def image_embeddings(self, image, mode: str = "16x") -> list[np.ndarray]:
        inp = self.image_inputs(image, mode)
        with self.torch.no_grad():
            feats = self.model.model.get_image_features(
                pixel_values=inp["pixel_values"], target_sizes=inp["target_sizes"], downsample_mode=mode)
        return [f.float().numpy() for f in feats.pooler_output]

    # -- sequences with precomputed image embeddings (the validation harness lays prompts out
    #    the way the runtime under test does, and feeds its image features here) --------------

    def _embeds(self, segments) -> "torch.Tensor":  # noqa: F821
        """[1, N, hidden] input embeddings of segments: token-id lists or float [n, hidden] arrays."""
        torch = self.torch
        emb = self.model.get_input_embeddings()
        parts = []
        for seg in segments:
            if isinstance(seg, np.ndarray) and seg.dtype.kind == "f":
                parts.append(torch.from_numpy(np.ascontiguousarray(seg, dtype=np.float32)))
            else:
                parts.append(emb(torch.tensor(list(seg), dtype=torch.long)).float())
        return torch.cat(parts, 0)[None]

    def sequence_logits(self, segments) -> np.ndarray:
        """float32 [N, n_vocab]: logits at every position of the concatenated segments (one forward)."""
        with self.torch.no_grad():
            out = self.model(inputs_embeds=self._embeds(segments), use_cache=False)
        return out.logits[0].float().numpy()

    def sequence_greedy(self, segments, n: int) -> list[int]:
        """Greedy continuation of the concatenated segments (cached steps, no stop at EOS)."""
        torch = self.torch
        toks: list[int] = []
        with torch.no_grad():
            out = self.model(inputs_embeds=self._embeds(segments), use_cache=True)
            for _ in range(n):
                toks.append(int(out.logits[0, -1].argmax()))
                out = self.model(input_ids=torch.tensor([[toks[-1]]]), past_key_values=out.past_key_values, use_cache=True)
        return toks

    def features(self, pixel_values, target_sizes, mode: str) -> list[np.ndarray]:
        """The projector's output for already-preprocessed (packed) pixels, one array per chunk."""
        with self.torch.no_grad():
            feats = self.model.model.get_image_features(pixel_values=pixel_values, target_sizes=target_sizes,
                                                        downsample_mode=mode)
        return [f.float().numpy() for f in feats.pooler_output]

    def close(self) -> None:
        self.model = None
