"""A recipe's artifacts as parts, one per format: what each exporter is given, where its files sit in
the bundle, and a build key that lets a re-run reuse files an earlier bundle already holds.

The GGUF files sit at the bundle's top, as in the GGUF model repos the apps download from; every
other format keeps its exporter's own folder layout (onnx-community, ExecuTorch, Core ML) in a
subfolder, its own manifest.json inside."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint import Checkpoint
from ..errors import ConvertError
from .. import manifest

BASENAME = "MiniCPM-V-4.6"
SUBDIRS = {"onnx": f"{BASENAME}-ONNX", "executorch": f"{BASENAME}-ExecuTorch", "coreml": f"{BASENAME}-CoreML"}
IMATRIX_FILE = "imatrix.gguf"


@dataclass
class Part:
    kind: str  # gguf | onnx | executorch | coreml
    options: dict  # what the exporter is given (recorded in the manifest)
    key: str = ""
    files: list[str] = field(default_factory=list)  # bundle-relative paths, once built
    reused: bool = False

    @property
    def subdir(self) -> str:
        return SUBDIRS.get(self.kind, "")


def plan_parts(recipe) -> list[Part]:
    g = recipe.gguf
    modes = sorted(set(g["modes"]), reverse=True)  # 16x first: the apps' mode
    mode = modes[0] if len(modes) == 1 else "both"
    parts = [Part("gguf", {"decoder": g["decoder"], "projector": g["projector"], "mode": mode,
                           "imatrix": bool(g.get("imatrix", False))})]
    if recipe.onnx.get("enabled"):
        parts.append(Part("onnx", {"quant": recipe.onnx.get("quant", "fp32"), "ort": recipe.onnx.get("ort", False),
                                   "mode": mode}))
    if recipe.executorch.get("enabled"):
        parts.append(Part("executorch", {"quant": recipe.executorch.get("quant", "8da4w"), "mode": mode}))
    if recipe.coreml.get("enabled"):  # Core ML packages take one mode each
        parts.append(Part("coreml", {"parts": ",".join(recipe.coreml.get("parts", ["vision"])), "mode": modes[0]}))
    return parts


def source_fingerprint(ckpt: Checkpoint) -> dict:
    """The source as the build keys see it: its config and tensor index, and every file's size and
    modification time (a changed weight file means a rebuild; reading gigabytes to know is not needed)."""
    from ..gguf.export import source_info

    files = sorted(p for p in ckpt.path.iterdir() if p.is_file())
    stamp = hashlib.sha256()
    for p in files:
        st = p.stat()
        stamp.update(f"{p.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return {**source_info(ckpt), "files_stamp": stamp.hexdigest()}


def set_keys(parts: list[Part], source: dict) -> None:
    vers = manifest.versions()
    for p in parts:
        doc = {"kind": p.kind, "options": p.options, "source": source, "versions": vers}
        p.key = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def md5_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def reuse(part: Part, old: dict | None, old_dir: Path, dest: Path) -> bool:
    """Link an earlier bundle's files of this part into `dest` when its build key matches and every
    file still has the size and sha256 its manifest recorded."""
    if not old or old.get("build_keys", {}).get(part.kind) != part.key:
        return False
    entries = [a for a in old.get("artifacts", []) if a.get("part") == part.kind]
    if not entries:
        return False
    for a in entries:
        f = old_dir / a["file"]
        if not f.is_file() or f.stat().st_size != a.get("size") or manifest.sha256_file(f) != a.get("sha256"):
            return False
    extra = old.get("part_files", {}).get(part.kind, [])  # the exporter's own manifest, side files
    for rel in [a["file"] for a in entries] + extra:
        src, dst = old_dir / rel, dest / rel
        if not src.is_file():
            return False
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    part.files = [a["file"] for a in entries]
    part.reused = True
    return True


def export(part: Part, ckpt: Checkpoint, dest: Path, *, quiet: bool) -> None:
    """Run the part's exporter into the staged bundle; `part.files` lists the model files written."""
    o = part.options
    if part.kind == "gguf":
        from ..gguf.export import export_gguf

        imatrix = None
        if o["imatrix"]:
            imatrix = _imatrix(ckpt, dest / IMATRIX_FILE, quiet=quiet)
        work = dest / ".gguf-build"
        paths = export_gguf(ckpt, work, quant=o["decoder"], mmproj_quant=o["projector"], mode=o["mode"],
                            quiet=quiet, imatrix=imatrix, imatrix_name=IMATRIX_FILE)
        for p in paths:
            os.replace(p, dest / p.name)
        shutil.rmtree(work)
        part.files = [p.name for p in paths] + ([IMATRIX_FILE] if imatrix else [])
        return
    sub = dest / part.subdir
    if part.kind == "onnx":
        from ..onnx.export import export_onnx

        export_onnx(ckpt, sub, quant=o["quant"], mode=o["mode"], ort_format=o["ort"], quiet=quiet)
    elif part.kind == "executorch":
        from ..executorch.export import export_executorch

        export_executorch(ckpt, sub, quant=o["quant"], mode=o["mode"], quiet=quiet)
    elif part.kind == "coreml":
        from ..coreml.export import export_coreml

        export_coreml(ckpt, sub, parts=o["parts"], mode=o["mode"], quiet=quiet)
    else:  # the recipe schema admits no other kind
        raise ConvertError(f"no exporter for {part.kind}")
    part.files = sorted(p.relative_to(dest).as_posix() for p in sub.rglob("*")
                        if p.is_file() and p.name != manifest.MANIFEST)


def side_files(part: Part, dest: Path) -> list[str]:
    """Files of the part that are not model files: the exporter's own manifest."""
    if not part.subdir:
        return []
    m = dest / part.subdir / manifest.MANIFEST
    return [m.relative_to(dest).as_posix()] if m.is_file() else []


def _imatrix(ckpt: Checkpoint, path: Path, *, quiet: bool) -> Path:
    """An importance matrix from the project's default image+text calibration set (quantize imatrix)."""
    from quantize.calibration import DEFAULT_SEQLEN, load_calibration
    from quantize.imatrix import write_imatrix_gguf

    from ..gguf.imatrix import collect_imatrix

    samples, dataset = load_calibration("default", tokenizer=ckpt.tokenizer)
    data = collect_imatrix(ckpt, samples, seqlen=DEFAULT_SEQLEN, datasets=[dataset], quiet=quiet)
    return write_imatrix_gguf(path, data)
