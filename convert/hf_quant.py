"""Write a quantized Hugging Face checkpoint folder (GPTQ v1, AWQ GEMM or compressed-tensors
pack-quantized) from per-linear `QuantizedWeight` results, loadable by transformers 5.23 on CPU.

The folder is complete on its own: safetensors weights (quantized linears in the format's tensors,
everything else copied byte for byte from the source or taken from `dense_updates`), `config.json`
with a `quantization_config` the real loaders accept for MiniCPM-V 4.6 (shared quantization.md
§1.2, §2.2, §3), the source's tokenizer/processor files, and `manifest.json`. Bytes are deterministic
(sorted tensor names, sorted JSON keys, no timestamps), and the folder is built under a temporary name
beside `out_dir` and renamed when complete.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
import struct
from dataclasses import dataclass
from importlib import metadata as im
from pathlib import Path

import torch

from quantize.packing import check, group_size_of, pack, packed_layout, trivial_g_idx
from quantize.qweight import QuantizedWeight, Scheme

from . import manifest
from .checkpoint import Checkpoint
from .errors import ConvertError
from .folder import staged_folder

FORMATS = ("gptq", "awq", "compressed-tensors")
BLOCK = "model.language_model.layers"  # the decoder layers: GPTQ's block_name_to_quantize
MAX_SHARD_BYTES = 2 << 30

# Module suffixes inside a decoder layer in the order GPTQ quantizes them, grouped by shared input
# (GPTQ's `modules_in_block_to_quantize` is a list of such groups). Suffixes not listed go last.
SEQUENTIAL_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
     "linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "linear_attn.in_proj_b", "linear_attn.in_proj_a"),
    ("self_attn.o_proj", "linear_attn.out_proj"),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)

# AWQ's loader converts every nn.Linear not listed in modules_to_not_convert; whole components left
# dense are listed by prefix, which keeps the list short and readable.
AWQ_DENSE_PREFIXES = ("model.vision_tower", "model.merger", "lm_head")

# Files of the source folder that are weights (rewritten or not carried over) or describe another
# artifact; everything else (tokenizer, processor, chat template, generation config, ...) is copied.
NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".h5", ".msgpack", ".partial")
NOT_COPIED_NAMES = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json",
                    manifest.MANIFEST, "validation.json", "validation.html")

CT_FORMAT_VERSION = "0.20.0"  # the compressed-tensors release whose layout is written (quantization.md §3.3)


@dataclass(frozen=True)
class _Tensor:
    name: str
    dtype: str  # safetensors' name, e.g. "I32"
    shape: tuple[int, ...]
    nbytes: int
    data: torch.Tensor | None = None  # an updated dense tensor
    module: str | None = None  # a quantized module's packed tensor, packed when written
    # neither: copy the source's bytes


def _tool_version() -> str:
    try:
        return im.version(manifest.TOOL)
    except im.PackageNotFoundError:
        return "unknown"


def _torch_dtype(d: torch.dtype | str | None, ckpt: Checkpoint) -> torch.dtype:
    """The model's float dtype: `d`, else the source config's (bf16 if it names none)."""
    name = d if d is not None else (ckpt.config.get("dtype") or ckpt.config.get("torch_dtype") or "bfloat16")
    if isinstance(name, torch.dtype):
        return name
    dt = getattr(torch, str(name).removeprefix("torch."), None)
    if dt not in (torch.float16, torch.bfloat16, torch.float32):
        raise ConvertError(f"dtype {name!r}: choose float16, bfloat16 or float32")
    return dt


_ST_TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
_ST_NAME = {v: k for k, v in _ST_TORCH.items()}


def linear_modules(ckpt: Checkpoint) -> list[str]:
    """Names of every nn.Linear of the model (lm_head included when tied), from the config alone:
    the model is built on the meta device, so no weights are read."""
    from transformers import AutoConfig, MiniCPMV4_6ForConditionalGeneration

    try:
        cfg = AutoConfig.from_pretrained(ckpt.path, local_files_only=True)
        with torch.device("meta"):
            model = MiniCPMV4_6ForConditionalGeneration(cfg)
    except Exception as e:  # transformers raises many types for a config it cannot build
        raise ConvertError(f"{ckpt.path}: cannot build the model from config.json ({e.__class__.__name__}: {str(e)[:200]})") from None
    return sorted(n for n, m in model.named_modules() if type(m) is torch.nn.Linear)


def _layer_suffix(name: str) -> str | None:
    """'model.language_model.layers.3.mlp.up_proj' -> 'mlp.up_proj'; None outside the decoder layers."""
    head, _, rest = name.partition(BLOCK + ".")
    if head or not rest:
        return None
    idx, _, suffix = rest.partition(".")
    return suffix if idx.isdigit() and suffix else None


# -- quantization_config per format ---------------------------------------------------------------

def _gptq_modules(quantized: set[str], linears: list[str]) -> list[list[str]]:
    """modules_in_block_to_quantize; checked against optimum's own selection rule (suffix match over
    every Linear under the block), so the loader replaces exactly the quantized modules."""
    outside = sorted(n for n in quantized if _layer_suffix(n) is None)
    if outside:
        raise ConvertError(f"GPTQ checkpoints quantize decoder layers only ({BLOCK}.N.*); {outside[0]} is outside")
    suffixes = {_layer_suffix(n) for n in quantized}
    replaced = {n for n in linears if n.startswith(BLOCK) and any(n.endswith(s) for s in suffixes)}
    if replaced != quantized:
        odd = sorted(replaced - quantized)[0]
        raise ConvertError(f"GPTQ needs the same modules quantized in every decoder layer: {odd} is left dense "
                           f"while {_layer_suffix(odd)} is quantized elsewhere")
    order = [s for g in SEQUENTIAL_GROUPS for s in g]
    groups = [[s for s in g if s in suffixes] for g in SEQUENTIAL_GROUPS]
    rest = sorted(suffixes - set(order))
    return [g for g in groups if g] + ([rest] if rest else [])


def _awq_not_convert(quantized: set[str], linears: list[str]) -> list[str]:
    """modules_to_not_convert: whole dense components by prefix, then suffixes dense in every layer,
    then any remaining full names; checked with transformers' own matcher."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    dense = [n for n in linears if n not in quantized]
    out = [p for p in AWQ_DENSE_PREFIXES
           if any(n == p or n.startswith(p + ".") for n in linears)
           and not any(n == p or n.startswith(p + ".") for n in quantized)]
    left = [n for n in dense if should_convert_module(n, out)]
    by_suffix: dict[str, list[str]] = {}
    for n in left:
        by_suffix.setdefault(_layer_suffix(n) or n, []).append(n)
    for suffix, names in sorted(by_suffix.items()):
        if suffix != names[0] and not any(q.endswith("." + suffix) for q in quantized):
            out.append(suffix)
        else:
            out.extend(names)
    wrong = [n for n in linears if should_convert_module(n, out) != (n in quantized)]
    if wrong:  # only if names collide in a way the suffix rule cannot express
        raise ConvertError(f"AWQ: cannot express which linears stay dense ({wrong[0]} would be misloaded)")
    return out


