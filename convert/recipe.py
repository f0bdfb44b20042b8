"""Platform recipes (recipes/<platform>.toml): what an app's release bundle holds and where it is
validated. The schema below is data: each section's keys with their type and, where the set is
closed, the values allowed. A recipe with an unknown section, key, type or value is bad input,
named with its file and key, before any work."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from recipes import HERE as RECIPES

from .errors import ConvertError

PLATFORMS = ("android", "harmonyos", "ios")
GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q3_K_L", "Q3_K_M",
              "Q3_K_S", "Q2_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1")

# section -> key -> (type, allowed values or None, required)
SCHEMA: dict[str, dict[str, tuple]] = {
    "": {"platform": (str, PLATFORMS, True), "description": (str, None, True), "phones": (list, None, True)},
    "gguf": {"decoder": (str, GGUF_TYPES, True), "projector": (str, GGUF_TYPES, True),
             "modes": (list, ("16x", "4x"), True), "imatrix": (bool, None, False)},
    "onnx": {"enabled": (bool, None, True), "quant": (str, ("fp32", "fp16", "int4"), False),
             "ort": (bool, None, False)},
    "executorch": {"enabled": (bool, None, True), "quant": (str, ("8da4w", "8da8w", "fp32"), False)},
    "coreml": {"enabled": (bool, None, True), "parts": (list, ("vision", "decoder"), False)},
    "validation": {"scenarios": (str, None, True), "phone_scenarios": (str, None, True),
                   "max_kl": (float, None, False)},
    "devices": {"name": (str, None, True), "memory_budget_mb": (int, None, True), "n_ctx": (int, None, True),
                "n_batch": (int, None, True), "n_ubatch": (int, None, True)},
}
REQUIRED_SECTIONS = ("gguf", "validation", "devices")
# formats an app may run that this toolchain does not build yet: named, so a recipe asking for one
# is told so rather than that the key is unknown
NOT_BUILT = ("mnn", "mlc", "tflite", "litert", "qnn", "mindspore", "ncnn", "openvino")


@dataclass(frozen=True)
class Device:
    name: str
    memory_budget_mb: int
    n_ctx: int
    n_batch: int
    n_ubatch: int


@dataclass(frozen=True)
class Recipe:
    path: Path
    platform: str
    description: str
    phones: tuple[str, ...]
    gguf: dict
    validation: dict
    devices: tuple[Device, ...]
    onnx: dict = field(default_factory=dict)  # empty: not in the bundle
    executorch: dict = field(default_factory=dict)
    coreml: dict = field(default_factory=dict)


def _check_table(where: str, table: dict, keys: dict[str, tuple]) -> None:
    for k, v in table.items():
        if k not in keys:
            raise ConvertError(f"{where}: unknown key {k!r} (known: {', '.join(keys)})")
        typ, allowed, _ = keys[k]
        ok = isinstance(v, typ) and not (typ is not bool and isinstance(v, bool))
        if typ is float and isinstance(v, int) and not isinstance(v, bool):
            ok = True
        if not ok:
            raise ConvertError(f"{where}: {k} must be a {typ.__name__}, not {type(v).__name__} ({v!r})")
        items = v if isinstance(v, list) else [v]
        if typ is list and not all(isinstance(x, str) for x in items):
            raise ConvertError(f"{where}: {k} must be a list of strings")
        if allowed is not None and any(x not in allowed for x in items):
            bad = next(x for x in items if x not in allowed)
            raise ConvertError(f"{where}: {k} = {bad!r} is not one of {', '.join(allowed)}")
        if typ is int and v < 1:
            raise ConvertError(f"{where}: {k} must be positive")
    missing = [k for k, (_, _, req) in keys.items() if req and k not in table]
    if missing:
        raise ConvertError(f"{where}: missing key {missing[0]!r}")


def load_recipe(name: str | Path) -> Recipe:
    """A platform name (recipes/<name>.toml) or a recipe file."""
    path = Path(name)
    if path.suffix != ".toml":
        if str(name) not in PLATFORMS:
            raise ConvertError(f"unknown platform {str(name)!r} (known: {', '.join(PLATFORMS)}; or a recipe .toml file)")
        path = RECIPES / f"{name}.toml"
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConvertError(f"{path}: cannot read the recipe ({e.strerror or e})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConvertError(f"{path}: not valid TOML ({e})") from None
    top = {k: v for k, v in raw.items() if not isinstance(v, (dict, list)) or k == "phones"}
    for k, v in raw.items():
        if k in NOT_BUILT:
            raise ConvertError(f"{path}: [{k}] artifacts are not built by this toolchain yet (it builds "
                               f"{', '.join(s for s in SCHEMA if s and s not in ('validation', 'devices'))})")
        if k not in top and k not in SCHEMA:
            raise ConvertError(f"{path}: unknown section [{k}] (known: {', '.join(s for s in SCHEMA if s)})")
    _check_table(str(path), top, SCHEMA[""])
    for sec in REQUIRED_SECTIONS:
        if sec not in raw:
            raise ConvertError(f"{path}: missing section [{sec}]")
    for sec in ("gguf", "onnx", "executorch", "coreml", "validation"):
        if sec in raw:
            if not isinstance(raw[sec], dict):
                raise ConvertError(f"{path}: [{sec}] must be a table")
            _check_table(f"{path} [{sec}]", raw[sec], SCHEMA[sec])
    devices = raw["devices"]
    if not isinstance(devices, list) or not devices or not all(isinstance(d, dict) for d in devices):
        raise ConvertError(f"{path}: [[devices]] must list at least one device table")
    for i, d in enumerate(devices):
        _check_table(f"{path} [[devices]] {i + 1}", d, SCHEMA["devices"])
    from runtimes.phone.profiles import load_profiles

    known = load_profiles()
    for p in raw["phones"]:
        if p not in known:
            raise ConvertError(f"{path}: phones: unknown phone profile {p!r} (known: {', '.join(known)})")
    return Recipe(path=path, platform=raw["platform"], description=raw["description"], phones=tuple(raw["phones"]),
                  gguf=dict(raw["gguf"]), validation=dict(raw["validation"]),
                  devices=tuple(Device(**d) for d in devices),
                  **{s: dict(raw[s]) for s in ("onnx", "executorch", "coreml") if s in raw})
