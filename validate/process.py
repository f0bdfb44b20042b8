"""The harness's side of validate/worker.py: start a runtime in a child process, ask it things
with a deadline, and turn a crash or a hang into a `RuntimeFailure` with a one-line reason."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from runtimes.base import RUNTIMES

ROOT = Path(__file__).resolve().parents[1]


class RuntimeFailure(Exception):
    """The runtime process crashed, hung past its deadline, or could not load the artifact."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status  # "crashed" | "timeout" | "error"


def _signal_name(rc: int) -> str:
    try:
        return signal.Signals(-rc).name
    except ValueError:
        return f"signal {-rc}"


class RuntimeProcess:
    """A runtime (registered name or "module:Class") loaded with `kwargs` in a child process.
    `deadline` is an absolute time.monotonic() after which any request fails as a timeout."""

    def __init__(self, runtime: str, kwargs: dict, *, deadline: float, env: dict | None = None, phone=None):
        """`phone`: a runtimes.phone.build.PhoneSetup: the worker runs in aarch64 Python under qemu."""
        target = RUNTIMES.get(runtime, runtime)
        self.peak_rss_mb = 0.0
        self.deadline = deadline
        r_req, w_req = os.pipe()
        r_ans, w_ans = os.pipe()
        self._stderr = tempfile.TemporaryFile()
        penv = dict(os.environ, **(env or {}))
        penv["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), penv.get("PYTHONPATH", "")) if p)
        penv.setdefault("GGML_NO_BACKTRACE", "1")  # a native abort prints no gdb backtrace
        argv = [sys.executable, "-m", "validate.worker", target, str(r_req), str(w_ans)]
        if phone is not None:
            penv.update(phone.env(penv["PYTHONPATH"]))
            argv = phone.command(["python", *argv[1:]])
        self.proc = subprocess.Popen(argv,
                                     pass_fds=(r_req, w_ans), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=self._stderr, env=penv, cwd=str(ROOT),
                                     # its own process group: kill() takes any children it started,
                                     # and a terminal's Ctrl-C reaches the harness only, which kills it
                                     start_new_session=True)
        os.close(r_req)
        os.close(w_ans)
        self._w = os.fdopen(w_req, "w", encoding="utf-8")
        self._r = os.fdopen(r_ans, "r", encoding="utf-8")
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._r, selectors.EVENT_READ)
        try:
            self._send(kwargs)
            self.info = self._answer("load")
        except BaseException as e:  # no `with` block owns the process yet
            self.__exit__(type(e), e, e.__traceback__)
            raise

    def _send(self, msg: dict) -> None:
        try:
            self._w.write(json.dumps(msg) + "\n")
            self._w.flush()
        except (BrokenPipeError, OSError):
            self._answer("send")  # reports the crash

    def _tail(self) -> str:
        self._stderr.seek(0)
        lines = [ln.strip() for ln in self._stderr.read().decode("utf-8", "replace").splitlines() if ln.strip()]
        return f" (last output: {lines[-1][:200]})" if lines else ""

    def _answer(self, op: str) -> dict:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0 or not self._sel.select(timeout=remaining):
            self.kill()
            raise RuntimeFailure("timeout", f"the runtime did not answer '{op}' within the time limit")
        line = self._r.readline()
        if not line:
            rc = self.proc.wait(timeout=30)
            how = f"killed by {_signal_name(rc)}" if rc < 0 else f"exited with code {rc}"
            raise RuntimeFailure("crashed", f"the runtime process {how} during '{op}'{self._tail()}")
        ans = json.loads(line)
        self.peak_rss_mb = max(self.peak_rss_mb, float(ans.get("peak_rss_mb", 0.0)))
        if not ans.get("ok"):
            raise RuntimeFailure("error", f"{op}: {ans.get('error')}")
        return ans

    def request(self, op: str, **fields) -> dict:
        self._send({"op": op, **fields})
        return self._answer(op)

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                try:
                    self._w.write(json.dumps({"op": "exit"}) + "\n")
                    self._w.flush()
                    self.proc.wait(timeout=30)
                except (OSError, subprocess.TimeoutExpired):
                    self.kill()
                except BaseException:  # interrupted while waiting for it
                    self.kill()
                    raise
        finally:
            for f in (self._w, self._r):
                try:
                    f.close()
                except OSError:
                    pass
            self._sel.close()
            self._stderr.close()

    def __enter__(self) -> "RuntimeProcess":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not issubclass(exc_type, Exception):
            self.kill()  # interrupted (KeyboardInterrupt, SIGTERM): no polite exit, no 30 s wait
        self.close()
