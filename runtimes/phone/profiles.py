"""Phone profiles (recipes/phones.toml): what an app's llama.cpp library is built with and which
CPU qemu emulates for it. Data only; runtimes/phone/build.py turns a profile into binaries."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from convert.errors import ConvertError
from recipes import HERE as RECIPES

PROFILES_FILE = RECIPES / "phones.toml"

_KEYS = {"description": str, "qemu_cpu": str, "cpu_part": str, "requires": list, "must_not_have": list,
         "threads": int, "n_ctx": int, "n_batch": int, "n_ubatch": int, "memory_budget_mb": (int, float),
         "llama_cpp": dict}


@dataclass(frozen=True)
class PhoneProfile:
    name: str
    description: str
    qemu_cpu: str
    cpu_part: str
    requires: tuple[str, ...]
    must_not_have: tuple[str, ...]
    threads: int
    n_ctx: int
    n_batch: int
    n_ubatch: int
    memory_budget_mb: float
    llama_cpp: dict = field(default_factory=dict)  # CMake cache entries of the cross build

    @property
    def arm_arch(self) -> str:
        return self.llama_cpp.get("GGML_CPU_ARM_ARCH", "")

    def as_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "qemu_cpu": self.qemu_cpu,
                "cpu_part": self.cpu_part, "threads": self.threads, "n_ctx": self.n_ctx, "n_batch": self.n_batch,
                "n_ubatch": self.n_ubatch, "memory_budget_mb": self.memory_budget_mb,
                "llama_cpp_flags": dict(self.llama_cpp)}


def _parse(name: str, raw: dict, source: Path) -> PhoneProfile:
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        raise ConvertError(f"{source}: profile {name!r}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_KEYS))})")
    missing = sorted(set(_KEYS) - set(raw))
    if missing:
        raise ConvertError(f"{source}: profile {name!r}: missing key {missing[0]!r}")
    for k, t in _KEYS.items():
        if not isinstance(raw[k], t) or isinstance(raw[k], bool):
            raise ConvertError(f"{source}: profile {name!r}: {k} has the wrong type ({type(raw[k]).__name__})")
    for k in ("requires", "must_not_have"):
        if not all(isinstance(x, str) for x in raw[k]):
            raise ConvertError(f"{source}: profile {name!r}: {k} must be a list of strings")
    if not all(isinstance(v, str) for v in raw["llama_cpp"].values()):
        raise ConvertError(f"{source}: profile {name!r}: llama_cpp entries must be strings")
    if raw["threads"] < 1 or raw["n_ctx"] < 1 or raw["n_batch"] < 1 or raw["n_ubatch"] < 1:
        raise ConvertError(f"{source}: profile {name!r}: threads, n_ctx, n_batch and n_ubatch must be positive")
    return PhoneProfile(name=name, requires=tuple(raw["requires"]), must_not_have=tuple(raw["must_not_have"]),
                        **{k: raw[k] for k in _KEYS if k not in ("requires", "must_not_have")})


def load_profiles(path: Path = PROFILES_FILE) -> dict[str, PhoneProfile]:
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConvertError(f"{path}: cannot read the phone profiles ({e})") from None
    return {name: _parse(name, body, Path(path)) for name, body in raw.items()}


def get_profile(name: str) -> PhoneProfile:
    profiles = load_profiles()
    if name not in profiles:
        raise ConvertError(f"unknown phone profile {name!r} (known: {', '.join(profiles)})")
    return profiles[name]
