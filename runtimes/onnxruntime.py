"""ONNX Runtime: an ONNX folder written by `python -m convert onnx`, run the way an app would.

The shared pipeline (runtimes/pipeline.py) does preprocessing, splicing and state bookkeeping; this
module is only the engine: one InferenceSession per graph, and the decoder's state as the arrays it
returns (`present.*` fed back as `past_*`), zero-length K/V and zero Gated DeltaNet states to start.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from convert.errors import ConvertError

from .base import RuntimeUnavailableError
from .pipeline import Engine, PipelineRuntime

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


def onnx_files(folder: Path, ort_format: bool = False) -> dict[str, Path]:
    """Role (vision_16x, vision_4x, embed, decoder) -> file, from the folder's manifest.json; with
    ort_format the `.ort` files `--ort` wrote beside them (what ORT Mobile loads)."""
    try:
        m = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        m = None
    files = ((m.get("source") or {}).get("onnx") or {}).get("files") if isinstance(m, dict) else None
    if not isinstance(files, dict):
        raise ConvertError(f"{folder}: no manifest.json of an ONNX export (write one with `python -m convert onnx`)")
    out = {role: folder / "onnx" / (name[:-5] + ".ort" if ort_format else name) for role, name in files.items()}
    missing = [p.name for p in out.values() if not p.is_file()]
    if missing:
        raise ConvertError(f"{folder}: missing {', '.join(missing)}")
    return out


class OrtEngine(Engine):
    def __init__(self, files: dict[str, Path], n_threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise RuntimeUnavailableError("the onnxruntime runtime needs onnxruntime (pip install -e '.[onnx]')") from None
        self.ort = ort
        so = ort.SessionOptions()
        if n_threads:
            so.intra_op_num_threads = n_threads
            so.inter_op_num_threads = 1
        so.log_severity_level = 3
        self.options = so
        self.files = {k: Path(v) for k, v in files.items()}  # str from a remote engine's JSON
        self.modes = tuple(r.split("_")[1] for r in files if r.startswith("vision_"))
        self._sessions: dict[str, object] = {}
        dec = self._session("decoder")
        self._state_inputs = [i for i in dec.get_inputs() if i.name.startswith("past_")]
        self._outputs = [o.name for o in dec.get_outputs()]
        # an input with a default value (an initializer of the same name) is listed apart by ORT
        self._keep = any(i.name == "num_logits_to_keep" for i in [*dec.get_inputs(), *dec.get_overridable_initializers()])
        self._state: dict[str, np.ndarray] = {}
        self.reset()

    def _session(self, role: str):
        if role not in self._sessions:
            try:
                self._sessions[role] = self.ort.InferenceSession(str(self.files[role]), self.options,
                                                                 providers=["CPUExecutionProvider"])
            except Exception as e:  # a corrupt or truncated .onnx
                raise ConvertError(f"{self.files[role].name}: ONNX Runtime cannot load it "
                                   f"({e.__class__.__name__}: {str(e).splitlines()[0][:200]})") from None
        return self._sessions[role]

    def reset(self) -> None:
        self._state = {}
        for i in self._state_inputs:
            shape = [d if isinstance(d, int) else 0 for d in i.shape]  # the only symbolic axis is the past length
            self._state[i.name] = np.zeros(shape, dtype=_NP[i.type])
        self._past = 0

    def system_info(self) -> dict:
        return {"onnxruntime": f"{self.ort.__version__} ({', '.join(self.ort.get_available_providers())})"}

    def encode(self, pixels: np.ndarray, mode: str) -> np.ndarray:
        return self._session(f"vision_{mode}").run(None, {"pixel_values": pixels.astype(np.float32)})[0].astype(np.float32)

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return self._session("embed").run(None, {"input_ids": ids})[0].astype(np.float32)

    def decode(self, embeds: np.ndarray, start: int, last_only: bool = False) -> np.ndarray:
        if start != self._past:
            raise ValueError(f"decode at position {start}, but the state holds {self._past}")
        T = embeds.shape[1]
        feeds = {"inputs_embeds": embeds, "attention_mask": np.ones((1, start + T), np.int64),
                 "position_ids": np.arange(start, start + T, dtype=np.int64)[None], **self._state}
        if last_only and self._keep:
            feeds["num_logits_to_keep"] = np.array(1, np.int64)
        out = self._session("decoder").run(None, feeds)
        res = dict(zip(self._outputs, out))
        for name in self._state:
            self._state[name] = res[name.replace("past_key_values.", "present.").replace("past_", "present_")]
        self._past = start + T
        return res["logits"][0].astype(np.float32)

    def close(self) -> None:
        self._sessions.clear()
        self._state = {}


class OnnxRuntime(PipelineRuntime):
    name = "onnxruntime"

    def __init__(self, folder: str | Path, *, mode: str = "16x", n_threads: int | None = None,
                 max_call_tokens: int | None = None, ort_format: bool = False, phone: str | None = None, **_ignored):
        """`phone`: a phone profile's name: the sessions run in its aarch64 guest (runtimes/phone/remote.py)."""
        folder = Path(folder)
        files = onnx_files(folder, ort_format)
        if phone:
            from .phone.remote import RemoteEngine

            engine = RemoteEngine(phone, "runtimes.onnxruntime:OrtEngine",
                                  {"files": {k: str(v) for k, v in files.items()}, "n_threads": n_threads})
        else:
            engine = OrtEngine(files, n_threads)
        kw = {"max_call_tokens": max_call_tokens} if max_call_tokens else {}
        super().__init__(folder, engine, mode=mode, **kw)
        self.manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