def quantization_config(fmt: str, results: dict[str, QuantizedWeight], linears: list[str], meta: dict) -> dict:
    """The `quantization_config` block of config.json for `fmt` (quantization.md §1.2, §2.2, §3.3)."""
    first = next(iter(results.values()))
    s = first.scheme
    gs = group_size_of(first)
    quantized = set(results)
    tag = {"quantizer": [f"{manifest.TOOL}:{_tool_version()}"], **meta}
    if fmt == "gptq":
        desc_act = s.act_order or not all(trivial_g_idx(qw) for qw in results.values())
        return {
            "quant_method": "gptq", "bits": s.bits, "group_size": gs, "desc_act": desc_act, "sym": s.sym,
            "lm_head": False, "format": "gptq", "checkpoint_format": "gptq", "pack_dtype": "int32",
            # TorchLinear: dequantize then matmul, exact; the default aten int4 kernel is not (~0.014 logits)
            "backend": "torch",
            "damp_percent": float(meta.get("damp_percent", 0.01)), "true_sequential": bool(meta.get("true_sequential", True)),
            "static_groups": bool(s.static_groups), "act_group_aware": bool(meta.get("act_group_aware", False)) and not desc_act,
            "block_name_to_quantize": BLOCK,
            "modules_in_block_to_quantize": _gptq_modules(quantized, linears),
            "meta": tag,
        }
    if fmt == "awq":
        return {
            "quant_method": "awq", "bits": s.bits, "group_size": gs, "zero_point": not s.sym, "version": "gemm",
            # AwqTorchLinear: dequantize then matmul, exact; the default aten kernel is not (~0.017 logits)
            "backend": "torch_awq",
            "modules_to_not_convert": _awq_not_convert(quantized, linears),
            "meta": tag,
        }
    weights = {"num_bits": s.bits, "type": "int", "symmetric": True, "dynamic": False,
               "strategy": "channel" if gs == -1 else "group", "group_size": None if gs == -1 else gs,
               "actorder": "static" if s.act_order else None}
    return {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "version": CT_FORMAT_VERSION,
        "config_groups": {"group_0": {"targets": ["Linear"], "format": "pack-quantized", "weights": weights,
                                      "input_activations": None, "output_activations": None}},
        "ignore": [n for n in linears if n not in quantized],
        "kv_cache_scheme": None, "sparsity_config": {}, "transform_config": {},
        "meta": tag,
    }


