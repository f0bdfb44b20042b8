"""Interrupting the CLIs (issue 11): SIGINT or SIGTERM during an export, a quantization or a
validation removes the temporary files the command created, leaves earlier outputs in the folder
byte for byte, kills the runtime child process, and exits 130 / 143 with one line on stderr.

Each test runs the real CLI in a subprocess and sends the signal once a temporary file exists in
the output folder. On the tiny model the writers are fast (the decoder of a Q4_K_M export is
written in about 0.3 s), too short a window to hit reliably on a loaded machine, so the runner
slows one function per call (a sleep before it, the function itself unchanged); everything else
is `python -m convert|quantize|validate` as users run it.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# python -c RUNNER MODULE:ATTR[.ATTR] SECONDS CLI ARGS...: sleep SECONDS before each call of the
# function, then run `python -m CLI ARGS...`
RUNNER = """
import functools, importlib, runpy, sys, time
target, delay, cli = sys.argv[1], float(sys.argv[2]), sys.argv[3]
mod, _, path = target.partition(":")
owner = importlib.import_module(mod)
*owners, name = path.split(".")
for o in owners:
    owner = getattr(owner, o)
real = getattr(owner, name)

@functools.wraps(real)
def slow(*a, **k):
    time.sleep(delay)
    return real(*a, **k)

setattr(owner, name, slow)
sys.argv = [cli, *sys.argv[4:]]
runpy.run_module(cli, run_name="__main__", alter_sys=True)
"""
TEMP = (".partial", ".tmp")


def _env(tmp: Path) -> dict:
    tmp.mkdir(exist_ok=True)
    return dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(tmp), PYTHONPATH=str(ROOT))


def _start(slow: str, delay: float, cli: str, args: list[str], tmp: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RUNNER, slow, str(delay), cli, *args], cwd=ROOT, env=_env(tmp),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(cond, proc: subprocess.Popen, what: str, limit: float = 120.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        found = cond()
        if found:
            return found
        if proc.poll() is not None:
            pytest.fail(f"the command ended (exit {proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.005)
    proc.kill()
    pytest.fail(f"no {what} after {limit} s")


def _temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if any(t in p.name for t in TEMP)]


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _interrupt(proc: subprocess.Popen, sig: int) -> str:
    os.kill(proc.pid, sig)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"still running 60 s after {sig.name}")
    lines = err.strip().splitlines()
    assert proc.returncode == 128 + sig, (proc.returncode, err[-3000:])
    assert "Traceback" not in err and lines == [f"error: interrupted ({sig.name})"], err[-3000:]
    return err


@pytest.fixture
def earlier_export(tmp_path, tiny_gguf) -> Path:
    """A folder holding an earlier F16 export (decoder, two projectors, manifest.json)."""
    import shutil

    dec, _ = tiny_gguf("f16")
    return Path(shutil.copytree(dec.parent, tmp_path / "out"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_export_interrupted(tmp_path, tiny_dir, earlier_export, sig):
    out = earlier_export
    before = _hashes(out)
    proc = _start("convert.gguf.writer:source_chunks", 0.05, "convert",
                  ["gguf", "--model", str(tiny_dir), "--quant", "Q4_K_M", "--out", str(out), "--no-validate", "--quiet"],
                  tmp_path / "tmp")
    partial = _wait_for(lambda: _temp_files(out), proc, "temporary file in the output folder")
    assert any(p.name.endswith(".partial") for p in partial)
    _interrupt(proc, sig)
    assert not _temp_files(out) and _hashes(out) == before  # nothing added, nothing changed
    assert not list((tmp_path / "tmp").iterdir())


def test_quantize_interrupted_while_writing(tmp_path, tiny_dir):
    """SIGTERM while the GPTQ checkpoint is written (into a temporary folder beside --out): the
    temporary folder goes, the folder --force would have replaced stays as it was."""
    out = tmp_path / "q"
    out.mkdir()
    (out / "earlier.txt").write_text("an earlier output\n")
    before = _hashes(tmp_path)
    proc = _start("convert.checkpoint:Checkpoint.copy_bytes", 0.05, "quantize",
                  ["gptq", "--model", str(tiny_dir), "--out", str(out), "--calib", "text", "--calib-samples", "4",
                   "--seqlen", "160", "--group-size", "32", "--force", "--no-validate", "--quiet"], tmp_path / "tmp")
    _wait_for(lambda: [p for p in tmp_path.glob(".q.partial/*.safetensors")], proc, "temporary checkpoint folder")
    _interrupt(proc, signal.SIGTERM)
    assert not _temp_files(tmp_path) and not list(tmp_path.glob(".q.*"))
    assert {k: v for k, v in _hashes(tmp_path).items() if not k.startswith("tmp/")} == before
    assert not list((tmp_path / "tmp").iterdir())


def test_imatrix_interrupted_while_writing(tmp_path, tiny_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "imatrix.gguf").write_bytes(b"an earlier imatrix\n")
    before = _hashes(out)
    proc = _start("gguf:GGUFWriter.write_kv_data_to_file", 30.0, "quantize",
                  ["imatrix", "--model", str(tiny_dir), "--out", str(out / "imatrix.gguf"), "--calib", "text",
                   "--samples", "1", "--seqlen", "128", "--quiet"], tmp_path / "tmp")
    _wait_for(lambda: _temp_files(out), proc, "temporary imatrix file")
    _interrupt(proc, signal.SIGINT)
    assert not _temp_files(out) and _hashes(out) == before


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (from /proc: psutil is not a dependency)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads child processes from /proc")
def test_validate_interrupted_kills_the_runtime(tmp_path, tiny_dir, earlier_export):
    """SIGTERM while the llama.cpp runtime runs in its child process: the child is gone, the
    harness's scratch folder too, and the folder's files (an earlier report among them) unchanged."""
    pytest.importorskip("llama_cpp")
    arts = earlier_export
    (arts / "validation.json").write_text('{"earlier": "report"}\n')
    before = _hashes(arts)
    proc = subprocess.Popen([sys.executable, "-m", "validate", str(arts), "--model", str(tiny_dir), "--scenarios", "quick",
                             "--no-speed-anchor", "--quiet"], cwd=ROOT, env=_env(tmp_path / "tmp"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def worker():
        for c in _children(proc.pid):
            try:
                if b"validate.worker" in Path(f"/proc/{c}/cmdline").read_bytes():
                    return c
            except OSError:
                pass
        return None

    child = _wait_for(worker, proc, "runtime child process", limit=300)
    time.sleep(1.0)  # into the runtime's work, not its start-up
    _interrupt(proc, signal.SIGTERM)
    assert not _alive(child), f"runtime process {child} survived"
    assert _hashes(arts) == before and not _temp_files(arts)
    assert not list((tmp_path / "tmp").iterdir())  # the harness's scratch folder is gone
