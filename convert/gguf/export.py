"""GGUF export: the decoder (`qwen35`) and one vision projector (`clip`) per downsample mode."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import gguf
from gguf import GGMLQuantizationType as T

from .. import manifest
from ..checkpoint import Checkpoint
from ..errors import ConvertError
from . import metadata
from .plan import TensorPlan, build_plan
from .writer import write_gguf

BASENAME = "MiniCPM-V-4.6"
# --quant values this module writes (k-quant mixtures arrive with quantize/).
QUANTS = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0}


@dataclass
class Output:
    kind: str  # decoder | mmproj
    mode: str | None
    path: Path
    plans: list[TensorPlan]
    qtype: T


def parse_quant(q: str) -> T:
    key = q.lower()
    if key not in QUANTS:
        raise ConvertError(f"unknown --quant {q!r}; choose one of {', '.join(QUANTS)}")
    return QUANTS[key]


def modes_of(mode: str) -> list[str]:
    if mode not in ("16x", "4x", "both"):
        raise ConvertError(f"unknown --mode {mode!r}; choose 16x, 4x or both")
    return ["16x", "4x"] if mode == "both" else [mode]


def plan_outputs(ckpt: Checkpoint, out_dir: Path, quant: str = "f16", mode: str = "16x",
                 basename: str = BASENAME) -> list[Output]:
    qt = parse_quant(quant)
    tag = qt.name
    outs = [Output("decoder", None, out_dir / f"{basename}-{tag}.gguf", build_plan(ckpt, "decoder", qt), qt)]
    modes = modes_of(mode)
    for m in modes:
        suffix = f"-{m}" if len(modes) > 1 else ""
        outs.append(Output("mmproj", m, out_dir / f"mmproj-{basename}-{tag}{suffix}.gguf",
                           build_plan(ckpt, "mmproj", qt, m), qt))
    return outs


def check_out_dir(out_dir: Path, outputs: list[Output], force: bool) -> None:
    """Refuse to mix our files with anything else unless --force."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ConvertError(f"--out {out_dir}: exists and is not a folder")
    ours = {o.path.name for o in outputs} | manifest.own_files(out_dir) | {manifest.MANIFEST}
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


def export_gguf(ckpt: Checkpoint, out_dir: Path, *, quant: str = "f16", mode: str = "16x", force: bool = False,
                allow_nonfinite: bool = False, quiet: bool = False, name: str | None = None) -> list[Path]:
    out_dir = Path(out_dir)
    outputs = plan_outputs(ckpt, out_dir, quant, mode)
    check_out_dir(out_dir, outputs, force)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for o in outputs:
        ftype = metadata.FILE_TYPE[o.qtype]
        n_params = sum(p.n_params for p in o.plans)
        if o.kind == "decoder":
            arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN35]

            def meta(w, o=o, ftype=ftype, n_params=n_params):
                metadata.general(w, ckpt, n_params, name, mmproj=False)
                metadata.decoder(w, ckpt, ftype)
        else:
            arch = "clip"

            def meta(w, o=o, ftype=ftype, n_params=n_params):
                metadata.general(w, ckpt, n_params, name, mmproj=True)
                metadata.mmproj(w, ckpt, ftype, o.mode)
        write_gguf(o.path, arch, o.plans, ckpt, meta, quiet=quiet, allow_nonfinite=allow_nonfinite,
                   desc=o.path.name)
        entries.append(manifest.artifact_entry(o.path, kind=o.kind, format="gguf", quant=quant.lower(),
                                               mode=o.mode, n_tensors=len(o.plans)))
    manifest.write(out_dir, source_info(ckpt), entries)
    return [o.path for o in outputs]
