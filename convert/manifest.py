"""manifest.json: what an output folder holds, where it came from, and how to check it.

Deterministic (no timestamps): the same export gives the same manifest bytes. Entries of
earlier runs into the same folder are kept while their files exist, so the manifest always
describes the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from importlib import metadata as im
from pathlib import Path

MANIFEST = "manifest.json"
TOOL = "minicpmv-edge"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in (TOOL, "gguf", "numpy", "safetensors", "torch", "transformers", "tokenizers", "onnx", "onnxruntime",
                "onnxscript"):
        try:
            out[pkg] = im.version(pkg)
        except im.PackageNotFoundError:
            pass
    return out


def read(folder: Path) -> dict | None:
    p = Path(folder) / MANIFEST
    if not p.is_file():
        return None
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except ValueError:
        return None
    return m if isinstance(m, dict) and m.get("tool") == TOOL else None


def own_files(folder: Path) -> set[str]:
    """Files an earlier run of this tool wrote into the folder (per its manifest)."""
    m = read(folder)
    return {a["file"] for a in m.get("artifacts", [])} if m else set()


def write(folder: Path, source: dict, artifacts: list[dict]) -> Path:
    folder = Path(folder)
    prev = read(folder) or {}
    new_names = {a["file"] for a in artifacts}
    kept = [a for a in prev.get("artifacts", []) if a["file"] not in new_names and (folder / a["file"]).is_file()]
    allarts = sorted(kept + artifacts, key=lambda a: a["file"])
    return write_doc(folder, {"tool": TOOL, "source": source, "versions": versions(), "artifacts": allarts})


def write_doc(folder: Path, doc: dict) -> Path:
    """Write a manifest document atomically (temporary name, then rename)."""
    p = Path(folder) / MANIFEST
    write_text_atomic(p, json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return p


def write_text_atomic(path: Path, text: str) -> None:
    """Write under a temporary name, then rename; the temporary file goes on any failure or interrupt."""
    tmp = path.with_name(f".{path.name}.partial")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def artifact_entry(path: Path, **fields) -> dict:
    path = Path(path)
    return {"file": path.name, "size": path.stat().st_size, "sha256": sha256_file(path), **fields}
