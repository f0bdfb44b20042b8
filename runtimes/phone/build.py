"""The aarch64 side of a phone profile, built once per machine into a cache folder.

    <cache>/phone/sysroot-<fp>/   Debian 12's arm64 Python 3.11 and the libraries it needs, from a
                                  private apt state (nothing added to the machine's dpkg)
    <cache>/phone/site-<fp>/      aarch64 wheels (numpy, Pillow, llama-cpp-python's pure-Python
                                  dependencies) and llama-cpp-python's `llama_cpp` package from its
                                  source package, without a library: LLAMA_CPP_LIB_PATH names ours
    <cache>/phone/llama-<fp>/lib  llama.cpp (libllama, libggml*, libmtmd) cross-compiled from the
                                  same llama-cpp-python source package the x86 runtime is built
                                  from, with the profile's CMake flags
    <cache>/phone/et-<fp>/lib     ExecuTorch's C++ runtime libraries from its aarch64 wheel (kernels,
                                  XNNPACK) and this project's runner library over them
                                  (runtimes/phone/et/), when the host has executorch
    <cache>/phone/root-<fp>/      the guest's file system for one qemu CPU: the sysroot's folders
                                  linked in, plus a /proc/cpuinfo that matches that CPU (qemu's -L
                                  prefix is looked up first for every path the guest opens, so the
                                  guest reads this file, not the host's x86 one)

Every folder is named by a fingerprint of what went into it (versions, flags, package lists) and is
written under a temporary name, then renamed: an interrupted build is redone, a finished one reused.
The host tools are Debian packages (qemu-user-static, g++-aarch64-linux-gnu, cmake): installed
with apt-get when running as root and missing, else named in a one-line error.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as im
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from convert.errors import ConvertError

from .cpu import HWCAP, HWCAP2
from .profiles import PhoneProfile

LLAMA_CPP_PYTHON = "0.3.36"  # the x86 runtime's llama-cpp-python (runtimes/llamacpp.py)
HOST_PACKAGES = {"qemu-aarch64-static": "qemu-user-static", "aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu",
                 "cmake": "cmake", "dpkg-deb": "dpkg", "apt-get": "apt"}
# Debian 12's python3.11:arm64 and what it loads (checked closure of its Depends)
ARM64_DEBS = ("gcc-12-base libacl1 libbz2-1.0 libc6 libcom-err2 libcrypt1 libdb5.3 libexpat1 libffi8 libgcc-s1 "
              "libgdbm6 libgomp1 libgssapi-krb5-2 libk5crypto3 libkeyutils1 libkrb5-3 libkrb5support0 liblzma5 "
              "libmd0 libncursesw6 libnsl2 libpcre2-8-0 libpython3.11-minimal libpython3.11-stdlib libreadline8 "
              "libselinux1 libsqlite3-0 libssl3 libstdc++6 libtinfo6 libtirpc-common libtirpc3 libuuid1 libzstd1 "
              "python3.11 python3.11-minimal readline-common zlib1g").split()
# the guest's Python packages: the host venv's versions, so both ISAs run the same code
GUEST_WHEELS = ("numpy", "pillow", "jinja2", "markupsafe", "diskcache", "typing-extensions")
GUEST_OPTIONAL = ("onnxruntime",)  # the engines that run in the guest, where the host has them
_FALLBACK_VERSIONS = {"jinja2": "3.1.6", "markupsafe": "3.0.3", "diskcache": "5.6.3", "typing-extensions": "4.15.0"}



def cache_root() -> Path:
    return Path(os.environ.get("MINICPMV_EDGE_CACHE", Path.home() / ".cache" / "minicpmv-edge")) / "phone"


def _fp(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


class _Steps:
    """Progress lines (stderr) and the logs of the commands run."""

    def __init__(self, quiet: bool):
        self.quiet = quiet

    def say(self, msg: str) -> None:
        if not self.quiet:
            print(f"phone: {msg}", file=sys.stderr, flush=True)

    def run(self, cmd: list[str], what: str, log: Path, **kw) -> subprocess.CompletedProcess:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as f:
            f.write(("$ " + " ".join(map(str, cmd)) + "\n").encode())
            f.flush()
            try:
                p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kw)
            except OSError as e:
                raise ConvertError(f"cannot {what}: {e}") from None
        if p.returncode != 0:
            tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:]
            raise ConvertError(f"cannot {what} (exit {p.returncode}{': ' + tail[0][:160] if tail else ''}; log: {log})")
        return p


def _built(final: Path, fingerprint: dict, build, steps: _Steps, what: str) -> Path:
    """`final` if it holds this fingerprint, else built by build(tmp) under a temporary name."""
    stamp = final / "fingerprint.json"
    if stamp.is_file():
        try:
            if json.loads(stamp.read_text()) == fingerprint:
                return final
        except ValueError:
            pass
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    steps.say(what)
    try:
        build(tmp)
        (tmp / "fingerprint.json").write_text(json.dumps(fingerprint, indent=1, sort_keys=True))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# -- host tools --------------------------------------------------------------------------------


def host_tools(steps: _Steps) -> dict[str, str]:
    missing = {pkg for tool, pkg in HOST_PACKAGES.items() if shutil.which(tool) is None}
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        steps.say(f"installing Debian packages {' '.join(sorted(missing))}")
        log = cache_root() / "logs" / "apt-host.log"
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        steps.run(["apt-get", "update"], "update apt's package lists", log, env=env)
        steps.run(["apt-get", "install", "-y", "--no-install-recommends", *sorted(missing)],
                  f"install {' '.join(sorted(missing))}", log, env=env)
        missing = {pkg for tool, pkg in HOST_PACKAGES.items() if shutil.which(tool) is None}
    if missing:
        raise ConvertError(f"the phone runtime needs the Debian packages {' '.join(sorted(missing))} "
                           f"(apt-get install {' '.join(sorted(missing))})")
    return {tool: shutil.which(tool) for tool in HOST_PACKAGES}


def _version_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out.splitlines()[0].strip() if out else "?"


# -- the arm64 sysroot with Python 3.11 ------------------------------------------------------------


def sysroot(steps: _Steps) -> Path:
    debian = Path("/etc/debian_version").read_text().strip() if Path("/etc/debian_version").is_file() else "?"
    fingerprint = {"debs": ARM64_DEBS, "debian": debian}
    root = cache_root()

    def build(tmp: Path) -> None:
        apt = root / "apt-arm64"
        for d in ("state/lists/partial", "cache/archives/partial"):
            (apt / d).mkdir(parents=True, exist_ok=True)
        (apt / "status").touch()
        opts = [f"-o=Dir::State={apt}/state", f"-o=Dir::Cache={apt}/cache", f"-o=Dir::State::status={apt}/status",
                "-o=APT::Architecture=arm64", "-o=APT::Architectures::=arm64"]
        log = root / "logs" / "sysroot.log"
        steps.run(["apt-get", *opts, "update"], "read Debian's arm64 package lists", log)
        debs = tmp / "debs"
        debs.mkdir()
        steps.run(["apt-get", *opts, "download", *(f"{d}:arm64" for d in ARM64_DEBS)],
                  "download Debian's arm64 Python 3.11", log, cwd=debs)
        for deb in sorted(debs.glob("*.deb")):
            steps.run(["dpkg-deb", "-x", str(deb), str(tmp)], f"unpack {deb.name}", log)
        shutil.rmtree(debs)
        if not (tmp / "usr/bin/python3.11").is_file():
            raise ConvertError(f"cannot set up the arm64 Python: python3.11 is missing after unpacking (log: {log})")

    return _built(root / f"sysroot-{_fp(fingerprint)}", fingerprint, build, steps,
                  "setting up Debian's arm64 Python 3.11 (once, about 15 MB)")


# -- llama-cpp-python's source package ---------------------------------------------------------------


def llama_cpp_source(steps: _Steps) -> Path:
    """The unpacked llama-cpp-python source package (pip download, once)."""
    root = cache_root()
    fingerprint = {"llama-cpp-python": LLAMA_CPP_PYTHON}

    def build(tmp: Path) -> None:
        log = root / "logs" / "source.log"
        steps.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                   f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(tmp)],
                  f"download the llama-cpp-python {LLAMA_CPP_PYTHON} source package", log)
        (sdist,) = tmp.glob("llama_cpp_python-*.tar.gz")
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        with tarfile.open(sdist) as t:
            t.extractall(tmp, filter="data")
        sdist.unlink()
        (tmp / "sdist.sha256").write_text(digest)

    out = _built(root / f"src-{_fp(fingerprint)}", fingerprint, build, steps,
                 f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON} source package")
    return out / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"


# -- the guest's Python packages ---------------------------------------------------------------------


def _host_version(pkg: str) -> str:
    try:
        return im.version(pkg)
    except im.PackageNotFoundError:
        if pkg in _FALLBACK_VERSIONS:
            return _FALLBACK_VERSIONS[pkg]
        raise ConvertError(f"the phone runtime installs the host's {pkg} version for aarch64, "
                           f"but {pkg} is not installed here") from None


def site(steps: _Steps, src: Path) -> Path:
    pins = {p: _host_version(p) for p in GUEST_WHEELS}
    for p in GUEST_OPTIONAL:
        try:
            pins[p] = im.version(p)
        except im.PackageNotFoundError:
            pass
    fingerprint = {"wheels": pins, "llama-cpp-python": LLAMA_CPP_PYTHON, "python": "3.11"}
    root = cache_root()

    def build(tmp: Path) -> None:
        log = root / "logs" / "site.log"
        steps.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp),
                   "--platform", "manylinux_2_28_aarch64", "--platform", "manylinux_2_17_aarch64",
                   "--platform", "manylinux2014_aarch64", "--python-version", "3.11", "--implementation", "cp",
                   "--abi", "cp311", "--only-binary=:all:", *(f"{p}=={v}" for p, v in pins.items())],
                  "download the aarch64 wheels (numpy, Pillow, ...)", log)
        shutil.copytree(src / "llama_cpp", tmp / "llama_cpp", ignore=shutil.ignore_patterns("lib", "__pycache__"))

    return _built(root / f"site-{_fp(fingerprint)}", fingerprint, build, steps,
                  "installing the aarch64 Python packages (once)")


# -- llama.cpp for one profile ------------------------------------------------------------------------

LLAMA_LIBS = ("libllama.so", "libggml.so", "libggml-base.so", "libggml-cpu.so", "libmtmd.so")


def llama_cpp(steps: _Steps, src: Path, profile: PhoneProfile) -> Path:
    flags = dict(sorted(profile.llama_cpp.items()))
    sdist_sha = (src.parent / "sdist.sha256").read_text().strip()
    fingerprint = {"llama-cpp-python": LLAMA_CPP_PYTHON, "sdist_sha256": sdist_sha, "flags": flags,
                   "compiler": _version_line(["aarch64-linux-gnu-g++", "--version"]),
                   "cmake": _version_line(["cmake", "--version"])}
    root = cache_root()

    def build(tmp: Path) -> None:
        bdir = root / f"build-{_fp(fingerprint)}"
        shutil.rmtree(bdir, ignore_errors=True)
        bdir.mkdir(parents=True)
        log = root / "logs" / f"llama-{_fp(fingerprint)}.log"
        log.unlink(missing_ok=True)
        cfg = ["cmake", "-S", str(src / "vendor" / "llama.cpp"), "-B", str(bdir),
               "-DCMAKE_SYSTEM_NAME=Linux", "-DCMAKE_SYSTEM_PROCESSOR=aarch64",
               "-DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc", "-DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++",
               "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON",
               "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON", "-DCMAKE_INSTALL_RPATH=$ORIGIN",  # the libraries find each other
               # only the libraries the runtime loads (llama-cpp-python builds the same ones)
               "-DLLAMA_BUILD_COMMON=OFF", "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_MTMD=ON",
               "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
               *(f"-D{k}={v}" for k, v in flags.items())]
        try:
            steps.run(cfg, "configure llama.cpp for aarch64", log)
            steps.run(["cmake", "--build", str(bdir), "-j", str(os.cpu_count() or 2), "--target", "llama", "mtmd"],
                      "cross-compile llama.cpp for aarch64", log)
            lib = tmp / "lib"
            lib.mkdir()
            for so in sorted(bdir.rglob("lib*.so*")):
                if so.name.split(".so")[0] + ".so" in LLAMA_LIBS:
                    shutil.copy2(so, lib / so.name, follow_symlinks=False)
            missing = [n for n in LLAMA_LIBS if not (lib / n).exists()]
            if missing:
                raise ConvertError(f"the llama.cpp cross build made no {missing[0]} (log: {log})")
        finally:
            shutil.rmtree(bdir, ignore_errors=True)

    arch = flags.get("GGML_CPU_ARM_ARCH", "?")
    omp = "on" if flags.get("GGML_OPENMP", "ON").upper() == "ON" else "off"
    return _built(root / f"llama-{_fp(fingerprint)}", fingerprint, build, steps,
                  f"cross-compiling llama.cpp {LLAMA_CPP_PYTHON} for aarch64 ({arch}, OpenMP {omp}): "
                  f"once per flags, about 3 minutes on 2 cores")


# -- ExecuTorch's runtime for aarch64 and this project's runner over it ------------------------------------

ET_LIBS = ("libexecutorch.so", "libexecutorch_threadpool.so", "libexecutorch_kernels_optimized.so",
           "libexecutorch_kernels_quantized.so", "libexecutorch_backend_xnnpack.so")


def et_runner(steps: _Steps) -> Path | None:
    """The `.pte` runtime of the guest: the aarch64 wheel's C++ libraries (no Python part: it needs
    libtorch) and runtimes/phone/et/ compiled against its headers. One build serves every profile:
    XNNPACK and the kernels pick their code paths at run time. None when the host has no executorch."""
    from .et.build_lib import LIB_NAME, SOURCES, build_lib

    try:
        version = im.version("executorch")
    except im.PackageNotFoundError:
        return None
    cxx = "aarch64-linux-gnu-g++"
    fingerprint = {"executorch": version, "compiler": _version_line([cxx, "--version"]), "march": "armv8-a",
                   "sources": {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in SOURCES}}
    root = cache_root()

    def build(tmp: Path) -> None:
        log = root / "logs" / "executorch.log"
        dl = tmp / "download"
        steps.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(dl),
                   "--platform", "manylinux_2_28_aarch64", "--python-version", "3.11", "--implementation", "cp",
                   "--abi", "cp311", f"executorch=={version}"], f"download ExecuTorch {version}'s aarch64 wheel", log)
        sdk, lib = tmp / "sdk", tmp / "lib"
        lib.mkdir()
        with zipfile.ZipFile(next(dl.glob("*.whl"))) as z:
            for name in z.namelist():
                if name.startswith("executorch/include/") or name in {f"executorch/lib/{n}" for n in ET_LIBS}:
                    z.extract(name, sdk)
        for n in ET_LIBS:
            shutil.move(str(sdk / "executorch" / "lib" / n), lib / n)
        steps.say("compiling the ExecuTorch runner for aarch64")
        try:  # baseline armv8-a: no profile can die of an illegal instruction in our code
            build_lib(lib, cxx=cxx, include_dir=sdk / "executorch" / "include", lib_dir=lib, version=version,
                      extra=("-march=armv8-a",), rpath="$ORIGIN")
        except RuntimeError as e:
            raise ConvertError(f"the ExecuTorch runner did not compile for aarch64: {e}") from None
        shutil.rmtree(dl)
        shutil.rmtree(sdk)
        if not (lib / LIB_NAME).is_file():
            raise ConvertError(f"the ExecuTorch runner build made no {LIB_NAME}")

    return _built(root / f"et-{_fp(fingerprint)}", fingerprint, build, steps,
                  f"setting up ExecuTorch {version}'s aarch64 runtime and the project's runner (once)") / "lib"


# -- the guest's root for one CPU: the sysroot plus a matching /proc/cpuinfo -----------------------------


def guest_hwcaps(qemu: str, cpu: str, sysroot_dir: Path) -> list[str]:
    """The HWCAP feature names the emulated CPU gives a process (read inside the guest)."""
    probe = ("import ctypes; g = ctypes.CDLL(None).getauxval; g.restype = ctypes.c_ulong; "
             "print(g(16), g(26))")
    p = subprocess.run([qemu, "-cpu", cpu, "-L", str(sysroot_dir), str(sysroot_dir / "usr/bin/python3.11"), "-S", "-c",
                        probe], capture_output=True, text=True, timeout=300)
    if p.returncode != 0 or len(p.stdout.split()) != 2:
        raise ConvertError(f"qemu-aarch64 -cpu {cpu} cannot run the arm64 Python "
                           f"({(p.stderr.strip().splitlines() or ['exit ' + str(p.returncode)])[-1][:160]})")
    h1, h2 = (int(x) for x in p.stdout.split())
    return [n for i, n in enumerate(HWCAP) if h1 >> i & 1] + [n for i, n in enumerate(HWCAP2) if h2 >> i & 1]


def cpuinfo_text(features: list[str], part: str, n_cpus: int) -> str:
    block = (f"BogoMIPS\t: 50.00\nFeatures\t: {' '.join(features)}\nCPU implementer\t: 0x41\n"
             f"CPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: {part}\nCPU revision\t: 0\n")
    return "".join(f"processor\t: {i}\n{block}\n" for i in range(n_cpus))


def guest_root(steps: _Steps, qemu: str, sysroot_dir: Path, profile: PhoneProfile) -> tuple[Path, list[str]]:
    n_cpus = os.cpu_count() or 1
    fingerprint = {"sysroot": sysroot_dir.name, "cpu": profile.qemu_cpu, "part": profile.cpu_part, "n_cpus": n_cpus,
                   "qemu": _version_line([qemu, "--version"])}
    feats: list[str] = []

    def build(tmp: Path) -> None:
        feats[:] = guest_hwcaps(qemu, profile.qemu_cpu, sysroot_dir)
        for entry in sysroot_dir.iterdir():
            if entry.name != "fingerprint.json":
                (tmp / entry.name).symlink_to(entry)
        (tmp / "proc").mkdir()
        (tmp / "proc" / "cpuinfo").write_text(cpuinfo_text(feats, profile.cpu_part, n_cpus))
        (tmp / "features.json").write_text(json.dumps(feats))

    out = _built(cache_root() / f"root-{_fp(fingerprint)}", fingerprint, build, steps,
                 f"writing the guest root for qemu CPU {profile.qemu_cpu}")
    feats = json.loads((out / "features.json").read_text())
    lacking = [f for f in profile.requires if f not in feats]
    extra = [f for f in profile.must_not_have if f in feats]
    if lacking or extra:
        raise ConvertError(f"phone profile {profile.name}: qemu CPU {profile.qemu_cpu} "
                           + (f"lacks {', '.join(lacking)}" if lacking else f"has {', '.join(extra)}")
                           + " (recipes/phones.toml)")
    return out, feats


# -- everything for one profile --------------------------------------------------------------------------


@dataclass(frozen=True)
class PhoneSetup:
    profile: PhoneProfile
    qemu: str
    root: Path  # the guest's file system (qemu -L)
    site: Path
    llama_lib: Path
    features: tuple[str, ...]  # what the emulated CPU reports
    build: dict  # the llama.cpp build's fingerprint (flags, compiler, source)
    et_lib: Path | None = None  # ExecuTorch's aarch64 libraries and the runner (None: no executorch here)

    def command(self, argv: list[str]) -> list[str]:
        """argv (an aarch64 Python command line, argv[0] = 'python') run in this profile's guest."""
        assert argv[0] == "python"
        return [self.qemu, "-cpu", self.profile.qemu_cpu, "-L", str(self.root),
                str(self.root / "usr" / "bin" / "python3.11"), *argv[1:]]

    def env(self, pythonpath: str) -> dict[str, str]:
        env = {"PYTHONPATH": os.pathsep.join([pythonpath, str(self.site)]), "LLAMA_CPP_LIB_PATH": str(self.llama_lib),
               "MTMD_CPP_LIB": str(self.llama_lib), "LD_LIBRARY_PATH": str(self.llama_lib)}
        if self.et_lib is not None:
            from .et.build_lib import LIB_NAME

            env["MINICPMV_ET_LIB"] = str(self.et_lib / LIB_NAME)
        return env

    def describe(self) -> dict:
        return {"profile": self.profile.name, "qemu_cpu": self.profile.qemu_cpu, "cpu_features": list(self.features),
                "llama_cpp_flags": self.build.get("flags", {}), "compiler": self.build.get("compiler"),
                "emulator": _version_line([self.qemu, "--version"]),
                "executorch_runner": "aarch64 wheel's runtime + project runner (armv8-a)" if self.et_lib else None}


def ensure(profile: PhoneProfile, *, quiet: bool = False) -> PhoneSetup:
    """Everything `profile` runs on, built on first use (progress lines on stderr)."""
    steps = _Steps(quiet)
    tools = host_tools(steps)
    sr = sysroot(steps)
    src = llama_cpp_source(steps)
    st = site(steps, src)
    lib = llama_cpp(steps, src, profile)
    et = et_runner(steps)
    root, feats = guest_root(steps, tools["qemu-aarch64-static"], sr, profile)
    return PhoneSetup(profile=profile, qemu=tools["qemu-aarch64-static"], root=root, site=st, llama_lib=lib / "lib",
                      features=tuple(feats), build=json.loads((lib / "fingerprint.json").read_text()), et_lib=et)
