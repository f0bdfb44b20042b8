"""An exported-graph engine (runtimes/pipeline.py's `Engine`) running in the phone's guest.

The app-side pipeline (tokenizer, transformers' processor, splicing, the call schedule) stays in
this process, as an app keeps it in its own code; only the engine, the part the phone's runtime
library executes (ONNX Runtime's sessions), runs as aarch64 code under qemu, in
`python -m runtimes.phone.engine_server`. Arrays cross as .npy files in a scratch folder both
sides see (qemu's -L prefix falls back to the host's paths).

A guest that dies of a signal (an illegal instruction, a segfault) takes this process down with
the same signal, so the harness reports the artifact as crashed, as it does for llama.cpp.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from convert.errors import ConvertError

from ..pipeline import Engine


class RemoteEngine(Engine):
    def __init__(self, phone: str, target: str, kwargs: dict):
        from .build import ensure
        from .profiles import get_profile

        setup = ensure(get_profile(phone), quiet=True)
        self._dir = Path(tempfile.mkdtemp(prefix="minicpmv-phone-engine-"))
        self._n = 0
        self._stderr = tempfile.TemporaryFile()
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, **setup.env(root))
        self.proc = subprocess.Popen(setup.command(["python", "-m", "runtimes.phone.engine_server", target]),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, env=env,
                                     cwd=root, text=True)
        ans = self._call({"kwargs": kwargs})
        self.modes = tuple(ans["modes"])
        self.full_logits = bool(ans["full_logits"])
        self.platform = ans["platform"]
        for k, v in ans.get("attrs", {}).items():
            setattr(self, k, v)

    def _file(self, arr: np.ndarray) -> str:
        self._n += 1
        f = self._dir / f"in-{self._n}.npy"
        np.save(f, arr)
        return str(f)

    def _call(self, msg: dict) -> dict:
        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            rc = self.proc.wait()
            if rc < 0:  # the guest's crash is this runtime's crash: the harness names the signal
                os.kill(os.getpid(), -rc)
            self._stderr.seek(0)
            tail = [ln for ln in self._stderr.read().decode("utf-8", "replace").splitlines() if ln.strip()][-1:]
            raise ConvertError(f"the phone's engine process exited with code {rc}{': ' + tail[0][:200] if tail else ''}")
        ans = json.loads(line)
        if not ans.get("ok"):
            raise ConvertError(f"on the phone: {ans.get('error')}")
        return ans

    def _array(self, ans: dict) -> np.ndarray:
        f = ans["out"]
        a = np.load(f)
        os.unlink(f)
        return a

    def encode(self, pixels: np.ndarray, mode: str) -> np.ndarray:
        return self._array(self._call({"op": "encode", "pixels": self._file(pixels), "mode": mode}))

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return self._array(self._call({"op": "embed", "ids": self._file(ids)}))

    def decode(self, embeds: np.ndarray, start: int, last_only: bool = False) -> np.ndarray:
        return self._array(self._call({"op": "decode", "embeds": self._file(embeds), "start": int(start),
                                       "last_only": bool(last_only)}))

    def reset(self) -> None:
        self._call({"op": "reset"})

    def system_info(self) -> dict:
        return dict(self.platform)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait()
        self._stderr.close()
        shutil.rmtree(self._dir, ignore_errors=True)
