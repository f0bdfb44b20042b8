"""A quantized HF folder (GPTQ v1, AWQ GEMM, compressed-tensors pack-quantized; convert/hf_quant.py)
read as a dense float checkpoint, so every exporter and the PyTorch reference take it like any other.

`names()` lists each quantized module's `M.weight` (float32, shape (out, in)) in place of its packed
tensors; everything else is the folder's own tensors. Where `M.weight` comes from (`dense_kind`):

* "awq-folded": an AWQ folder with `awq_scales.safetensors` whose source checkpoint is at hand (the
  path manifest.json records, or `source=`). The folded full-precision model is rebuilt from the
  source: every scaled linear's weight with its columns x in_scale and rows / out_scale, the norms
  the scales were folded into, in float32 with the quantizer's own arithmetic. The activation-aware
  scaling is the point of AWQ; re-quantizing dequantized int4 weights (to Q4_K, say) stacks two
  errors. The fold is exact, so this view computes the source model's function.
* "dequantized": otherwise (GPTQ, compressed-tensors, AWQ without its scales or source) the packed
  int4 weights dequantized to float32, i.e. the fake-quantized model the folder holds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .checkpoint import Checkpoint, TensorInfo, resolve_model_path
from .errors import ConvertError

__all__ = ["QuantizedCheckpoint", "open_checkpoint", "AWQ_SCALES", "DENSE_KINDS"]

AWQ_SCALES = "awq_scales.safetensors"  # written by `python -m quantize awq` beside the weights
DENSE_KINDS = ("awq-folded", "dequantized")

# quant_method -> (the tensor naming a packed module, every suffix its packed form consists of)
PACKED = {
    "gptq": ("qweight", ("qweight", "qzeros", "scales", "g_idx")),
    "awq": ("qweight", ("qweight", "qzeros", "scales")),
    "compressed-tensors": ("weight_packed", ("weight_packed", "weight_scale", "weight_shape")),
}
# compressed-tensors suffixes of layouts this reader does not decode (asymmetric, act-order)
CT_UNSUPPORTED = ("weight_zero_point", "weight_g_idx")
# The folded dense tensors stored in the folder went through the source dtype (bf16 usually); the
# float32 recomputation must round to them within a few storage ulps (2^-9 for bf16).
FOLD_CHECK_REL = 2.0 ** -6


def _scheme(qcfg: dict, path: Path):
    """The Scheme (bits, group size, sym) a quantization_config describes (convert.hf_quant.scheme_of),
    for the layouts this reader decodes."""
    from .hf_quant import scheme_of

    if qcfg.get("quant_method") == "compressed-tensors":
        if qcfg.get("format") != "pack-quantized":
            raise ConvertError(f"{path}: compressed-tensors format {qcfg.get('format')!r} is not read here (only pack-quantized)")
        if len(qcfg.get("config_groups") or {}) != 1:
            raise ConvertError(f"{path}: compressed-tensors with other than one config group is not read here")
    try:
        return scheme_of(qcfg)[1]
    except ConvertError as e:
        raise ConvertError(f"{path}: {e}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ConvertError(f"{path}: malformed quantization_config ({e.__class__.__name__}: {e})") from None


class QuantizedCheckpoint(Checkpoint):
    """A dense float32 view of a GPTQ / AWQ / compressed-tensors folder (see the module docstring).

    source: the AWQ folder's full-precision source checkpoint, overriding the path manifest.json
        records (e.g. after moving it); a given source that does not match the folder is an error,
        a recorded one that is missing or does not match falls back to dequantizing, with a note.
    """

    # The PyTorch reference builds the model from `config` minus quantization_config and loads this
    # view's tensors, instead of going through transformers' quantized loaders.
    dense_view = True

    def __init__(self, src: str | os.PathLike, *, source: str | os.PathLike | None = None, quiet: bool = False):
        super().__init__(src)
        self._view: dict[str, TensorInfo] = {}
        qcfg = self.config.get("quantization_config")
        if not isinstance(qcfg, dict):
            raise ConvertError(f"{self.path}: not a quantized checkpoint (config.json has no quantization_config)")
        self.method = str(qcfg.get("quant_method"))
        self.scheme = _scheme(qcfg, self.path)
        self.modules = self._packed_modules()
        self.source: Checkpoint | None = None
        self._in_scales: dict[str, np.ndarray] = {}
        self._out_scales: dict[str, np.ndarray] = {}
        self._folded: dict[str, tuple] = {}  # name -> how to rebuild it from the source (awq-folded)
        if source is not None and self.method != "awq":
            raise ConvertError(f"--awq-source: {self.path} is a {self.method} checkpoint, not AWQ")
        reason = self._setup_awq_fold(source) if self.method == "awq" else None
        self.dense_kind = "awq-folded" if self.source is not None else "dequantized"
        if self.dense_kind == "awq-folded":
            self.note = f"{self.name}: AWQ's folded full-precision weights, rebuilt from {self.source.path}"
        elif self.method == "awq":
            self.note = (f"note: {self.name}: AWQ's folded full-precision weights are unavailable ({reason}); "
                         "the int4 weights are dequantized (re-quantizing them stacks two errors)")
        else:
            self.note = f"{self.name}: the {self.method} int{self.scheme.bits} weights are dequantized to float32"
        if self.method == "awq" and not quiet:
            print(self.note)
        self._view = self._build_view()

    def _index(self) -> dict[str, TensorInfo]:
        # without an index.json Checkpoint reads every *.safetensors: the AWQ scales are not weights
        return {n: ti for n, ti in super()._index().items() if ti.file.name != AWQ_SCALES}

    # -- the packed modules ----------------------------------------------------------------------
    def _packed_modules(self) -> dict[str, dict[str, str]]:
        """module name -> {suffix: stored tensor name} of every packed module."""
        marker, suffixes = PACKED[self.method]
        stored = self._infos
        out = {}
        for n in stored:
            if not n.endswith("." + marker):
                continue
            m = n[: -len(marker) - 1]
            missing = [s for s in suffixes if f"{m}.{s}" not in stored]
            if missing:
                raise ConvertError(f"{self.path}: quantized module {m} has no {missing[0]} tensor")
            odd = [s for s in CT_UNSUPPORTED if f"{m}.{s}" in stored] if self.method == "compressed-tensors" else []
            if odd:
                raise ConvertError(f"{self.path}: {m}.{odd[0]}: asymmetric or act-order compressed-tensors is not read here")
            if f"{m}.weight" in stored:
                raise ConvertError(f"{self.path}: {m} has both a packed and a dense weight")
            out[m] = {s: f"{m}.{s}" for s in suffixes}
        if not out:
            raise ConvertError(f"{self.path}: quantization_config says {self.method}, but no tensor is packed "
                               f"(no *.{marker})")
        return out

    def _stored_torch(self, name: str):
        import torch

        a = np.array(super().raw(name))  # a copy out of the mmap
        super().release(name)
        t = torch.from_numpy(a)
        return t.view(torch.bfloat16) if self._infos[name].dtype == "BF16" else t

    def _shape(self, module: str) -> tuple[int, int]:
        parts = self.modules[module]
        if self.method == "compressed-tensors":
            out_f, in_f = (int(x) for x in self._stored_torch(parts["weight_shape"]))
            return out_f, in_f
        qw = self._infos[parts["qweight"]].shape
        if self.method == "gptq":  # qweight [in / pf, out]; g_idx [in]
            return qw[1], self._infos[parts["g_idx"]].shape[0]
        return qw[1] * (32 // self.scheme.bits), qw[0]  # AWQ: qweight [in, out / pf]

    def dequantized(self, module: str) -> np.ndarray:
        """The packed weight of `module` dequantized: float32 [out, in]."""
        from quantize.packing import UNPACKERS

        t = {s: self._stored_torch(n) for s, n in self.modules[module].items()}
        try:
            qw = UNPACKERS[self.method](t, self.scheme, module)
        except (RuntimeError, ValueError) as e:  # shapes that do not fit together
            raise ConvertError(f"{self.path}: cannot unpack {module} ({e.__class__.__name__}: {str(e)[:120]})") from None
        return qw.dequantize().numpy()

    # -- AWQ: the folded model from the source -------------------------------------------------
    def _setup_awq_fold(self, source) -> str | None:
        """Open the source and the scales for the awq-folded view; the reason when unavailable."""
        from . import manifest
        from .gguf.export import source_info

        explicit = source is not None
        if not (self.path / AWQ_SCALES).is_file():
            if explicit:
                raise ConvertError(f"--awq-source: {self.path} has no {AWQ_SCALES} (written by `python -m quantize awq`), "
                                   "so the folded weights cannot be rebuilt")
            return f"the folder has no {AWQ_SCALES}"
        recorded = (manifest.read(self.path) or {}).get("source") or {}
        where = source if explicit else recorded.get("path")
        if not where:
            return "manifest.json records no source checkpoint; pass --awq-source DIR"
        if not Path(where).is_dir():
            if explicit:
                raise ConvertError(f"--awq-source {where}: no such folder")
            return f"the recorded source {where} is not there; pass --awq-source DIR"
        try:
            src = Checkpoint(where)
        except ConvertError as e:
            if explicit:
                raise ConvertError(f"--awq-source: {e}") from None
            return f"the recorded source {where} cannot be read; pass --awq-source DIR"
        want = recorded.get("tensor_index_sha256")
        if want and source_info(src)["tensor_index_sha256"] != want:
            if explicit:
                raise ConvertError(f"--awq-source {where}: its tensors (names, dtypes, shapes) differ from the "
                                   f"checkpoint {self.name} was quantized from")
            return f"the tensors of the recorded source {where} differ from the ones it was quantized from"
        try:
            self._load_scales(src)
            self._plan_folds(src)
            self._check_folds(src)
        except ConvertError as e:
            if explicit:
                raise ConvertError(f"--awq-source {where}: {e}") from None
            self._in_scales, self._out_scales, self._folded = {}, {}, {}
            return str(e)
        self.source = src
        return None

    def _load_scales(self, src: Checkpoint) -> None:
        from safetensors.numpy import load_file

        try:
            scales = load_file(str(self.path / AWQ_SCALES))
        except Exception as e:  # safetensors raises its own error types on a corrupt file
            raise ConvertError(f"{AWQ_SCALES} is unreadable ({e.__class__.__name__})") from None
        for key, s in scales.items():
            module, _, kind = key.rpartition(".")
            table = {"in_scale": self._in_scales, "out_scale": self._out_scales}.get(kind)
            info = src.info(f"{module}.weight") if f"{module}.weight" in src else None
            if table is None or info is None or len(info.shape) != 2:
                raise ConvertError(f"{AWQ_SCALES}: {key} names no linear weight of the source")
            n = info.shape[1] if kind == "in_scale" else info.shape[0]
            s = np.asarray(s, dtype=np.float32)
            if s.shape != (n,) or not np.isfinite(s).all() or not (s > 0).all():
                raise ConvertError(f"{AWQ_SCALES}: {key} is not {n} positive finite values")
            table[module] = s

    def _plan_folds(self, src: Checkpoint) -> None:
        """Which tensors differ from the source, and how: every scaled linear's weight (and bias),
        and the norm each scale was divided out of (quantize/awq.py fold kinds, found through the
        quantizer's own site table)."""
        from quantize.sequential import LAYERS_PREFIX, layer_sites

        # quantized modules without a scale (o_proj: no op to fold into) are the source's weight as is
        for m in sorted(set(self.modules) | set(self._in_scales) | set(self._out_scales)):
            if f"{m}.weight" not in src:
                raise ConvertError(f"the source has no {m}.weight")
            if m in self.modules and tuple(src.info(f"{m}.weight").shape) != self._shape(m):
                raise ConvertError(f"the source's {m}.weight has shape {src.info(f'{m}.weight').shape}, "
                                   f"the quantized one {self._shape(m)}")
            self._folded[f"{m}.weight"] = ("linear", m)
            if f"{m}.bias" in src:
                self._folded[f"{m}.bias"] = ("bias", m)
        spec = self.spec
        for li, lt in enumerate(spec.text.layer_types):
            prefix = f"{LAYERS_PREFIX}.{li}"
            for site in layer_sites(spec, lt):
                if site.fold not in ("offset_norm", "gated_norm"):
                    continue  # "linear_rows" is up_proj's out_scale, handled above
                scaled = [f"{prefix}.{n}" for n in site.linears if f"{prefix}.{n}" in self._in_scales]
                if not scaled:
                    continue  # AWQ skipped this site (nothing of it quantized)
                s = self._in_scales[scaled[0]]
                if any(not np.array_equal(self._in_scales[n], s) for n in scaled[1:]):
                    raise ConvertError(f"{AWQ_SCALES}: the linears reading {prefix}.{site.smooth} have different in_scales")
                norm = f"{prefix}.{site.smooth}.weight"
                if norm not in src:
                    raise ConvertError(f"the source has no {norm}")
                if site.fold == "gated_norm":  # one scale per head dim, repeated over the value heads
                    s_tied = s.reshape(site.tie, -1)
                    if not (s_tied == s_tied[:1]).all():
                        raise ConvertError(f"{AWQ_SCALES}: {scaled[0]}.in_scale is not tied across the value heads")
                    s = s_tied[0]
                self._folded[norm] = (site.fold, s)

    def _fold(self, name: str) -> np.ndarray:
        """The folded float32 tensor `name`: the source with the quantizer's arithmetic (float32,
        columns scaled before rows, as quantize.awq.fold_scale applied them in forward order)."""
        import torch

        kind, arg = self._folded[name]
        w = torch.from_numpy(self.source.tensor(name))
        if kind == "linear":
            if arg in self._in_scales:
                w = w * torch.from_numpy(self._in_scales[arg])[None, :]
            if arg in self._out_scales:
                w = w / torch.from_numpy(self._out_scales[arg])[:, None]
        elif kind == "bias":
            if arg in self._out_scales:
                w = w / torch.from_numpy(self._out_scales[arg])
        elif kind == "offset_norm":
            w = (1.0 + w) / torch.from_numpy(arg) - 1.0
        else:  # gated_norm
            w = w / torch.from_numpy(arg)
        return w.numpy()

    def _check_folds(self, src: Checkpoint) -> None:
        """The folder stores the folded norms and dense linears (rounded to their dtype): the scales
        applied to the source must give them back. The tensor-index hash only covers names and
        shapes; this catches another checkpoint of the same shapes (or scales of another run)."""
        self.source = src
        try:
            for name in self._folded:
                if name not in self._infos or name.removesuffix(".weight") in self.modules:
                    continue
                got = super().tensor(name)
                want = self._fold(name)
                scale = float(np.abs(want).max()) or 1.0
                if float(np.abs(got - want).max()) > FOLD_CHECK_REL * scale:
                    raise ConvertError(f"the source's {name} with the AWQ scales applied does not give the "
                                       "folder's (another checkpoint?)")
        finally:
            self.source = None

    # -- the dense view ---------------------------------------------------------------------------
    def _build_view(self) -> dict[str, TensorInfo]:
        """The stored tensors in order, each packed module's group replaced by its `.weight`."""
        packed = {n: m for m, parts in self.modules.items() for n in parts.values()}
        view: dict[str, TensorInfo] = {}
        for n, ti in self._infos.items():
            m = packed.get(n)
            if m is not None:
                w = f"{m}.weight"
                if w not in view:
                    shape = self._shape(m)
                    view[w] = TensorInfo(w, "F32", shape, ti.file, -1, 4 * shape[0] * shape[1])
                continue
            if n in self._folded:
                view[n] = TensorInfo(n, "F32", ti.shape, ti.file, -1, 4 * int(np.prod(ti.shape, dtype=np.int64)))
            else:
                view[n] = ti
        for n in self._folded:  # e.g. the bias of a quantized linear, if the folder does not keep it
            if n not in view:
                shp = self.source.info(n).shape
                view[n] = TensorInfo(n, "F32", shp, self.path / AWQ_SCALES, -1, 4 * int(np.prod(shp, dtype=np.int64)))
        return view

    def _computed(self, name: str) -> bool:
        """True for tensors this view computes; stored ones (and the packed ones behind the view) are
        read as in Checkpoint, whose tensor() calls raw() and release()."""
        ti = self._view.get(name)
        return ti is not None and ti.offset < 0

    def names(self) -> list[str]:
        return list(self._view)

    def info(self, name: str) -> TensorInfo:
        return self._view[name]

    def __contains__(self, name: str) -> bool:
        return name in self._view

    def tensor(self, name: str, rows: slice | None = None) -> np.ndarray:
        ti = self._view[name]  # KeyError for packed names, as for any name not in names()
        if not self._computed(name):
            return super().tensor(name, rows)
        if self.source is not None:
            a = self._fold(name)
        else:
            a = self.dequantized(name.removesuffix(".weight"))
        if a.shape != ti.shape:
            raise ConvertError(f"{self.path}: {name} unpacks to shape {a.shape}, expected {ti.shape}")
        return np.ascontiguousarray(a[rows]) if rows is not None else a

    def raw(self, name: str) -> np.ndarray:
        """Stored tensors as in Checkpoint; computed ones (offset -1) as a fresh float32 array."""
        return self.tensor(name) if self._computed(name) else super().raw(name)

    def rows_are_cheap(self, name: str) -> bool:
        return not self._computed(name)  # unpacked (or folded) whole on every read

    def release(self, name: str, rows: slice | None = None) -> None:
        if not self._computed(name):
            super().release(name, rows)

    def copy_bytes(self, name: str, out, chunk: int = 64 << 20) -> None:
        if self._computed(name):
            out.write(memoryview(np.ascontiguousarray(self.raw(name)).reshape(-1).view(np.uint8)))
        else:
            super().copy_bytes(name, out, chunk)

    def iter_tensors(self):
        for n in self._view:
            yield n, self.tensor(n)


def is_quantized_folder(src: str | os.PathLike) -> bool:
    """True when the folder's config.json has a quantization_config (no weights are read)."""
    cfg = resolve_model_path(src) / "config.json"
    try:
        return isinstance(json.loads(cfg.read_text(encoding="utf-8")).get("quantization_config"), dict)
    except (OSError, ValueError, AttributeError):
        return False  # Checkpoint reports the unreadable config


def open_checkpoint(src: str | os.PathLike, *, awq_source: str | os.PathLike | None = None,
                    quiet: bool = False) -> Checkpoint:
    """A Checkpoint, or a QuantizedCheckpoint when the folder is a quantized one."""
    if is_quantized_folder(src):
        return QuantizedCheckpoint(src, source=awq_source, quiet=quiet)
    if awq_source is not None:
        raise ConvertError(f"--awq-source applies to an AWQ checkpoint folder; {src} is not quantized")
    return Checkpoint(src)
