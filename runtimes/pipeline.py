"""The app-side pipeline a phone app runs around exported graphs, written once for every runtime.

preprocess (transformers' processor, so there is no preprocessing difference to report) -> encode each
image chunk with the vision encoder -> splice the features at the processor's image placeholders ->
decode with the state carried across calls. A runtime (ONNX Runtime; next ExecuTorch, Core ML) adds only
an `Engine`: its three graphs behind `encode`, `embed`, `decode` and `reset`.

A prompt is one decoder call up to `max_call_tokens` (default 512; a decoder that returns full-vocabulary
logits for every position needs 1 GB per 1024 tokens of a 248k vocabulary), longer prompts are split into
calls of that size, state carried; only the rows a caller scores are kept.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Sequence

import numpy as np

from convert.errors import ConvertError

from .base import Chunk, Prefill, Runtime, Video

MAX_CALL_TOKENS = 512


class Engine(ABC):
    """One runtime's graphs. Arrays are numpy; the decoder's state lives in the engine."""

    @abstractmethod
    def encode(self, pixels: np.ndarray, mode: str) -> np.ndarray:
        """float32 [1, 3, 14h, 14w] -> float32 [n_tokens, n_embd] with the `mode` vision encoder."""

    @abstractmethod
    def embed(self, ids: np.ndarray) -> np.ndarray:
        """int64 [1, T] -> float32 [1, T, n_embd]."""

    @abstractmethod
    def decode(self, embeds: np.ndarray, start: int, last_only: bool = False) -> np.ndarray:
        """Run [1, T, n_embd] at positions start..start+T-1 on the current state (which must hold exactly
        `start` positions); float32 logits [T, n_vocab] (last_only: at least the last row, which an engine
        may compute alone). The state then holds start+T positions."""

    @abstractmethod
    def reset(self) -> None:
        """Drop the state: the next decode starts a conversation."""

    def system_info(self) -> dict:
        """What the engine's library reports about itself (for reports)."""
        return {}

    modes: tuple[str, ...] = ("16x",)  # vision encoders present
    full_logits = True  # decode returns every position's logits unless last_only (else the last row only)

    def close(self) -> None:
        pass


def processor_layout(proc, media, mode: str, image_token_id: int, video_token_id: int | None = None) -> list[Chunk]:
    """transformers' processor's expansion of one image (`<image_id>`, `<image>`, slices, ...) or video
    (every frame so): text chunks around one media chunk per overview/slice."""
    if isinstance(media, Video):
        enc = proc(text=[proc.video_token], videos=[list(media.frames)], downsample_mode=mode, do_sample_frames=False,
                   return_tensors="pt")
        image_token_id = video_token_id
    else:
        enc = proc(text=[proc.image_token], images=[[media]], downsample_mode=mode, return_tensors="pt")
    ids = [int(t) for t in enc["input_ids"][0]]
    chunks: list[Chunk] = []
    run: list[int] = []
    for t in ids + [-1]:
        is_pad = t == image_token_id
        if run and (is_pad != (run[0] == image_token_id) or t == -1):
            if run[0] == image_token_id:
                chunks.append(Chunk("image", len(run), len(run)))
            else:
                chunks.append(Chunk("text", len(run), len(run), tuple(run)))
            run = []
        if t != -1:
            run.append(t)
    return chunks


def unpack(pixel_values, target_sizes, patch: int = 14) -> list:
    """The processor's packed pixels of one image ([1, 3, p, p*sum(h*w)]: every chunk's patches left to
    right, row-major over its grid, chunk after chunk) as one [1, 3, p*h, p*w] image per chunk (the
    export modules' input)."""
    packed = pixel_values.reshape(pixel_values.shape[-3], patch, -1)
    c = packed.shape[0]
    out, start = [], 0
    for h, w in (tuple(int(v) for v in hw) for hw in target_sizes):
        x = packed[:, :, start * patch:(start + h * w) * patch].reshape(c, patch, h, w, patch)
        out.append(x.permute(0, 2, 1, 3, 4).reshape(1, c, h * patch, w * patch))
        start += h * w
    return out


def media_chunks(proc, media, mode: str) -> list:
    """The pixels of every chunk the processor makes of an image or a video, each [1, 3, 14h, 14w]
    (video frames one after another, each frame's chunks as an image's)."""
    if isinstance(media, Video):
        inp = proc.video_processor(videos=[list(media.frames)], downsample_mode=mode, do_sample_frames=False,
                                   return_tensors="pt")
        sizes = inp["target_sizes_videos"].tolist()
        return [c for frame in inp["pixel_values_videos"] for c in unpack(frame[None], sizes)]
    inp = proc.image_processor([media], downsample_mode=mode, return_tensors="pt")
    return unpack(inp["pixel_values"], inp["target_sizes"].tolist())


