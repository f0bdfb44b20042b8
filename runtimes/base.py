"""The interface every inference runtime implements, and the registry of runtimes.

A runtime wraps one exported artifact (GGUF, ONNX, .pte, .mlpackage, or the transformers
reference) behind the same few calls, so the validators can compare any two of them:

    with load_runtime("llama.cpp", decoder_path, mmproj_path) as rt:
        ids = rt.tokenize("<|im_start|>user\\nhi<|im_end|>")
        rows = rt.logits(ids)                 # [len(ids), n_vocab] float32
        res = rt.prefill([ids_before, image, ids_after])   # the runtime lays the image out itself
        more = rt.extend([next_token])        # continues the same memory (KV cache + recurrent state)

What the validation harness needs from a runtime, in order of necessity: `tokenize`, `logits`,
`extend`/`reset` (multi-turn and teacher-forced greedy steps), and for images `image_layout`,
`image_embeddings` and `prefill` with image parts. `capabilities` says which scenario kinds it can
run ("text", "image", "video"); the harness skips the others with the runtime's `unsupported()` reason.

Adding a runtime is one new module with a `Runtime` subclass plus one line in `RUNTIMES`.
Runtime modules are imported only when asked for, so a missing optional dependency (llama-cpp-python,
onnxruntime, ...) only matters to the runtime that needs it.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Sequence, Union

import numpy as np

from convert.errors import ConvertError

if TYPE_CHECKING:
    from types import TracebackType

    from PIL.Image import Image

__all__ = ["Runtime", "RuntimeUnavailableError", "RUNTIMES", "runtime_class", "load_runtime", "Chunk", "Prefill", "Part",
           "Video"]


class RuntimeUnavailableError(ConvertError):
    """A runtime's optional dependency is missing or the wrong version (one-line message)."""


@dataclass(frozen=True)
class Chunk:
    """One piece of a prompt as a runtime lays it out: text tokens, or the embedding rows of one
    image chunk (an overview or a slice)."""

    kind: str  # "text" | "image" | "audio"
    n_tokens: int  # text tokens, or embedding rows the media chunk feeds to the decoder
    n_pos: int  # decoder positions it takes (== n_tokens without M-RoPE)
    tokens: tuple[int, ...] = ()  # text chunks only


@dataclass(frozen=True)
class Prefill:
    """Result of `Runtime.prefill`: the layout and the logits at every text position."""

    chunks: list[Chunk]
    text_tokens: list[int]  # every text token of the prompt, in order
    text_positions: np.ndarray  # int64 [len(text_tokens)]: decoder position of each
    logits: np.ndarray  # float32 [len(text_tokens), n_vocab]: logits at those positions
    n_past: int  # positions used; the next token goes here

    def after_last_media(self) -> tuple[list[int], np.ndarray]:
        """(tokens, logits) of the trailing text chunk, i.e. the text after the last image."""
        if not self.chunks or self.chunks[-1].kind != "text":
            return [], self.logits[:0]
        n = self.chunks[-1].n_tokens
        return self.text_tokens[len(self.text_tokens) - n:], self.logits[len(self.logits) - n:]


@dataclass(frozen=True)
class Video:
    """A video prompt part: its frames (PIL images), laid out and encoded by the runtime the way
    transformers' video processor does (each frame an overview plus slices of video tokens)."""

    frames: tuple


# A prompt part: token ids, or an image or a video the runtime lays out and encodes itself.
Part = Union[Sequence[int], "Image", Video]


