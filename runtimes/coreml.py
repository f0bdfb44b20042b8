"""Core ML: a folder written by `python -m convert coreml`, run through the shared app-side pipeline.

Two engines share one call schedule (what an iOS app does with the decoder package): a prompt of T
tokens is `prefill` calls of the package's static prefill length, then `decode` calls of one token, the
conversation held in the package's states; each call returns the last position's logits, so the
pipeline ends a call at every row it scores (`full_logits = False`).

* `coreml` (macOS only): Core ML itself, `MLModel.predict` with one state object shared by the
  package's decode and prefill functions. Untested here (no Apple system): see the README.
* `coreml-proxy` (anywhere; validate/coreml_proxy.py, beside the harness since it runs the export
  modules): the package's own weights in PyTorch, not Core ML.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from convert.errors import ConvertError

from .base import RuntimeUnavailableError
from .pipeline import Engine, PipelineRuntime

NEEDS_MACOS = ("Core ML runs only on Apple systems (coremltools' predict() needs the Core ML framework of macOS); "
               "on this machine --runtime coreml-proxy runs the package's own weights in PyTorch instead")


def coreml_folder(folder: Path) -> dict:
    """The manifest's coreml section and the package path of each part."""
    try:
        man = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        man = None
    info = ((man.get("source") or {}).get("coreml")) if isinstance(man, dict) else None
    if not isinstance(info, dict):
        raise ConvertError(f"{folder}: no manifest.json of a Core ML export (write one with `python -m convert coreml`)")
    packages = {a["part"]: folder / a["file"] for a in man.get("artifacts", []) if a.get("kind") == "mlpackage"}
    for part, p in packages.items():
        if not (p / "Manifest.json").is_file():
            raise ConvertError(f"{folder}: the {part} package {p.name} is missing or incomplete")
    return {"info": info, "packages": packages, "manifest": man}


class CoremlEngine(Engine):
    """The call schedule over a decoder with a static prefill length; subclasses run one call."""

    full_logits = False

    def __init__(self, info: dict, modes: tuple[str, ...]):
        dec = info["decoder"]
        self.prefill_len = int(dec["prefill_len"])
        self.max_context = int(dec["max_context"])
        self.modes = modes
        self._past = 0

    def _call(self, function: str, embeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One call of the package's `decode` (T = 1) or `prefill` (T = prefill_len): logits [V]."""
        raise NotImplementedError

    def reset(self) -> None:
        self._past = 0  # a call at position 0 clears the Gated DeltaNet states; K/V rows past it are masked

    def decode(self, embeds: np.ndarray, start: int, last_only: bool = False) -> np.ndarray:
        if start != self._past:
            raise ValueError(f"decode at position {start}, but the state holds {self._past}")
        T = embeds.shape[1]
        if start + T > self.max_context:
            raise ConvertError(f"the conversation reached {start + T} positions; this package holds {self.max_context} "
                               f"(export with a larger --max-context)")
        i, out = 0, None
        while i < T:
            n = self.prefill_len if T - i >= self.prefill_len else 1
            pos = np.arange(start + i, start + i + n, dtype=np.int32)
            out = self._call("prefill" if n > 1 else "decode", np.ascontiguousarray(embeds[:, i:i + n], np.float32), pos)
            i += n
        self._past = start + T
        return np.asarray(out, np.float32).reshape(1, -1)


class CoremlMacEngine(CoremlEngine):
    """Core ML's own predict(): every compute unit allowed (CPU, GPU, Neural Engine), as an app loads it."""

    def __init__(self, folder: Path, info: dict, packages: dict):
        if sys.platform != "darwin":
            raise RuntimeUnavailableError(NEEDS_MACOS)
        try:
            import coremltools as ct
        except ImportError:
            raise RuntimeUnavailableError("the coreml runtime needs coremltools (pip install -e '.[coreml]')") from None
        modes = (info["vision"]["mode"],) if "vision" in packages else ()
        super().__init__(info, modes)
        dec = str(packages["decoder"])
        units = ct.ComputeUnit.ALL
        self.fns = {f: ct.models.MLModel(dec, function_name=f, compute_units=units) for f in ("decode", "prefill", "embed")}
        self.vision = ct.models.MLModel(str(packages["vision"]), compute_units=units) if modes else None
        self.state = self.fns["decode"].make_state()  # the functions share the states (same names, shapes)

    def reset(self) -> None:
        super().reset()
        self.state = self.fns["decode"].make_state()

    def _call(self, function, embeds, positions):
        out = self.fns[function].predict({"inputs_embeds": embeds, "cache_position": positions}, state=self.state)
        return out["logits"]

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return np.asarray(self.fns["embed"].predict({"input_ids": ids.astype(np.int32)})["inputs_embeds"], np.float32)

    def encode(self, pixels: np.ndarray, mode: str) -> np.ndarray:
        out = self.vision.predict({"pixel_values": np.ascontiguousarray(pixels, np.float32)})["image_features"]
        return np.asarray(out, np.float32).reshape(-1, np.asarray(out).shape[-1])


class CoremlRuntime(PipelineRuntime):
    name = "coreml"

    def __init__(self, folder: str | Path, *, mode: str = "16x", n_threads: int | None = None, **options):
        folder = Path(folder)
        found = coreml_folder(folder)
        engine = self.make_engine(folder, found, n_threads=n_threads, **options)
        super().__init__(folder, engine, mode=mode, max_call_tokens=engine.max_context)
        self.manifest = found["manifest"]

    def make_engine(self, folder: Path, found: dict, **options) -> CoremlEngine:
        return CoremlMacEngine(folder, found["info"], found["packages"])
