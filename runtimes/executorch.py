"""ExecuTorch: a `.pte` written by `python -m convert executorch`, run in ExecuTorch's own runtime
(`executorch.runtime`, the pybindings over the C++ runtime with the XNNPACK backend, the quantized
kernels and the `llama::` custom ops linked in).

The shared pipeline (runtimes/pipeline.py) does preprocessing, splicing and bookkeeping; this module is
only the engine: the program's methods, with the conversation state inside the program (mutable
buffers), so `decode` passes only the embeddings and their positions. The decoder returns the last
position's logits (`full_logits = False`): the pipeline ends a call at every row it scores.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np

from convert.errors import ConvertError

from .base import RuntimeUnavailableError
from .pipeline import Engine, PipelineRuntime


def pte_file(folder: Path) -> tuple[Path, dict]:
    """The `.pte` of an ExecuTorch folder and its manifest entry (source.executorch)."""
    try:
        m = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        m = None
    info = ((m.get("source") or {}).get("executorch")) if isinstance(m, dict) else None
    if not isinstance(info, dict) or "file" not in info:
        raise ConvertError(f"{folder}: no manifest.json of an ExecuTorch export (write one with `python -m convert executorch`)")
    path = folder / info["file"]
    if not path.is_file():
        raise ConvertError(f"{folder}: missing {info['file']}")
    return path, info


@contextlib.contextmanager
def quiet_native():
    """ExecuTorch's C++ runtime and kernels log to file descriptor 2 (a failed load's reason, 'No temp
    allocator provided' per eager custom-op call, cpuinfo probes): keep that off the user's stderr, whose
    contract is one `error:` line."""
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def load_kernels() -> None:
    """Register the kernels a `.pte` of this project needs beside the portable ones: the `llama::`
    custom ops (update_cache, custom_sdpa, gated_delta_rule) and the quantized embedding."""
    try:
        import executorch.kernels.quantized  # noqa: F401
        from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
    except ImportError:
        raise RuntimeUnavailableError("the executorch runtime needs executorch (pip install -e '.[executorch]')") from None


class EtEngine(Engine):
    full_logits = False

    def __init__(self, pte: Path, modes: list[str], n_threads: int | None = None):
        import torch

        load_kernels()
        from executorch.runtime import Runtime

        if n_threads:
            from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

            _unsafe_reset_threadpool(int(n_threads))
        self.torch = torch
        try:
            with quiet_native():
                self.program = Runtime.get().load_program(str(pte))
            self._methods = {name: self.program.load_method(name)
                             for name in ("token_embedding", "text_decoder")}
            self.max_seq_len = int(self._constant("get_max_seq_len"))
            self.max_context = int(self._constant("get_max_context_len"))
        except Exception as e:  # a corrupt or truncated .pte
            raise ConvertError(f"{pte.name}: ExecuTorch cannot load it ({e.__class__.__name__}: "
                               f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
        # with two encoders, `vision_encoder` is the 16x one (the runner's method) and 4x has its suffix
        self.vision_methods = {m: "vision_encoder" + ("_4x" if m == "4x" and len(modes) == 2 else "") for m in modes}
        self.modes = tuple(modes)
        self._past = 0

    def _constant(self, name: str):
        out = self.program.load_method(name).execute([])
        return out[0]

    def _method(self, name: str):
        if name not in self._methods:
            self._methods[name] = self.program.load_method(name)
        return self._methods[name]

    def reset(self) -> None:
        self._past = 0  # the next call starts at position 0, which resets the program's state

    def encode(self, pixels: np.ndarray, mode: str) -> np.ndarray:
        out = self._method(self.vision_methods[mode]).execute([self.torch.from_numpy(np.ascontiguousarray(pixels, np.float32))])
        return out[0][0].numpy().astype(np.float32)

    def embed(self, ids: np.ndarray) -> np.ndarray:
        rows = []
        for i in range(0, ids.shape[1], self.max_seq_len):
            part = self.torch.from_numpy(np.ascontiguousarray(ids[:, i:i + self.max_seq_len], np.int64))
            rows.append(self._methods["token_embedding"].execute([part])[0].numpy())
        return np.concatenate(rows, axis=1).astype(np.float32)

    def decode(self, embeds: np.ndarray, start: int, last_only: bool = False) -> np.ndarray:
        if start != self._past:
            raise ValueError(f"decode at position {start}, but the state holds {self._past}")
        T = embeds.shape[1]
        if T > self.max_seq_len:
            raise ValueError(f"{T} tokens in one call; the program takes at most {self.max_seq_len}")
        if start + T > self.max_context:
            raise ConvertError(f"the conversation reached {start + T} positions; this .pte holds {self.max_context} "
                               f"(export with a larger --max-context)")
        pos = self.torch.arange(start, start + T, dtype=self.torch.long)
        out = self._methods["text_decoder"].execute([self.torch.from_numpy(np.ascontiguousarray(embeds, np.float32)), pos])
        self._past = start + T
        return out[0].numpy().reshape(1, -1).astype(np.float32)

    def close(self) -> None:
        self._methods = {}
        self.program = None


class ExecutorchRuntime(PipelineRuntime):
    name = "executorch"

    def __init__(self, folder: str | Path, *, mode: str = "16x", n_threads: int | None = None,
                 max_call_tokens: int | None = None, **_ignored):
        folder = Path(folder)
        pte, info = pte_file(folder)
        engine = EtEngine(pte, list(info.get("modes") or ["16x"]), n_threads)
        calls = min(max_call_tokens or engine.max_seq_len, engine.max_seq_len)
        super().__init__(folder, engine, mode=mode, max_call_tokens=calls)
        self.manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        self.pte = pte
