"""An ONNX folder (`python -m convert onnx`) as a validation artifact, run by ONNX Runtime.

Static checks: every weight the files hold, read back by name (validate/onnx_weights.py), against the
source checkpoint: float32 bit-exact, float16 equal to the source rounded to float16, int4 within
INT4_RTN_FACTOR of plain round-to-nearest's error on the same blocks (the quantizers are k_quant, HQQ
or RTN; a wrong layout or a misnamed weight is off by orders of magnitude). The fake-quant reference
is the model carrying the files' own (dequantized) weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from convert import manifest
from convert.checkpoint import Checkpoint
from convert.errors import ConvertError

from .artifacts import Projector

LABELS = {"fp32": "F32", "fp16": "F16", "int4": "INT4"}  # the vision encoder's, for the projector tolerances
INT4_RTN_FACTOR = 1.5


def is_onnx_folder(folder: Path) -> bool:
    m = manifest.read(folder)
    return bool(m and isinstance((m.get("source") or {}).get("onnx"), dict))


def _rtn_sym_error(w: np.ndarray, block: int) -> float:
    """Frobenius error of symmetric 4-bit round-to-nearest on blocks of `block` along the input axis."""
    n, k = w.shape
    pad = (-k) % block
    x = np.pad(w, ((0, 0), (0, pad))).reshape(n, -1, block)
    amax = np.abs(x).max(-1, keepdims=True)
    scale = np.where(amax > 0, amax / 7.0, 1.0)
    q = np.clip(np.round(x / scale), -8, 7) * scale
    return float(np.linalg.norm((q - x).reshape(n, -1)[:, :k]))


def fp16_as_converted(x: np.ndarray) -> np.ndarray:
    """What onnxruntime's float16 converter stores for float32 x: magnitudes below its min_positive_val
    (5.96e-8, fp16's smallest subnormal) raised to it, beyond 65504 clipped, then rounded to float16."""
    tiny = np.float32(5.96e-08)
    y = np.where((x > 0) & (x < tiny), tiny, x)
    y = np.where((y < 0) & (y > -tiny), -tiny, y)
    return np.clip(y, -65504.0, 65504.0).astype(np.float16).astype(np.float32)


@dataclass
class OnnxArtifact:
    folder: Path
    config: dict
    onnx: dict  # the manifest's source.onnx: quant, modes, files, portable
    runtime: str | None = "onnxruntime"
    _files: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.folder.name} (onnx {self.onnx['quant']})"

    @property
    def label(self) -> str:
        return f"onnx-{self.onnx['quant']}"  # its own key in tolerances.json (conversion.by_type, quality_budget)

    @property
    def roles(self) -> dict[str, Path]:
        if not self._files:
            from runtimes.onnxruntime import onnx_files

            self._files = onnx_files(self.folder)
        return self._files

    @property
    def mmproj(self) -> dict[str, Projector]:
        vq = "fp32" if self.onnx["quant"] == "fp32" else "fp16"
        return {r.split("_")[1]: Projector(p, LABELS[vq]) for r, p in self.roles.items() if r.startswith("vision_")}

    @property
    def files(self) -> list[Path]:
        return sorted(p for f in self.roles.values() for p in f.parent.glob(f.name + "*"))

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for r, f in self.roles.items() if not r.startswith("vision")
                   for p in f.parent.glob(f.name + "*"))

    def describe(self) -> dict:
        return {"folder": str(self.folder), "format": "onnx", "quant": self.onnx["quant"],
                "gated_deltanet": "portable" if self.onnx.get("portable") else "fused",
                "files": {r: p.name for r, p in self.roles.items()}}

    def runtime_kwargs(self, mode: str, profile) -> dict:
        return {"folder": str(self.folder), "mode": mode, "n_threads": profile.threads}

    def static_checks(self, ckpt: Checkpoint, *, imatrix=None, quiet: bool = True) -> list[dict]:
        from .artifacts import manifest_check_folder

        return [manifest_check_folder(self.folder, self.files), check_weights(ckpt, self.roles)]

    def fake_quant_key(self, imatrix=None) -> tuple:
        return ("onnx", str(self.folder), self.onnx["quant"])

    def fake_quant_reference(self, ckpt: Checkpoint, *, threads=None, imatrix=None, base=None):
        if self.onnx["quant"] == "fp32":
            return None
        from .references import Reference

        return Reference.from_onnx(ckpt, self.roles, threads=threads)