# -- validation -----------------------------------------------------------------------------------

def _check_results(ckpt: Checkpoint, fmt: str, results: dict[str, QuantizedWeight], linears: list[str]) -> None:
    if fmt not in FORMATS:
        raise ConvertError(f"unknown quantized checkpoint format {fmt!r}; choose {', '.join(FORMATS)}")
    if not results:
        raise ConvertError("no quantized weights to write")
    if "quantization_config" in ckpt.config:
        raise ConvertError(f"{ckpt.path}: the source is already quantized; start from a float checkpoint")
    lin = set(linears)
    first = next(iter(results.values()))
    for name, qw in results.items():
        if qw.name != name:
            raise ConvertError(f"result for {name} carries the name {qw.name}")
        if name not in lin:
            raise ConvertError(f"{name}: not a linear layer of this model")
        w = ckpt.info(f"{name}.weight") if f"{name}.weight" in ckpt else None
        if w is None or tuple(w.shape) != qw.shape:
            raise ConvertError(f"{name}: quantized shape {qw.shape} does not match the checkpoint's "
                               f"{tuple(w.shape) if w else 'missing weight'}")
        if (qw.scheme.bits, qw.scheme.sym, group_size_of(qw)) != (first.scheme.bits, first.scheme.sym, group_size_of(first)):
            raise ConvertError(f"{name}: scheme {qw.scheme} differs from {first.name}'s {first.scheme}; "
                               "one checkpoint holds one bits/group_size/sym setting")
        check(qw, fmt)


def _plan(ckpt: Checkpoint, fmt: str, results: dict[str, QuantizedWeight], dense_updates: dict[str, torch.Tensor],
          dtype: torch.dtype) -> list[_Tensor]:
    """Every output tensor, sorted by name. Quantized modules are checked here but packed only when
    written (packing all of them up front held ~1.1 GB more on the full-size model)."""
    owned = set()  # source tensors the packed ones replace
    out: list[_Tensor] = []
    for name, qw in results.items():
        owned.add(f"{name}.weight")
        check(qw, fmt, dtype)
        layout = packed_layout(qw, fmt, dtype)
        if "bias" in layout:
            owned.add(f"{name}.bias")
        for suffix, (dt, shape) in layout.items():
            out.append(_Tensor(f"{name}.{suffix}", _ST_NAME[dt], shape, math.prod(shape) * dt.itemsize, module=name))
    for name, t in dense_updates.items():
        if name not in ckpt:
            raise ConvertError(f"dense update {name}: no such tensor in the source checkpoint")
        if name in owned:
            raise ConvertError(f"dense update {name}: that tensor is replaced by a quantized module")
        info = ckpt.info(name)
        if tuple(t.shape) != info.shape:
            raise ConvertError(f"dense update {name}: shape {tuple(t.shape)} differs from the source's {info.shape}")
        t = t.detach().to("cpu", _ST_TORCH[info.dtype]).contiguous()
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ConvertError(f"dense update {name}: NaN or Inf values")
        out.append(_Tensor(name, info.dtype, info.shape, info.nbytes, data=t))
    for name in ckpt.names():
        if name not in owned and name not in dense_updates:
            info = ckpt.info(name)
            out.append(_Tensor(name, info.dtype, info.shape, info.nbytes))
    return sorted(out, key=lambda t: t.name)