class Runtime(ABC):
    """One loaded model. Token ids are plain ints; every call starts from a clean model state
    unless its docstring says otherwise. Not thread-safe."""

    name: ClassVar[str]
    capabilities: ClassVar[frozenset[str]] = frozenset({"text"})
    n_vocab: int
    # wall-clock seconds of the last greedy(): {"prefill_s", "n_prefill", "decode_s", "n_decode"}
    last_timings: dict[str, float]

    def unsupported(self, kind: str) -> str:
        """Why scenarios of `kind` cannot run here (shown as the skip reason)."""
        return f"the {self.name} runtime does not support {kind} input"

    def system_info(self) -> dict:
        """What the runtime itself reports about the CPU features it uses (for reports)."""
        return {}

    @abstractmethod
    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        """Token ids of `text`; never adds BOS/EOS. `special`: parse special-token text
        (`<|im_start|>` etc.) into their ids, as chat prompts are tokenized."""

    @abstractmethod
    def detokenize(self, ids: list[int]) -> str:
        """Text of `ids`, special tokens rendered."""

    @abstractmethod
    def logits(self, tokens: list[int]) -> np.ndarray:
        """float32 [len(tokens), n_vocab]: the next-token logits at every position, from a fresh state."""

    def greedy(self, tokens: list[int], n: int) -> list[int]:
        """The `n` tokens greedy decoding appends to `tokens` (no stop at EOS), from a fresh state.

        This fallback recomputes the whole sequence per step; runtimes with a cache override it."""
        seq = list(tokens)
        out: list[int] = []
        for _ in range(n):
            nxt = int(np.argmax(self.logits(seq)[-1]))
            out.append(nxt)
            seq.append(nxt)
        return out

    def greedy_by_extend(self, tokens: Sequence[int], n: int, *, fresh: bool = True) -> list[int]:
        """`greedy` for a stateful runtime: `reset`, `extend`, and `_last` (the newest logits row).
        fresh=False continues the current memory; afterwards it holds the prompt and the n tokens."""
        import time

        if fresh:
            self.reset()
        if not tokens and getattr(self, "_last", None) is None:
            raise ValueError("greedy needs at least one prompt token")
        step = getattr(self, "extend_last", self.extend)  # generation needs the last row only
        t0 = time.perf_counter()
        last = step(list(tokens))[-1] if tokens else self._last  # type: ignore[attr-defined]
        t1 = time.perf_counter()
        out: list[int] = []
        for _ in range(n):
            out.append(int(np.argmax(last)))
            last = step([out[-1]])[-1]
        self.last_timings = {"prefill_s": t1 - t0, "n_prefill": len(tokens), "decode_s": time.perf_counter() - t1,
                             "n_decode": n}
        return out

    def reset(self) -> None:
        """Clear the model's memory (KV cache and recurrent state)."""
        raise NotImplementedError(f"the {self.name} runtime keeps no state between calls")

    def extend(self, tokens: Sequence[int]) -> np.ndarray:
        """Append `tokens` to the current memory and return their logits [len(tokens), n_vocab]."""
        raise NotImplementedError(f"the {self.name} runtime keeps no state between calls")

    def image_layout(self, image: Image) -> list[Chunk]:
        """How this runtime lays out one image (or a `Video`, where "video" is a capability): wrapper tokens as text chunks, overview and slices
        as image chunks, without encoding anything."""
        raise NotImplementedError(self.unsupported("image"))

    def image_embeddings(self, image: Image) -> list[np.ndarray]:
        """The projector's output for one image: one float32 [n_tokens, n_embd] array per slice,
        overview first, then the slices row by row."""
        raise NotImplementedError(self.unsupported("image"))

    def image_pixels(self, image: Image) -> list[np.ndarray] | None:
        """The pixels this runtime feeds its vision encoder, per image chunk (float32 [3, H, W],
        normalized), when its preprocessing is its own; None when it is transformers' processor.
        The harness runs the reference on these pixels, so a preprocessing difference is reported
        as such and does not hide (or fake) an error in the encoder."""
        return None

    def prefill(self, parts: Sequence[Part], *, fresh: bool = True) -> Prefill:
        """Evaluate a prompt made of token-id parts and images (each image laid out as
        `image_layout` says), with logits at every text position. fresh=False continues the
        current memory; `extend` can follow."""
        raise NotImplementedError(self.unsupported("image"))

    def close(self) -> None:
        """Free native resources; the object is unusable afterwards. Idempotent."""

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: "TracebackType | None") -> None:
        self.close()


# name -> "module:Class", imported on first use.
RUNTIMES: dict[str, str] = {
    "llama.cpp": "runtimes.llamacpp:LlamaCppRuntime",
    "transformers": "runtimes.reference:ReferenceRuntime",
    "transformers-quant": "runtimes.hf_quant:HFQuantRuntime",
    "onnxruntime": "runtimes.onnxruntime:OnnxRuntime",
    "executorch": "runtimes.executorch:ExecutorchRuntime",
    "coreml": "runtimes.coreml:CoremlRuntime",
    "coreml-proxy": "validate.coreml_proxy:CoremlProxyRuntime",
}


def runtime_class(name: str) -> type[Runtime]:
    """The Runtime subclass registered as `name` (imports its module now)."""
    try:
        target = RUNTIMES[name]
    except KeyError:
        raise ConvertError(f"unknown runtime {name!r}; choose one of {', '.join(sorted(RUNTIMES))}") from None
    module, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, Runtime)):
        raise TypeError(f"RUNTIMES[{name!r}] = {target!r} is not a Runtime subclass")
    return cls


def load_runtime(name: str, *args: Any, **kwargs: Any) -> Runtime:
    """Construct the runtime registered as `name` with the given arguments."""
    return runtime_class(name)(*args, **kwargs)
