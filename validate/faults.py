"""Planted faults: good GGUFs edited into broken ones, the harness's own acceptance test.

Each fault is what a converter bug would write: a transform left out, two tensors swapped, a
metadata key wrong, a tokenizer short of a merge, a projector laid out wrong. The harness must
fail every one of them on every checkpoint (tests/test_validate_harness.py, bench/trust_sweep.py).
Faults that need a shape the model does not have (two layers of the same type, a square vision
matrix) are left out for that model, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFValueType, GGUFWriter


def rewrite(src, dst, *, kv=None, data=None, types=None, drop=(), arch=None):
    """Copy a GGUF through gguf-py's reader and writer, changing keys (same value type), tensor
    data (raw; same type unless given in `types`) or dropping tensors/keys; everything else is kept."""
    kv, data, types = kv or {}, data or {}, types or {}
    r = GGUFReader(src)
    w = GGUFWriter(dst, arch or r.fields["general.architecture"].contents())
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in drop:
            continue
        sub = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
        w.add_key_value(name, kv.get(name, f.contents()), f.types[0], sub_type=sub)
    for t in r.tensors:
        if t.name not in drop:
            w.add_tensor(t.name, np.array(data.get(t.name, t.data)), raw_dtype=types.get(t.name, T(t.tensor_type)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def raw(path, name):
    return next(t for t in GGUFReader(path).tensors if t.name == name).data


def _kv(path, name):
    return GGUFReader(path).fields[name].contents()


def _tensor_names(path) -> dict[str, tuple]:
    return {t.name: (tuple(int(x) for x in t.shape), t.tensor_type.name) for t in GGUFReader(path).tensors}


# -- the faults: (decoder, projector, out folder) -> (edited decoder, edited projector) or a reason string


def _norm(dec, mm, d):
    return rewrite(dec, d / "dec.gguf", data={"blk.0.attn_norm.weight": np.array(raw(dec, "blk.0.attn_norm.weight"))
                                             - np.float32(1)}), mm


def _swap(dec, mm, d):
    t = _tensor_names(dec)
    if t.get("blk.0.ffn_up.weight") != t.get("blk.1.ffn_up.weight"):
        return "blk.0 and blk.1 ffn_up differ in shape or type"
    return rewrite(dec, d / "dec.gguf", data={"blk.0.ffn_up.weight": raw(dec, "blk.1.ffn_up.weight"),
                                              "blk.1.ffn_up.weight": raw(dec, "blk.0.ffn_up.weight")}), mm


def _rope_dim(dec, mm, d):
    return rewrite(dec, d / "dec.gguf", kv={"qwen35.rope.dimension_count": 2 * _kv(dec, "qwen35.rope.dimension_count")}), mm


def _merge(dec, mm, d):
    merges = _kv(dec, "tokenizer.ggml.merges")
    return rewrite(dec, d / "dec.gguf", kv={"tokenizer.ggml.merges": merges[:3] + merges[4:]}), mm


def _scale_factor(dec, mm, d):
    return dec, rewrite(mm, d / "mmproj.gguf", kv={"clip.vision.projector.scale_factor": 2})


def _ssm_a_sign(dec, mm, d):
    name = next(n for n in sorted(_tensor_names(dec), key=lambda n: (len(n), n)) if n.endswith(".ssm_a"))
    return rewrite(dec, d / "dec.gguf", data={name: -np.array(raw(dec, name))}), mm


def _transposed_projector(dec, mm, d):
    name = "v.blk.0.attn_q.weight"
    w = np.array(raw(mm, name))
    if w.ndim != 2 or w.shape[0] != w.shape[1] or _tensor_names(mm)[name][1] not in ("F16", "F32", "BF16"):
        return f"{name} is not a square float matrix"
    return dec, rewrite(mm, d / "mmproj.gguf", data={name: np.ascontiguousarray(w.T)})


def _freq_base(dec, mm, d):
    base = float(_kv(dec, "qwen35.rope.freq_base"))
    return rewrite(dec, d / "dec.gguf", kv={"qwen35.rope.freq_base": 10000.0 if base != 10000.0 else 1e6}), mm


@dataclass(frozen=True)
class Fault:
    name: str
    about: str
    plant: Callable  # (decoder, projector, folder) -> (decoder, projector) | reason str
    names: str  # what the static checks must name
    new: bool = False  # added with the trust sweep (the harness tests planted the first five)


FAULTS: dict[str, Fault] = {f.name: f for f in (
    Fault("norm", "an RMSNorm without its +1", _norm, "blk.0.attn_norm.weight"),
    Fault("swap", "two layers' ffn_up swapped", _swap, "blk.0.ffn_up.weight"),
    Fault("rope-dim", "rope.dimension_count doubled", _rope_dim, "qwen35.rope.dimension_count"),
    Fault("merge", "one BPE merge missing", _merge, "tokenizer.ggml.merges"),
    Fault("scale-factor", "the projector's scale_factor of the wrong mode", _scale_factor,
          "clip.vision.projector.scale_factor"),
    Fault("ssm-a-sign", "Gated DeltaNet's A with the wrong sign (A_log's -exp left out)", _ssm_a_sign, ".ssm_a", True),
    Fault("transposed-projector", "a vision attention matrix transposed", _transposed_projector,
          "v.blk.0.attn_q.weight", True),
    Fault("freq-base", "a wrong rope.freq_base", _freq_base, "qwen35.rope.freq_base", True),
)}


def plant(fault: str, decoder: Path, mmproj: Path, folder: Path) -> tuple[Path, Path] | str:
    """Write the faulty copy into `folder` (created); (decoder, projector) to validate, or why the
    fault does not apply to this model."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return FAULTS[fault].plant(Path(decoder), Path(mmproj), folder)


def massive_activations(src: Path, dst: Path, layer: int = 0, norm_gain: float = 4.0) -> Path:
    """A checkpoint whose decoder layer `layer` writes activations of about 1e6 into the residual
    stream (its MLP's input norm scaled by `norm_gain`, its down_proj by the largest factor that
    float16 still stores), as models with "massive activations" do. Every runtime that sums in
    float32 computes it like the reference; llama.cpp's F16 matmuls on an ARM CPU with fp16
    arithmetic (armv8.2-a+fp16: the phone apps' build) sum in float16 and overflow. The fault that
    only the phone profile can see (tests/test_phone.py)."""
    import shutil

    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    files = sorted(src.glob("*.safetensors"))
    pre = f"model.language_model.layers.{layer}."
    for f in files:
        tensors = load_file(f)
        for name in list(tensors):
            t = tensors[name]
            if name == pre + "post_attention_layernorm.weight":  # Qwen3.5's RMSNorm scales by (1 + w)
                tensors[name] = ((1.0 + t.float()) * norm_gain - 1.0).to(t.dtype)
            elif name == pre + "mlp.down_proj.weight":
                w = t.float()
                tensors[name] = (w * (0.5 * 65504.0 / float(w.abs().max()))).to(t.dtype)
        save_file(tensors, dst / f.name, metadata={"format": "pt"})
    for f in src.glob("*.index.json"):
        shutil.copy2(f, dst / f.name)
    return dst
