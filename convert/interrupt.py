"""How the CLIs end when something goes wrong: interruption by a signal, and bugs.

SIGTERM's default action kills Python without unwinding, so no `finally` or `except
BaseException` cleanup would run and temporary files would stay. While a command runs, SIGINT and
SIGTERM raise `Interrupted` instead (a KeyboardInterrupt, so the writers' cleanup handlers and
the runtime process's kill see it), and the CLI exits 128 + the signal number.

An unexpected exception (a bug) becomes one line on stderr, naming where it was raised; the full
traceback goes to a log file in the temp folder (named on that line), and to stderr under --debug.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import tempfile
import threading
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("convert", "validate", "quantize", "runtimes")
LOG_PREFIX = "minicpmv-edge-error-"


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM received while a command ran."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.name = signal.Signals(signum).name
        self.exit_code = 128 + signum


@contextlib.contextmanager
def signals_as_exceptions():
    """SIGINT and SIGTERM raise `Interrupted` inside the block; handlers restored after it.
    Only the first signal raises: a second one (an impatient Ctrl-C) must not break off the
    cleanup the first one started."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    fired = []

    def handler(signum, frame):
        if fired:
            return
        fired.append(signum)
        raise Interrupted(signum)

    sigs = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.getsignal(s) for s in sigs}
    for s in sigs:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def _module_of(filename: str) -> str | None:
    """`convert.gguf.writer` for a file of this project, None for anyone else's."""
    try:
        rel = Path(filename).resolve().relative_to(ROOT)
    except ValueError:
        return None
    if rel.parts[0] not in PACKAGES:
        return None
    return ".".join(rel.with_suffix("").parts)


def where(exc: BaseException) -> str:
    """The innermost frame of this project in the exception's traceback, as module.function:line
    (the outermost frame if none is ours)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [(m, f) for f in frames if (m := _module_of(f.filename))]
    if ours:
        m, f = ours[-1]
        return f"{m}.{f.name}:{f.lineno}"
    if frames:
        f = frames[-1]
        return f"{Path(f.filename).name}:{f.name}:{f.lineno}"
    return "unknown"


def what(exc: BaseException) -> str:
    """The exception's type (module-qualified unless builtin: `struct.error`) and its first line."""
    t = type(exc)
    name = t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"
    lines = str(exc).strip().splitlines()
    return f"{name}: {lines[0][:200]}" if lines else name


def write_log(exc: BaseException, argv: list[str] | None) -> Path | None:
    """The full traceback in a new file in the temp folder (not next to the outputs: a failed run
    adds nothing to the output folder); None if it cannot be written."""
    try:
        f = tempfile.NamedTemporaryFile("w", prefix=LOG_PREFIX, suffix=".log", delete=False, encoding="utf-8")
        with f:
            f.write(f"command: {' '.join([sys.argv[0], *(sys.argv[1:] if argv is None else argv)])}\n\n")
            f.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        return Path(f.name)
    except OSError:
        return None


def report_bug(exc: BaseException, argv: list[str] | None, debug: bool) -> int:
    """One line on stderr for an unexpected exception (and the traceback under --debug); exit code 1."""
    if debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    log = None if debug else write_log(exc, argv)
    tail = f" (traceback: {log})" if log else "" if debug else " (run with --debug for the traceback)"
    print(f"error: internal error in {where(exc)}: {what(exc)}; please report{tail}", file=sys.stderr)
    return 1