class PipelineRuntime(Runtime):
    """A `Runtime` over an `Engine` and the model folder's own tokenizer, processor and config."""

    capabilities = frozenset({"text", "image", "video"})

    def __init__(self, folder: str | Path, engine: Engine, *, mode: str = "16x",
                 max_call_tokens: int = MAX_CALL_TOKENS):
        import json

        from transformers import AutoProcessor, AutoTokenizer

        self.folder = Path(folder)
        self.engine = engine
        self.mode = mode
        self.max_call_tokens = max_call_tokens
        try:
            self.config = json.loads((self.folder / "config.json").read_text(encoding="utf-8"))
            self.tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
            self.processor = AutoProcessor.from_pretrained(self.folder, local_files_only=True)
        except Exception as e:  # a folder without its tokenizer / processor files
            raise ConvertError(f"{self.folder}: cannot load the tokenizer and processor "
                               f"({e.__class__.__name__}: {str(e)[:160]})") from None
        self.n_vocab = int(self.config["text_config"]["vocab_size"])
        self.image_token_id = int(self.config["image_token_id"])
        self.video_token_id = self.config.get("video_token_id")
        self._n_past = 0
        self._last: np.ndarray | None = None
        self.n_decoder_calls = 0  # decoder calls since load (tests check that a prompt is one call)
        self.last_timings: dict[str, float] = {}

    def system_info(self) -> dict:
        return self.engine.system_info()

    # -- text -------------------------------------------------------------------------------------

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=not special))

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    # -- state ------------------------------------------------------------------------------------

    @property
    def n_past(self) -> int:
        return self._n_past

    def reset(self) -> None:
        self.engine.reset()
        self._n_past = 0
        self._last = None

    def _decode(self, embeds: np.ndarray, need: np.ndarray | None = None) -> np.ndarray:
        """[1, N, n_embd] on top of the state; the logits of the rows in `need` (default all), [n, n_vocab].
        Calls hold at most max_call_tokens. An engine that returns only the last position's logits
        (`full_logits = False`, ExecuTorch's decoder) gets calls that each end at a needed row, so rows
        nobody scores (image features) ride along in the call before the next text token."""
        N = embeds.shape[1]
        need = np.ones(N, bool) if need is None else np.asarray(need, bool)
        stops = [] if self.engine.full_logits else (np.flatnonzero(need) + 1).tolist()
        bounds, s = [], 0
        for e in stops + [N]:
            while e - s > self.max_call_tokens:
                bounds.append((s, s + self.max_call_tokens))
                s += self.max_call_tokens
            if e > s:
                bounds.append((s, e))
                s = e
        out = []
        for s, e in bounds:
            part = np.ascontiguousarray(embeds[:, s:e], dtype=np.float32)
            wanted = need[s:e]
            only_last = not wanted[:-1].any()
            res = self.engine.decode(part, self._n_past, only_last)
            self.n_decoder_calls += 1
            self._n_past += e - s
            if wanted[-1] and only_last:
                out.append(res[-1:])
            elif wanted.any():
                out.append(res[wanted])
        logits = np.concatenate(out) if out else np.empty((0, self.n_vocab), np.float32)
        if N and need[-1]:
            self._last = logits[-1]
        return logits

    def _embed_ids(self, ids: Sequence[int]) -> np.ndarray:
        return self.engine.embed(np.asarray([list(ids)], dtype=np.int64))

    def logits(self, tokens: list[int]) -> np.ndarray:
        self.reset()
        return self._decode(self._embed_ids(tokens))

    def extend(self, tokens: Sequence[int]) -> np.ndarray:
        if not len(tokens):
            return np.empty((0, self.n_vocab), dtype=np.float32)
        return self._decode(self._embed_ids(tokens))

    def greedy(self, tokens: list[int], n: int, *, fresh: bool = True) -> list[int]:
        return self.greedy_by_extend(tokens, n, fresh=fresh)

    def extend_last(self, tokens) -> np.ndarray:
        """Like `extend`, for generation: the logits of the last token only (an engine that can skips
        the LM head on every other position)."""
        need = np.zeros(len(tokens), bool)
        need[-1] = True
        return self._decode(self._embed_ids(tokens), need)

    # -- images -----------------------------------------------------------------------------------

    def image_layout(self, image) -> list[Chunk]:
        return processor_layout(self.processor, image, self.mode, self.image_token_id, self.video_token_id)

    def image_embeddings(self, image) -> list[np.ndarray]:
        """Features per chunk: an image's overview and slices, or every frame's of a `Video`."""
        if self.mode not in self.engine.modes:
            raise ConvertError(f"{self.folder}: no {self.mode} vision encoder (this export has "
                               f"{', '.join(self.engine.modes) or 'none'})")
        return [self.engine.encode(c.numpy().astype(np.float32), self.mode)
                for c in media_chunks(self.processor, image, self.mode)]

    def prefill(self, parts, *, fresh: bool = True) -> Prefill:
        if fresh:
            self.reset()
        segs: list[np.ndarray] = []
        chunks: list[Chunk] = []
        is_text: list[np.ndarray] = []
        for part in parts:
            if isinstance(part, (list, tuple, np.ndarray)):
                ids = [int(t) for t in part]
                if ids:
                    segs.append(self._embed_ids(ids)[0])
                    chunks.append(Chunk("text", len(ids), len(ids), tuple(ids)))
                    is_text.append(np.ones(len(ids), bool))
                continue
            feats = iter(self.image_embeddings(part))
            for c in self.image_layout(part):
                if c.kind == "text":
                    segs.append(self._embed_ids(c.tokens)[0])
                else:
                    segs.append(next(feats))
                chunks.append(c)
                is_text.append(np.full(c.n_tokens, c.kind == "text"))
        start = self._n_past
        mask = np.concatenate(is_text) if is_text else np.zeros(0, bool)
        logits = self._decode(np.concatenate(segs)[None], mask) if segs else np.empty((0, self.n_vocab), np.float32)
        toks = [t for c in chunks if c.kind == "text" for t in c.tokens]
        pos = np.arange(start, self._n_past)[mask]
        return Prefill(chunks, toks, pos.astype(np.int64), logits, self._n_past)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        self.engine = None
