"""GGUF export: the decoder (`qwen35`) and one vision projector (`clip`) per downsample mode."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import gguf
from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType as F

from quantize import ggml
from quantize.ggml import SUPPORTED, fits
from quantize.mixtures import MIXTURES, Mixture, Overrides, TypeChooser

from .. import manifest
from ..checkpoint import Checkpoint
from ..errors import ConvertError
from . import metadata
from .plan import TensorPlan, build_plan
from .writer import write_gguf

BASENAME = "MiniCPM-V-4.6"
BLOCK_TYPES = SUPPORTED - {T.F32, T.F16, T.BF16}
FLOATS = {"f32": (T.F32, F.ALL_F32), "f16": (T.F16, F.MOSTLY_F16), "bf16": (T.BF16, F.MOSTLY_BF16)}


@dataclass(frozen=True)
class Quant:
    """A --quant value: a float type (every tensor the converter's way) or a llama.cpp mixture."""
    label: str  # as in file names: F16, Q4_K_M
    ftype: F
    float_type: T | None = None
    mixture: Mixture | None = None


@dataclass
class Output:
    kind: str  # decoder | mmproj
    mode: str | None
    path: Path
    plans: list[TensorPlan]
    quant: Quant


def parse_quant(q: str, flag: str = "--quant") -> Quant:
    key = q.strip()
    if key.lower() in FLOATS:
        t, ft = FLOATS[key.lower()]
        return Quant(t.name, ft, float_type=t)
    mix = MIXTURES.get(key.upper())
    if mix is None:
        choices = ", ".join([*FLOATS, *MIXTURES])
        raise ConvertError(f"unknown {flag} {q!r}; choose one of {choices}")
    return Quant(mix.name, mix.ftype, mixture=mix)


def parse_type(t: str, flag: str) -> T:
    try:
        qt = T[t.strip().upper()]
    except KeyError:
        raise ConvertError(f"unknown ggml type {t!r} for {flag}") from None
    if qt not in SUPPORTED:
        raise ConvertError(f"{flag}: type {qt.name} cannot be written by this tool")
    return qt


def quantized_plan(plans: list[TensorPlan], quant: Quant, n_layer: int, *, n_gqa: int = 1,
                   has_imatrix: bool = False, overrides: Overrides | None = None) -> tuple[list[TensorPlan], list[str]]:
    """Apply a mixture to a plan built for F32 (the types llama-quantize would pick for that file)."""
    ch = TypeChooser(quant.mixture, [p.name for p in plans], n_layer, n_gqa=n_gqa, has_imatrix=has_imatrix,
                     overrides=overrides)
    out = [dataclasses.replace(p, qtype=ch.choose(p.name, p.shape, p.qtype), squeeze=True) for p in plans]
    for p in out:  # only an explicit override can get here; llama.cpp aborts on such a file
        if not fits(p.qtype, p.shape[-1]):
            raise ConvertError(f"{p.name}: rows of {p.shape[-1]} values cannot be stored as {p.qtype.name} "
                               f"(block size {gguf.GGML_QUANT_SIZES[p.qtype][0]}); choose another override type")
    return out, ch.fallbacks


def modes_of(mode: str) -> list[str]:
    if mode not in ("16x", "4x", "both"):
        raise ConvertError(f"unknown --mode {mode!r}; choose 16x, 4x or both")
    return ["16x", "4x"] if mode == "both" else [mode]


def _plan(ckpt: Checkpoint, kind: str, quant: Quant, mode: str, n_layer: int, **kw) -> list[TensorPlan]:
    if quant.float_type is not None:
        return build_plan(ckpt, kind, quant.float_type, mode)
    return quantized_plan(build_plan(ckpt, kind, T.F32, mode), quant, n_layer, **kw)[0]


def plan_outputs(ckpt: Checkpoint, out_dir: Path, quant: str = "f16", mode: str = "16x", *,
                 mmproj_quant: str | None = None, overrides: Overrides | None = None, has_imatrix: bool = False,
                 basename: str = BASENAME) -> list[Output]:
    dq = parse_quant(quant)
    # the projector: the decoder's float type by default, F16 under a quantized mixture
    mq = parse_quant(mmproj_quant, "--mmproj-quant") if mmproj_quant else (dq if dq.float_type is not None else parse_quant("f16"))
    t, v = ckpt.spec.text, ckpt.spec.vision
    dec = _plan(ckpt, "decoder", dq, "16x", t.num_layers, n_gqa=t.num_heads // t.num_kv_heads,
                has_imatrix=has_imatrix, overrides=overrides)
    outs = [Output("decoder", None, out_dir / f"{basename}-{dq.label}.gguf", dec, dq)]
    modes = modes_of(mode)
    for m in modes:
        suffix = f"-{m}" if len(modes) > 1 else ""
        outs.append(Output("mmproj", m, out_dir / f"mmproj-{basename}-{mq.label}{suffix}.gguf",
                           _plan(ckpt, "mmproj", mq, m, v.num_layers), mq))
    return outs


def describe_plan(outputs: list[Output]) -> str:
    """The --dry-run table: every tensor's name, shape (ggml order), type, bytes and bits per weight."""
    lines = []
    for o in outputs:
        lines.append(f"{o.path.name}  ({o.kind}{', ' + o.mode if o.mode else ''}, {o.quant.label})")
        lines.append(f"  {'tensor':<36} {'shape':>18} {'type':>6} {'bytes':>12} {'bpw':>6}")
        for p in o.plans:
            shape = "x".join(str(d) for d in reversed(p.shape))
            lines.append(f"  {p.name:<36} {shape:>18} {p.qtype.name:>6} {p.nbytes:>12} {8 * p.nbytes / p.n_params:>6.2f}")
        nb, npar = sum(p.nbytes for p in o.plans), sum(p.n_params for p in o.plans)
        lines.append(f"  total: {len(o.plans)} tensors, {npar} weights, {nb} bytes ({nb / 2**20:.2f} MiB), "
                     f"{8 * nb / npar:.2f} bits per weight")
    return "\n".join(lines)


def check_out_dir(out_dir: Path, outputs: list[Output], force: bool) -> None:
    """Refuse to mix our files with anything else unless --force."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ConvertError(f"--out {out_dir}: exists and is not a folder")
    # validation.json/.html: the harness's reports on an earlier export into this folder
    ours = {o.path.name for o in outputs} | manifest.own_files(out_dir) | {manifest.MANIFEST, "validation.json",
                                                                          "validation.html"}
    other = sorted(p.name for p in out_dir.iterdir() if p.name not in ours and not p.name.endswith(".partial"))
    if other and not force:
        raise ConvertError(f"--out {out_dir} holds other files ({', '.join(other[:3])}{', ...' if len(other) > 3 else ''}); "
                           "choose an empty folder or pass --force")


def source_info(ckpt: Checkpoint) -> dict:
    cfg = (ckpt.path / "config.json").read_bytes()
    # hash of tensor names, dtypes, shapes and sizes: identifies the weights without reading them all
    h = hashlib.sha256()
    for n in sorted(ckpt.names()):
        ti = ckpt.info(n)
        h.update(f"{n}|{ti.dtype}|{ti.shape}|{ti.nbytes}\n".encode())
    return {"path": str(ckpt.path.resolve()), "config_sha256": hashlib.sha256(cfg).hexdigest(),
            "tensor_index_sha256": h.hexdigest(), "model_type": ckpt.config.get("model_type")}


def load_imatrix(path: str | Path, plans: list[TensorPlan], name: str | None = None):
    """The importance vectors for the decoder's tensors (llama-quantize's normalisation), and the
    `quantize.imatrix.*` keys llama-quantize records."""
    from quantize.imatrix import importance, read_imatrix

    data = read_imatrix(path)
    vecs = {}
    for p in plans:
        v = importance(data, p.name)
        if v is not None:
            if v.size != p.shape[-1]:
                raise ConvertError(f"imatrix entry {p.name} has {v.size} values, the tensor's rows have {p.shape[-1]}")
            vecs[p.name] = v
    if not vecs:
        raise ConvertError(f"{path}: no entry matches a tensor of this model (an imatrix of another model?)")
    keys = {"quantize.imatrix.file": (name or str(path))[:127], "quantize.imatrix.entries_count": len(data.entries)}
    if data.datasets:
        keys["quantize.imatrix.dataset"] = data.datasets[0]
    if data.chunk_count > 0:
        keys["quantize.imatrix.chunks_count"] = int(data.chunk_count)
    return vecs, keys


def export_gguf(ckpt: Checkpoint, out_dir: Path, *, quant: str = "f16", mode: str = "16x", force: bool = False,
                allow_nonfinite: bool = False, quiet: bool = False, name: str | None = None,
                mmproj_quant: str | None = None, overrides: Overrides | None = None,
                imatrix: str | Path | None = None, quantizer: str | None = None, threads: int | None = None,
                profile=None, imatrix_name: str | None = None) -> list[Path]:
    """quantizer: "kquants" (this project's port), "ggml" (llama.cpp's C, from llama-cpp-python) or None/"auto"; the bytes are
    the same either way, the manifest records which ran. threads: quantizing threads (default: every
    core for ggml, one for numpy; $MINICPMV_QUANT_THREADS)."""
    out_dir = Path(out_dir)
    try:
        quantizer = ggml.resolve_quantizer(quantizer)
    except (ValueError, RuntimeError) as e:
        raise ConvertError(str(e)) from None
    if imatrix is not None and parse_quant(quant).mixture is None:
        raise ConvertError(f"--imatrix needs a quantized --quant mixture (e.g. Q4_K_M), not {quant}")
    outputs = plan_outputs(ckpt, out_dir, quant, mode, mmproj_quant=mmproj_quant, overrides=overrides,
                           has_imatrix=imatrix is not None)
    # imatrix_name: the file name recorded (llama-quantize records the path it was given)
    imat, imat_keys = load_imatrix(imatrix, outputs[0].plans, imatrix_name) if imatrix is not None else ({}, {})
    check_out_dir(out_dir, outputs, force)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    # every file is staged under a temporary name and all are renamed once all are written: a
    # failure or an interrupt halfway leaves the folder as it was (no decoder without its projector)
    staged: list[tuple[Path, Path]] = []
    entries = []
    try:
        for o in outputs:
            stage = o.path.with_name(f".{o.path.name}.staged.partial")
            arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN35] if o.kind == "decoder" else "clip"
            write_gguf(stage, arch, o.plans, ckpt, _metadata(ckpt, o, name, imat_keys), quiet=quiet,
                       allow_nonfinite=allow_nonfinite, desc=o.path.name,
                       imatrix_for=(lambda p: imat.get(p.name)) if o.kind == "decoder" else (lambda p: None),
                       quantizer=quantizer, threads=threads, profile=profile)
            staged.append((stage, o.path))
            extra = {"overrides": overrides.describe()} if overrides and overrides.describe() and o.kind == "decoder" else {}
            if any(p.qtype in BLOCK_TYPES for p in o.plans):
                extra["quantizer"] = ggml.describe_quantizer(quantizer)
            entries.append({**manifest.artifact_entry(stage, kind=o.kind, format="gguf", quant=o.quant.label,
                                                      mode=o.mode, n_tensors=len(o.plans), **extra),
                            "file": o.path.name})
        source = source_info(ckpt)
        for stage, path in staged:
            os.replace(stage, path)
        staged = []
        manifest.write(out_dir, source, entries)
    except BaseException:
        for stage, _ in staged:
            stage.unlink(missing_ok=True)
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    return [o.path for o in outputs]


def _metadata(ckpt: Checkpoint, o: Output, name: str | None, imat_keys: dict):
    """The writer's callback adding the file's keys."""
    n_params = sum(p.n_params for p in o.plans)

    def meta(w):
        metadata.general(w, ckpt, n_params, name, mmproj=o.kind == "mmproj")
        if o.kind == "decoder":
            metadata.decoder(w, ckpt, o.quant.ftype)
            for k, v in imat_keys.items():
                (w.add_string if isinstance(v, str) else w.add_uint32)(k, v)
        else:
            metadata.mmproj(w, ckpt, o.quant.ftype, o.mode)
    return meta
