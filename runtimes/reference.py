"""The PyTorch reference: transformers' MiniCPMV4_6ForConditionalGeneration in float32.

Every artifact is compared against this runtime. It implements the whole `Runtime` interface
(images laid out by transformers' own processor, `<image_id>` tags included; a stateful
prefill/extend on transformers' cache), so checkpoints that load through transformers (the
GPTQ/AWQ/compressed-tensors folders, runtimes/hf_quant.py) are validated like any artifact.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from convert.checkpoint import Checkpoint
from convert.errors import ConvertError

from .base import Chunk, Prefill, Runtime
from .lazy_weights import LazyWeights, storage_dtype


class ReferenceRuntime(Runtime):
    name = "transformers"
    capabilities = frozenset({"text", "image", "video"})

    # A quantized folder opened as a dense float view (convert.quantized_source.QuantizedCheckpoint,
    # `dense_view = True`) is loaded from that view, so the reference computes exactly the model the
    # exporters read. Subclasses that load through transformers' quantized loaders (HFQuantRuntime)
    # set this False.
    reads_dense_view = True

    def __init__(self, model: str | Path | Checkpoint, *, n_threads: int | None = None, dtype: str = "float32",
                 mode: str = "16x", lazy: bool = False):
        import torch
        from transformers import MiniCPMV4_6ForConditionalGeneration

        self.ckpt = model if isinstance(model, Checkpoint) else Checkpoint(model)
        if n_threads:
            torch.set_num_threads(n_threads)
        self.torch = torch
        dense = getattr(self.ckpt, "dense_view", False) and self.reads_dense_view
        # lazy: float32 computation on weights held in the checkpoint's dtype (runtimes/lazy_weights.py)
        lazy = lazy and dtype == "float32"
        load = storage_dtype(self.ckpt) if lazy and not dense else dtype
        try:
            if dense:
                self.model = self._from_dense_view(load)
            else:
                self.model = MiniCPMV4_6ForConditionalGeneration.from_pretrained(
                    self.ckpt.path, dtype=getattr(torch, load), local_files_only=True).eval()
        except Exception as e:  # transformers raises many types on a config it cannot build (a null it reads)
            raise ConvertError(f"{self.ckpt.path}: cannot load the model ({e.__class__.__name__}: {str(e)[:200]})") from None
        self.lazy = LazyWeights(self.model) if lazy else None
        self.tokenizer = self.ckpt.tokenizer
        self.mode = mode  # token mode of image_layout / prefill images
        self.n_vocab = int(self.model.config.text_config.vocab_size)
        self._cache = None
        self._n_past = 0
        self._last = None
        self.last_timings: dict[str, float] = {}

    def _from_dense_view(self, dtype: str):
        """The model built from config.json without its quantization_config (transformers would
        otherwise swap in the quantized linears) and loaded with the view's float32 tensors."""
        from transformers import MiniCPMV4_6Config, MiniCPMV4_6ForConditionalGeneration

        torch = self.torch
        cfg = MiniCPMV4_6Config.from_dict({k: v for k, v in self.ckpt.config.items() if k != "quantization_config"})
        sd = {n: torch.from_numpy(self.ckpt.tensor(n)) for n in self.ckpt.names()}
        return MiniCPMV4_6ForConditionalGeneration.from_pretrained(None, config=cfg, state_dict=sd,
                                                                   dtype=getattr(torch, dtype)).eval()

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

    def greedy(self, tokens: list[int], n: int, *, fresh: bool = True) -> list[int]:
        """Greedy decoding on transformers' cache (no stop at EOS); fresh=False continues the
        current memory. Afterwards the memory holds the prompt and the n tokens."""
        return self.greedy_by_extend(tokens, n, fresh=fresh)

    # `mode` defaults to the runtime's own token mode, the one image_layout and prefill use: the
    # harness asks for embeddings through the Runtime interface, which passes no mode (a fixed
    # "16x" default gave 16x embeddings under a 4x layout).
    def image_inputs(self, image, mode: str | None = None) -> dict:
        """Processor outputs for one image (pixel_values, target_sizes) in `mode`."""
        proc = self.ckpt.processor
        return proc.image_processor([image], downsample_mode=mode or self.mode, return_tensors="pt")

    def image_embeddings(self, image, mode: str | None = None) -> list[np.ndarray]:
        """Features per chunk of an image, or of every frame of a `Video` (transformers' video path)."""
        from .base import Video

        mode = mode or self.mode
        with self.torch.no_grad():
            if isinstance(image, Video):
                inp = self.ckpt.processor.video_processor(videos=[list(image.frames)], downsample_mode=mode, do_sample_frames=False,
                                                          return_tensors="pt")
                feats = self.model.model.get_video_features(
                    pixel_values_videos=inp["pixel_values_videos"], target_sizes_videos=inp["target_sizes_videos"],
                    downsample_mode=mode)
            else:
                inp = self.image_inputs(image, mode)
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
        return torch.cat(parts, 0)[None].to(emb.weight.dtype)  # a float16 reference takes float16 inputs

    def sequence_logits(self, segments, keep: np.ndarray | None = None) -> np.ndarray:
        """float32 [N, n_vocab]: logits at every position of the concatenated segments (one forward);
        with `keep` (a boolean mask over the positions) only at those, the others never computed."""
        with self.torch.no_grad():
            logits, _ = self._head(keep, inputs_embeds=self._embeds(segments), use_cache=False)
        return logits.float().numpy()

    def _head(self, keep, **kw):
        """The model's forward with lm_head applied only at `keep` (a boolean mask, an index array,
        or a slice) of the positions: (logits [kept, n_vocab], the inner model's output). Its
        ForConditionalGeneration forward takes no logits_to_keep and would compute them all."""
        out = self.model.model(**kw)
        h = out.last_hidden_state[0]
        if keep is not None:
            if not isinstance(keep, slice):
                keep = np.asarray(keep)
                keep = self.torch.from_numpy(np.flatnonzero(keep) if keep.dtype == bool else keep)
            h = h[keep]
        return self.model.lm_head(h), out

    def sequence_greedy(self, segments, n: int) -> list[int]:
        """Greedy continuation of the concatenated segments (cached steps, no stop at EOS)."""
        torch = self.torch
        toks: list[int] = []
        with torch.no_grad():
            last, out = self._head(slice(-1, None), inputs_embeds=self._embeds(segments), use_cache=True)
            for _ in range(n):
                toks.append(int(last[-1].argmax()))
                last, out = self._head(None, input_ids=torch.tensor([[toks[-1]]]), past_key_values=out.past_key_values,
                                       use_cache=True)
        return toks

    def features(self, pixel_values, target_sizes, mode: str) -> list[np.ndarray]:
        """The projector's output for already-preprocessed (packed) pixels, one array per chunk."""
        with self.torch.no_grad():
            feats = self.model.model.get_image_features(pixel_values=pixel_values, target_sizes=target_sizes,
                                                        downsample_mode=mode)
        return [f.float().numpy() for f in feats.pooler_output]

    # -- the stateful Runtime interface ---------------------------------------------------------

    @property
    def n_past(self) -> int:
        return self._n_past

    def reset(self) -> None:
        self._cache = None
        self._n_past = 0
        self._last = None

    def _forward(self, embeds):
        """Run [1, n, hidden] embeddings on top of the current cache; float32 [n, n_vocab]."""
        torch = self.torch
        n = embeds.shape[1]
        pos = torch.arange(self._n_past, self._n_past + n)[None]
        with torch.no_grad():
            out = self.model(inputs_embeds=embeds, past_key_values=self._cache, use_cache=True, position_ids=pos)
        self._cache = out.past_key_values
        self._n_past += n
        logits = out.logits[0].float().numpy()
        self._last = logits[-1]
        return logits

    def extend(self, tokens) -> np.ndarray:
        if not len(tokens):
            return np.empty((0, self.n_vocab), dtype=np.float32)
        return self._forward(self._embeds([list(tokens)]))

    def image_layout(self, image) -> list[Chunk]:
        """transformers' processor's expansion of one image or `Video`: `<image_id>`, `<image>`, slices,
        as text chunks around one media chunk per overview/slice (every frame so, for a video)."""
        from .pipeline import processor_layout

        cfg = self.model.config
        return processor_layout(self.ckpt.processor, image, self.mode, int(cfg.image_token_id), cfg.video_token_id)

    def prefill(self, parts, *, fresh: bool = True) -> Prefill:
        if fresh:
            self.reset()
        segs: list = []
        chunks: list[Chunk] = []
        for part in parts:
            if isinstance(part, (list, tuple, np.ndarray)):
                ids = [int(t) for t in part]
                if ids:
                    segs.append(ids)
                    chunks.append(Chunk("text", len(ids), len(ids), tuple(ids)))
                continue
            feats = iter(self.image_embeddings(part, mode=self.mode))
            for c in self.image_layout(part):
                segs.append(list(c.tokens) if c.kind == "text" else next(feats))
                chunks.append(c)
        start = self._n_past
        logits = self._forward(self._embeds(segs)) if segs else np.empty((0, self.n_vocab), np.float32)
        text = np.concatenate([np.full(len(s), not (isinstance(s, np.ndarray) and s.dtype.kind == "f")) for s in segs]) \
            if segs else np.zeros(0, bool)
        toks = [t for c in chunks if c.kind == "text" for t in c.tokens]
        pos = np.arange(start, self._n_past)[text]
        return Prefill(chunks, toks, pos.astype(np.int64), logits[text], self._n_past)

    def close(self) -> None:
        if self.lazy is not None:
            self.lazy.close()
        self.model = None
        self._cache = None


# torch threads for collection. On a 2-core machine shared with other work, torch's default
# (one thread per core) ran the tiny model's samples up to 70x slower than one thread (spinning
# OpenMP workers); one thread is the robust default, more are opt-in.
DEFAULT_THREADS = 1


@contextlib.contextmanager
def hf_quiet(quiet: bool):
    """No transformers loading bars or warnings (e.g. about its slow kernel fallbacks) when quiet."""
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging

    bar, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


def load_reference_model(ckpt: Checkpoint, *, quiet: bool = False, dtype: str = "float32"):
    """transformers' MiniCPMV4_6ForConditionalGeneration in float32 (the project's reference), or
    stored in `dtype` for a caller that widens each part to float32 when it runs it."""
    try:
        with hf_quiet(quiet):
            return ReferenceRuntime(ckpt, dtype=dtype).model
    except ConvertError:
        raise
    except Exception as e:  # transformers raises many types on a bad folder
        raise ConvertError(f"{ckpt.path}: cannot load the model ({e.__class__.__name__}: {str(e)[:200]})") from None
