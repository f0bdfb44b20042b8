"""The interface every inference runtime implements, and the registry of runtimes.

A runtime wraps one exported artifact (GGUF, ONNX, .pte, .mlpackage, or the transformers
reference) behind the same few calls, so the validators can compare any two of them:

    with load_runtime("llama.cpp", decoder_path, mmproj_path) as rt:
        ids = rt.tokenize("<|im_start|>user\\nhi<|im_end|>")
        rows = rt.logits(ids)                 # [len(ids), n_vocab] float32

Adding a runtime is one new module with a `Runtime` subclass plus one line in `RUNTIMES`.
Runtime modules are imported only when asked for, so a missing optional dependency (llama-cpp-python,
onnxruntime, ...) only matters to the runtime that needs it.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from convert.errors import ConvertError

if TYPE_CHECKING:
    from types import TracebackType

    from PIL.Image import Image

__all__ = ["Runtime", "RuntimeUnavailableError", "RUNTIMES", "runtime_class", "load_runtime"]


class RuntimeUnavailableError(ConvertError):
    """A runtime's optional dependency is missing or the wrong version (one-line message)."""


class Runtime(ABC):
    """One loaded model. Token ids are plain ints; every call starts from a clean model state
    unless its docstring says otherwise. Not thread-safe."""

    name: ClassVar[str]

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

    def image_embeddings(self, image: Image) -> list[np.ndarray]:
        """The projector's output for one image: one float32 [n_tokens, n_embd] array per slice,
        overview first, then the slices row by row."""
        raise NotImplementedError(f"the {self.name} runtime has no vision support")

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
