"""Compile libminicpmv_et.so: runner.cpp (the C ABI over ExecuTorch's Module) and llama_ops.cpp (the
project's llama:: kernels) against the C++ headers and libraries an ExecuTorch wheel ships
(`executorch/include`, `executorch/lib`).

`build_lib` takes the compiler and the wheel's include/lib dirs (host g++ with the x86 wheel of the
venv for the tests, aarch64-linux-gnu-g++ with the aarch64 wheel for the phone profiles).
`build_host_lib` is the x86 case. A build whose sources, command and compiler are unchanged is reused.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = (HERE / "runner.cpp", HERE / "llama_ops.cpp")
LIB_NAME = "libminicpmv_et.so"
# the five runtime libraries: registration-only ones must stay NEEDED (--no-as-needed), or their
# static kernel/backend registrations never run
WHEEL_LIBS = ("executorch_kernels_optimized", "executorch_kernels_quantized", "executorch_backend_xnnpack",
              "executorch_threadpool", "executorch")
# from the wheel's lib/cmake/executorch/executorch-config.cmake
DEFINES = ("-DC10_USING_CUSTOM_GENERATED_MACROS", "-DET_EVENT_TRACER_ENABLED", "-DET_USE_THREADPOOL")


def compile_command(cxx: str, include_dir: Path, lib_dir: Path, out: Path, *, version: str | None = None,
                    extra: tuple[str, ...] = (), rpath: str | None = None) -> list[str]:
    include_dir, lib_dir = Path(include_dir), Path(lib_dir)
    cmd = [cxx, "-std=c++17", "-O2", "-fPIC", "-shared", "-Wno-deprecated-declarations", *DEFINES,
           f"-I{include_dir}", f"-I{include_dir / 'executorch/runtime/core/portable_type/c10'}"]
    if version:
        cmd.append(f'-DMCV_ET_VERSION="{version}"')
    cmd += [*extra, *map(str, SOURCES), "-o", str(out), f"-L{lib_dir}",
            "-Wl,--no-as-needed", *(f"-l{n}" for n in WHEEL_LIBS), "-Wl,--as-needed",
            f"-Wl,-rpath,{rpath if rpath is not None else lib_dir}"]
    return cmd


def _compiler_id(cxx: str) -> str:
    try:
        r = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"{cxx}: cannot run the compiler ({e})") from None
    return (r.stdout.splitlines() or [""])[0]


def _last_error(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or ["(no output)"])[-1][:400]


def build_lib(out_dir: str | Path, *, cxx: str, include_dir: str | Path, lib_dir: str | Path,
              version: str | None = None, extra: tuple[str, ...] = (), rpath: str | None = None,
              timeout: float = 900) -> Path:
    """Compile the two sources into `<out_dir>/libminicpmv_et.so` and return its path; RuntimeError
    (with the compiler's last error line) when a directory is missing or the build fails."""
    include_dir, lib_dir, out_dir = Path(include_dir), Path(lib_dir), Path(out_dir)
    if not (include_dir / "executorch/extension/module/module.h").is_file():
        raise RuntimeError(f"{include_dir}: no ExecuTorch C++ headers (executorch/extension/module/module.h)")
    missing = [n for n in WHEEL_LIBS if not (lib_dir / f"lib{n}.so").is_file()]
    if missing:
        raise RuntimeError(f"{lib_dir}: missing " + ", ".join(f"lib{n}.so" for n in missing))
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / LIB_NAME
    tmp = out_dir / f".{LIB_NAME}.{os.getpid()}.tmp"
    cmd = compile_command(cxx, include_dir, lib_dir, tmp, version=version, extra=extra, rpath=rpath)
    h = hashlib.sha256()
    for part in [*(c.replace(str(tmp), LIB_NAME) for c in cmd), _compiler_id(cxx)]:
        h.update(part.encode() + b"\0")
    for src in SOURCES:
        h.update(src.read_bytes())
    stamp = out_dir / f"{LIB_NAME}.sha256"
    if out.is_file() and stamp.is_file() and stamp.read_text().strip() == h.hexdigest():
        return out
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"{cxx}: {e}") from None
    if r.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"building {LIB_NAME} failed: {_last_error(r.stderr + r.stdout)}")
    os.replace(tmp, out)
    stamp.write_text(h.hexdigest() + "\n")
    return out


def host_wheel_dir() -> Path:
    """The installed executorch package (found without importing it: importing it registers ops)."""
    spec = importlib.util.find_spec("executorch")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("no executorch package installed (pip install -e '.[executorch]')")
    return Path(list(spec.submodule_search_locations)[0])


def build_host_lib(out_dir: str | Path, cxx: str = "g++") -> Path:
    """libminicpmv_et.so for this machine, against the venv's executorch wheel."""
    pkg = host_wheel_dir()
    try:
        version = importlib.metadata.version("executorch")
    except importlib.metadata.PackageNotFoundError:
        version = None
    return build_lib(out_dir, cxx=cxx, include_dir=pkg / "include", lib_dir=pkg / "lib", version=version)
