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


class _Methods(Engine):
    """The pipeline's engine over a `.pte`'s methods, whatever runs them: `_run(method, arrays)` and
    `_constant(method)` are the runtime's; the chunking, positions and checks are here, once."""

    full_logits = False

    def _setup(self, modes: list[str]) -> None:
        self.max_seq_len = int(self._constant("get_max_seq_len"))
        self.max_context = int(self._constant("get_max_context_len"))
        # with two encoders, `vision_encoder` is the 16x one (the runner's method) and 4x has its suffix
        self.vision_methods = {m: "vision_encoder" + ("_4x" if m == "4x" and len(modes) == 2 else "") for m in modes}
        self.modes = tuple(modes)
        self._past = 0

    def _run(self, method: str, arrays: list[np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def _constant(self, method: str) -> int:
        raise NotImplementedError

    def reset(self) -> None:
        self._past = 0  # the next call starts at position 0, which resets the program's state

    def encode(self, pixels: np.ndarray, mode: str) -> np.ndarray:
        out = self._run(self.vision_methods[mode], [np.ascontiguousarray(pixels, np.float32)])
        return out[0][0].astype(np.float32)

    def embed(self, ids: np.ndarray) -> np.ndarray:
        rows = [self._run("token_embedding", [np.ascontiguousarray(ids[:, i:i + self.max_seq_len], np.int64)])[0]
                for i in range(0, ids.shape[1], self.max_seq_len)]
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
        out = self._run("text_decoder", [np.ascontiguousarray(embeds, np.float32), np.arange(start, start + T,
                                                                                              dtype=np.int64)])
        self._past = start + T
        return out[0].reshape(1, -1).astype(np.float32)


class EtEngine(_Methods):
    """ExecuTorch's Python runtime (pybindings) with the wheel's kernels and `llama::` ops."""

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
            self._setup(modes)
        except Exception as e:  # a corrupt or truncated .pte
            raise ConvertError(f"{pte.name}: ExecuTorch cannot load it ({e.__class__.__name__}: "
                               f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None

    def _constant(self, name: str):
        out = self.program.load_method(name).execute([])
        return out[0]

    def _run(self, method: str, arrays: list[np.ndarray]) -> list[np.ndarray]:
        if method not in self._methods:
            self._methods[method] = self.program.load_method(method)
        out = self._methods[method].execute([self.torch.from_numpy(a) for a in arrays])
        return [o.numpy() for o in out]

    def close(self) -> None:
        self._methods = {}
        self.program = None


class GuestEtEngine(_Methods):
    """The `.pte` in ExecuTorch's C++ runtime from the aarch64 wheel (its kernels and XNNPACK), through
    this project's small runner library (runtimes/phone/et/: the C interface and the `llama::` ops,
    which the wheel ships only in a libtorch-bound library). Runs in the phone's guest, torch-free;
    $MINICPMV_ET_LIB names the library (runtimes/phone/build.py)."""

    DTYPES = {np.dtype(np.float32): 6, np.dtype(np.int64): 4}  # ExecuTorch ScalarType codes
    NUMPY = {6: np.float32, 4: np.int64, 3: np.int32, 11: np.bool_}

    def __init__(self, pte: str, modes: list[str], n_threads: int | None = None, lib: str | None = None):
        import ctypes as C

        path = lib or os.environ.get("MINICPMV_ET_LIB")
        if not path:
            raise RuntimeUnavailableError("no ExecuTorch runner library (MINICPMV_ET_LIB): python -m runtimes.phone setup")
        self.C = C
        self.lib = L = C.CDLL(path)
        vp, i64p, ip = C.c_void_p, C.POINTER(C.c_int64), C.POINTER(C.c_int)
        L.mcv_et_open.restype, L.mcv_et_open.argtypes = vp, [C.c_char_p, C.c_int, C.c_char_p, C.c_size_t]
        L.mcv_et_int.argtypes = [vp, C.c_char_p, i64p]
        L.mcv_et_run.argtypes = [vp, C.c_char_p, C.c_int, ip, ip, i64p, C.POINTER(vp)]
        L.mcv_et_n_outputs.argtypes = [vp]
        L.mcv_et_output.argtypes = [vp, C.c_int, ip, ip, i64p]
        L.mcv_et_copy_output.argtypes = [vp, C.c_int, vp, C.c_size_t]
        L.mcv_et_last_error.restype, L.mcv_et_last_error.argtypes = C.c_char_p, [vp]
        L.mcv_et_info.restype, L.mcv_et_info.argtypes = C.c_char_p, [vp]
        L.mcv_et_close.argtypes = [vp]
        err = C.create_string_buffer(512)
        self.h = L.mcv_et_open(str(pte).encode(), int(n_threads or 0), err, len(err))
        if not self.h:
            raise ConvertError(f"{Path(pte).name}: ExecuTorch cannot load it ({err.value.decode(errors='replace')})")
        self._setup(list(modes))

    def _fail(self, what: str, rc: int):
        msg = (self.lib.mcv_et_last_error(self.h) or b"").decode(errors="replace")
        raise RuntimeError(f"{what}: ExecuTorch error {rc}{': ' + msg if msg else ''}")

    def _constant(self, method: str) -> int:
        v = self.C.c_int64()
        rc = self.lib.mcv_et_int(self.h, method.encode(), self.C.byref(v))
        if rc:
            self._fail(method, rc)
        return int(v.value)

    def _run(self, method: str, arrays: list[np.ndarray]) -> list[np.ndarray]:
        C = self.C
        arrays = [np.ascontiguousarray(a) for a in arrays]
        n = len(arrays)
        dtypes = (C.c_int * n)(*(self.DTYPES[a.dtype] for a in arrays))
        ndims = (C.c_int * n)(*(a.ndim for a in arrays))
        dims = [d for a in arrays for d in a.shape]
        shapes = (C.c_int64 * max(1, len(dims)))(*dims)
        data = (C.c_void_p * n)(*(a.ctypes.data for a in arrays))
        rc = self.lib.mcv_et_run(self.h, method.encode(), n, dtypes, ndims, shapes, data)
        if rc:
            self._fail(method, rc)
        outs = []
        for i in range(self.lib.mcv_et_n_outputs(self.h)):
            dt, nd, shape = C.c_int(), C.c_int(), (C.c_int64 * 8)()
            if self.lib.mcv_et_output(self.h, i, C.byref(dt), C.byref(nd), shape) != 0:
                continue  # not a tensor
            a = np.empty(tuple(shape[:nd.value]), self.NUMPY[dt.value])
            rc = self.lib.mcv_et_copy_output(self.h, i, a.ctypes.data, a.nbytes)
            if rc:
                self._fail(method, rc)
            outs.append(a)
        return outs

    def system_info(self) -> dict:
        return {"executorch": (self.lib.mcv_et_info(self.h) or b"").decode(errors="replace")}

    def close(self) -> None:
        if getattr(self, "h", None):
            self.lib.mcv_et_close(self.h)
            self.h = None


class ExecutorchRuntime(PipelineRuntime):
    name = "executorch"

    def __init__(self, folder: str | Path, *, mode: str = "16x", n_threads: int | None = None,
                 max_call_tokens: int | None = None, phone: str | None = None, **_ignored):
        """`phone`: a phone profile's name: the program runs in its aarch64 guest (runtimes/phone/remote.py)."""
        folder = Path(folder)
        pte, info = pte_file(folder)
        modes = list(info.get("modes") or ["16x"])
        if phone:
            from .phone.remote import RemoteEngine

            engine = RemoteEngine(phone, "runtimes.executorch:GuestEtEngine",
                                  {"pte": str(pte), "modes": modes, "n_threads": n_threads})
        else:
            engine = EtEngine(pte, modes, n_threads)
        calls = min(max_call_tokens or engine.max_seq_len, engine.max_seq_len)
        super().__init__(folder, engine, mode=mode, max_call_tokens=calls)
        self.manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        self.pte = pte