def _shards(tensors: list[_Tensor], max_bytes: int) -> list[list[_Tensor]]:
    shards: list[list[_Tensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


class _Packer:
    """Packs one quantized module at a time for the writer; a module's tensors are adjacent in name
    order, so only the last module's are kept."""

    def __init__(self, fmt: str, results: dict[str, QuantizedWeight], dtype: torch.dtype):
        self.fmt, self.results, self.dtype = fmt, results, dtype
        self.module: str | None = None
        self.packed: dict[str, torch.Tensor] = {}

    def tensor(self, t: _Tensor) -> torch.Tensor:
        if t.module != self.module:
            self.module, self.packed = None, {}  # free the previous module's before packing the next
            self.packed = pack(self.results[t.module], self.fmt, self.dtype, checked=True)
            self.module = t.module
        v = self.packed[t.name[len(t.module) + 1:]]
        if (_ST_NAME[v.dtype], tuple(v.shape)) != (t.dtype, t.shape):  # packed_layout and pack disagree: a bug
            raise ConvertError(f"{t.name}: packed as {_ST_NAME[v.dtype]}{list(v.shape)}, planned {t.dtype}{list(t.shape)}")
        return v


def _write_safetensors(path: Path, ckpt: Checkpoint, shard: list[_Tensor], packer: _Packer) -> None:
    """One safetensors file written tensor by tensor: the header first, then each tensor's bytes in
    header order, source tensors copied from their file in slices (Checkpoint.copy_bytes), quantized
    modules packed one at a time. Memory holds one module, not the shard (safetensors' save_file
    takes them all at once: on the full-size model that was 1.5 GiB over the quantizer's own peak)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for t in shard:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [off, off + t.nbytes]}
        off += t.nbytes
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned, as save_file does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for t in shard:
            if t.data is None and t.module is None:
                ckpt.copy_bytes(t.name, f)
                continue
            v = t.data if t.module is None else packer.tensor(t)
            f.write(memoryview(v.contiguous().reshape(-1).view(torch.uint8).numpy()))


def _write_weights(ckpt: Checkpoint, folder: Path, tensors: list[_Tensor], max_bytes: int, packer: _Packer
                   ) -> list[Path]:
    # like safetensors' files, 0600: give them the mode the umask gives other files (as the folder's)
    mode = stat.S_IMODE(folder.stat().st_mode) & 0o666
    shards = _shards(tensors, max_bytes)
    n = len(shards)
    files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for fn, shard in zip(files, shards):
        _write_safetensors(folder / fn, ckpt, shard, packer)
        os.chmod(folder / fn, mode)
    paths = [folder / f for f in files]
    if n > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)},
                 "weight_map": {t.name: fn for fn, shard in zip(files, shards) for t in shard}}
        p = folder / "model.safetensors.index.json"
        p.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        paths.append(p)
    return paths


def copy_side_files(src: Path, dst: Path) -> list[Path]:
    """Copy the source folder's tokenizer, processor, chat template, generation config, ... into dst."""
    out = []
    for p in sorted(src.iterdir()):
        if p.is_file() and not p.name.startswith(".") and p.name not in NOT_COPIED_NAMES \
                and not p.name.endswith(NOT_COPIED_SUFFIXES):
            shutil.copyfile(p, dst / p.name)
            out.append(dst / p.name)
    return out


def check_out_dir(ckpt: Checkpoint, out_dir: Path, force: bool) -> None:
    if out_dir.resolve() == ckpt.path.resolve():
        raise ConvertError(f"--out {out_dir} is the source checkpoint folder; choose another folder")
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ConvertError(f"--out {out_dir}: exists and is not a folder")
    # an earlier checkpoint written here is replaced whole (a stale shard would be read with the new ones)
    ours = {f.split("/")[0] for f in manifest.own_files(out_dir)} | {manifest.MANIFEST, "validation.json",
                                                                      "validation.html"}
    other = sorted(p.name for p in out_dir.iterdir() if p.name not in ours)
    if other and not force:
        raise ConvertError(f"--out {out_dir} holds files this tool did not write ({', '.join(other[:3])}"
                           f"{', ...' if len(other) > 3 else ''}); choose an empty folder, or pass --force to replace it")


# -- the entry point ------------------------------------------------------------------------------

def write_quantized_checkpoint(ckpt: Checkpoint, result_weights: dict[str, QuantizedWeight], out_dir: str | os.PathLike,
                               fmt: str, *, dense_updates: dict[str, torch.Tensor] | None = None,
                               dtype: torch.dtype | str | None = None, meta: dict | None = None, quiet: bool = False,
                               force: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES,
                               extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write `out_dir`, a complete HF checkpoint folder holding `result_weights` in format `fmt`.

    result_weights: HF module name (e.g. "model.language_model.layers.0.mlp.up_proj") -> its result;
        one bits/group_size/sym scheme for all.
    dense_updates: HF tensor name -> new value for a tensor left dense (e.g. norms an AWQ scale was
        folded into); written in the source tensor's dtype.
    dtype: the model's float dtype, used for compressed-tensors scales (default: the source's).
    meta: algorithm facts recorded in quantization_config["meta"] (damp_percent, true_sequential,
        calibration, ...).
    extra_tensors: file name -> tensors, side files loaders ignore (AWQ's scales, which let the GGUF
        exporter rebuild the folded full-precision weights from the source).
    An out_dir holding an earlier output of this tool is replaced whole; a folder holding anything
    else is refused unless force=True, which replaces it (its files are deleted).
    """
    out_dir = Path(out_dir)
    dense_updates = dict(dense_updates or {})
    meta = dict(meta or {})
    try:
        json.dumps(meta)
    except TypeError as e:
        raise ConvertError(f"meta is not JSON-serializable ({e})") from None
    dt = _torch_dtype(dtype, ckpt)
    linears = linear_modules(ckpt)
    _check_results(ckpt, fmt, result_weights, linears)
    check_out_dir(ckpt, out_dir, force)
    qcfg = quantization_config(fmt, result_weights, linears, meta)
    tensors = _plan(ckpt, fmt, result_weights, dense_updates, dt)

    with staged_folder(out_dir) as tmp:
        weights = _write_weights(ckpt, tmp, tensors, max_shard_bytes, _Packer(fmt, result_weights, dt))
        cfg = {**ckpt.config, "quantization_config": qcfg}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        copied = copy_side_files(ckpt.path, tmp)
        from safetensors.torch import save_file

        for fname, tdict in sorted((extra_tensors or {}).items()):
            save_file({k: v.contiguous() for k, v in sorted(tdict.items())}, str(tmp / fname))
            copied.append(tmp / fname)
        from .gguf.export import source_info

        entries = [manifest.artifact_entry(p, kind="weights" if p.suffix == ".safetensors" else "index", format=fmt)
                   for p in weights]
        entries.append(manifest.artifact_entry(tmp / "config.json", kind="config", format=fmt, quantization=qcfg))
        entries += [manifest.artifact_entry(p, kind="copied") for p in copied]
        manifest.write(tmp, source_info(ckpt), entries)
        size = sum(p.stat().st_size for p in weights)
    if not quiet:
        print(f"wrote {out_dir}: {fmt}, {len(result_weights)} quantized linears, {len(weights)} weight file(s), "
              f"{size / 2**20:.2f} MiB")
    return out_dir


# -- reading a folder back ------------------------------------------------------------------------

# packed tensor suffixes per format: a module M is quantized when M.<first suffix> exists
PACKED_SUFFIXES = {"gptq": ("qweight", "qzeros", "scales", "g_idx"), "awq": ("qweight", "qzeros", "scales"),
                   "compressed-tensors": ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point",
                                          "weight_g_idx")}


def scheme_of(qcfg: dict) -> tuple[str, Scheme]:
    """(format, scheme) of a quantization_config this module writes (or a compatible one)."""
    fmt = qcfg.get("quant_method")
    if fmt == "gptq":
        return fmt, Scheme(int(qcfg["bits"]), int(qcfg["group_size"]), bool(qcfg.get("sym", True)),
                           bool(qcfg.get("desc_act", False)), bool(qcfg.get("static_groups", False)))
    if fmt == "awq":
        return fmt, Scheme(int(qcfg["bits"]), int(qcfg["group_size"]), not bool(qcfg.get("zero_point", True)))
    if fmt == "compressed-tensors":
        w = next(iter(qcfg["config_groups"].values()))["weights"]
        return fmt, Scheme(int(w["num_bits"]), int(w.get("group_size") or -1), bool(w.get("symmetric", True)),
                           w.get("actorder") is not None)
    raise ConvertError(f"quant_method {fmt!r} is not one of {', '.join(FORMATS)}")


def read_quantized(folder: str | os.PathLike) -> tuple[str, dict[str, QuantizedWeight], dict[str, torch.Tensor]]:
    """(format, {module: QuantizedWeight}, {tensor: dense tensor}) of a quantized folder."""
    from safetensors import safe_open

    from quantize.packing import UNPACKERS

    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    fmt, scheme = scheme_of(cfg.get("quantization_config") or {})
    raw: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("model*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                raw[k] = sf.get_tensor(k)
    suffixes = PACKED_SUFFIXES[fmt]
    modules = sorted(k[: -len(suffixes[0]) - 1] for k in raw if k.endswith("." + suffixes[0]))
    weights = {}
    for m in modules:
        parts = {s: raw.pop(f"{m}.{s}") for s in suffixes if f"{m}.{s}" in raw}
        weights[m] = UNPACKERS[fmt](parts, scheme, m)
    return fmt, weights, raw