def read_onnx(folder: str | Path) -> OnnxArtifact:
    folder = Path(folder).absolute()
    m = manifest.read(folder)
    if not m or not isinstance((m.get("source") or {}).get("onnx"), dict):
        raise ConvertError(f"{folder}: no manifest.json of an ONNX export")
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConvertError(f"{folder}: no readable config.json ({e})") from None
    art = OnnxArtifact(folder, cfg, m["source"]["onnx"])
    import onnx

    for p in art.roles.values():  # missing or unparsable files are bad input, said now
        try:
            onnx.load(str(p), load_external_data=False)
        except Exception as e:
            raise ConvertError(f"{p}: not a readable ONNX model ({e.__class__.__name__}: "
                               f"{str(e).splitlines()[0][:120] if str(e) else 'unparsable'})") from None
    return art


def _role(role: str) -> str:
    return "vision" if role.startswith("vision") else role


def artifact_weights(roles: dict[str, Path]) -> dict:
    """HF name -> the weight as the files hold it (the first vision encoder for shared vision weights)."""
    from .onnx_weights import read_weights

    out = {}
    for role, path in roles.items():
        for w in read_weights(path, _role(role)):
            out.setdefault(w.hf_name, w)
    return out


def check_weights(ckpt: Checkpoint, roles: dict[str, Path]) -> dict:
    try:
        weights = artifact_weights(roles)
    except Exception as e:  # a file onnx cannot parse, or an unreadable quantized layout
        return {"check": "tensors", "status": "fail", "message": f"cannot read the weights ({e.__class__.__name__}: "
                f"{str(e).splitlines()[0][:160]})"}
    names = set(ckpt.names())
    problems: list[str] = []
    worst = {"float32": 0.0, "float16": 0.0, "int4": 0.0}
    for hf, w in sorted(weights.items()):
        src_name = hf if hf in names else ("model.language_model.embed_tokens.weight"
                                           if hf == "lm_head.weight" and ckpt.spec.tie_word_embeddings else None)
        if src_name is None:
            problems.append(f"{w.onnx_name}: no tensor {hf} in the checkpoint")
            continue
        src = ckpt.tensor(src_name).astype(np.float32)
        if src.shape != w.value.shape:
            problems.append(f"{w.onnx_name}: shape {list(w.value.shape)}, the checkpoint's {hf} is {list(src.shape)}")
            continue
        if w.dtype == "float32" or w.dtype == "float16":
            want = src if w.dtype == "float32" else fp16_as_converted(src)
            d = float(np.abs(want - w.value).max())
            worst[w.dtype] = max(worst[w.dtype], d)
            if d != 0:
                problems.append(f"{w.onnx_name}: differs from the checkpoint's {hf} (max |diff| {d:.3g})")
        else:
            w2 = src if src.ndim == 2 else src.reshape(src.shape[0], -1)
            ratio = float(np.linalg.norm(w.value.reshape(w2.shape) - w2)) / max(_rtn_sym_error(w2, w.block_size), 1e-30)
            worst["int4"] = max(worst["int4"], ratio)
            if ratio > INT4_RTN_FACTOR:
                problems.append(f"{w.onnx_name}: 4-bit error {ratio:.2f}x plain RTN's (limit {INT4_RTN_FACTOR})")
    matrices = {n for n in names if len(ckpt.info(n).shape) >= 2 and not n.startswith("mtp.")
                and not (n.startswith("model.vision_tower.vit_merger.") and "vision_16x" not in roles)}
    missing = sorted(matrices - set(weights))
    if missing:
        problems.append(f"{len(missing)} checkpoint matrices are in no ONNX file by name, e.g. {missing[0]}")
    n_vec = sum(1 for n in names - set(weights) if len(ckpt.info(n).shape) < 2)
    detail = (f"{len(weights)} weights read back; float32 bit-exact, float16 = source rounded, int4 worst "
              f"{worst['int4']:.2f}x RTN's error; {n_vec} vectors folded into derived constants (norm 1+w, -exp(A_log)) "
              "are not checked by name")
    if problems:
        return {"check": "tensors", "status": "fail", "message": problems[0], "details": problems}
    return {"check": "tensors", "status": "pass", "message": detail}
