"""The layer-by-layer driver shared by GPTQ, AWQ and the RTN baseline, and the output-error metric.

Pass (GPTQ, AWQ): transformers' float32 reference runs every calibration sample (image + text
through MiniCPM-V's processor) up to the first decoder layer; the layer inputs (hidden states)
and the keyword arguments each decoder layer type receives (position embeddings, masks, ...)
are captured, batch 1, one entry per sample. Then, for each decoder layer in turn: the captured
inputs run through the layer with forward pre-hooks summing, per *input site* (the activation a
set of linears share, e.g. the output of input_layernorm read by q/k/v), Σ|x| and Σ x xᵀ; the
layer's linears are quantized and their weights replaced by the dequantized ones; and the
layer's outputs, computed with the quantized layer, become the next layer's inputs. Memory: one
copy of the hidden states of all samples plus one layer's statistics.

* GPTQ is "true sequential": the sites are processed in forward order (attention inputs,
  attention output projection, MLP inputs, down_proj), each with statistics collected after the
  earlier sites of the layer were quantized (a pass stops at the hooked site).
* AWQ collects all sites of the layer in one pass (AutoAWQ's order), searches and folds every
  scale, then clips and quantizes.
* RTN needs no activations and no model pass.

Memory: when quantize_model loads the model itself, it is stored in the checkpoint's own 16-bit
dtype and each part is widened to float32 only while it runs (the parts before the decoder for the
capture, one decoder layer at a time afterwards; bfloat16 and float16 widen exactly, so the
numbers are the float32 reference's), and every part is freed once it is no longer needed: the
peak is the 16-bit model plus one float32 layer and the captured hidden states, not a float32
copy of the whole model.

Defaults: every linear of the decoder layers is quantized except `DENSE` (the Gated DeltaNet's
in_proj_a / in_proj_b, 16 rows each on the real model, left dense by every reference tool);
embeddings, lm_head, the vision tower and the merger are not touched (conv1d is not a linear).

Calibration size rule: at least `MIN_TOKENS_PER_FEATURE` × (input features of the widest
quantized linear) tokens, since Σ x xᵀ of an n-input linear has rank ≤ the token count and a
rank-deficient Hessian leaves GPTQ's solution to the dampening (and AWQ's clip search blind in
the missing directions). On the real model that is 3584 tokens (down_proj), 7 samples of 512.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Sequence

import torch

from convert.errors import ConvertError
from convert.spec import FULL, LINEAR
from runtimes.lazy_weights import storage_dtype

from . import awq as awq_mod
from .awq import FoldGroup
from .gptq import DAMP_MAX, GPTQ
from .qweight import QuantizedWeight, Scheme
from .rtn import check_scheme, group_size_for, rtn

if TYPE_CHECKING:  # pragma: no cover
    from convert.checkpoint import Checkpoint

    from .calibration import Sample

__all__ = ["METHODS", "DENSE", "MIN_TOKENS_PER_FEATURE", "Site", "layer_sites", "QuantizationResult",
           "quantize_model", "output_errors", "effective_weight", "compare_errors", "LAYERS_PREFIX"]

METHODS = ("rtn", "gptq", "awq")
LAYERS_PREFIX = "model.language_model.layers"
DENSE = ("linear_attn.in_proj_a", "linear_attn.in_proj_b")
MIN_TOKENS_PER_FEATURE = 1.0


@dataclass(frozen=True)
class Site:
    """Linears reading one activation (names relative to the decoder layer; the first is hooked)
    and, for AWQ, the op producing it and how a scale folds into that op (None: no fold)."""

    name: str
    linears: tuple[str, ...]
    smooth: str | None = None
    fold: str | None = None
    tie: int = 1


def layer_sites(spec, layer_type: str) -> tuple[Site, ...]:
    """The input sites of a decoder layer type, in forward order (quantization.md §2.3)."""
    mlp = (Site("mlp_in", ("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm", "offset_norm"),
           Site("mlp_out", ("mlp.down_proj",), "mlp.up_proj", "linear_rows"))
    if layer_type == LINEAR:
        return (Site("attn_in", ("linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "linear_attn.in_proj_b",
                                 "linear_attn.in_proj_a"), "input_layernorm", "offset_norm"),
                Site("attn_out", ("linear_attn.out_proj",), "linear_attn.norm", "gated_norm",
                     tie=spec.text.linear_num_value_heads)) + mlp
    if layer_type == FULL:
        # v_proj -> o_proj is not a fold: GQA repeats v heads and the sigmoid gate sits between.
        return (Site("attn_in", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm",
                     "offset_norm"),
                Site("attn_out", ("self_attn.o_proj",))) + mlp
    raise ConvertError(f"quantization: unsupported decoder layer type {layer_type!r}")


@dataclass
class QuantizationResult:
    method: str
    scheme: Scheme
    weights: dict[str, QuantizedWeight]  # module name -> quantized weight (AWQ: of the scaled weight)
    # HF tensor name -> float32 tensor: AWQ's folded norms and scaled (unclipped, unquantized) weights
    # of every linear a scale touched, in_proj_a/b included; with these the float model is unchanged.
    dense_updates: dict[str, torch.Tensor] = field(default_factory=dict)
    # AWQ: module name -> s; the linear's input is x / s (its columns were multiplied by s) ...
    in_scales: dict[str, torch.Tensor] = field(default_factory=dict)
    # ... and its rows were divided by s (up_proj before down_proj).
    out_scales: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict = field(default_factory=dict)

    def dense_for_checkpoint(self) -> dict[str, torch.Tensor]:
        """dense_updates without the weights of quantized linears (their packed form replaces them):
        what a quantized checkpoint writer takes next to `weights`."""
        packed = {f"{n}.weight" for n in self.weights}
        return {k: v for k, v in self.dense_updates.items() if k not in packed}


    def scale_tensors(self) -> dict[str, torch.Tensor]:
        """AWQ's scales as the side file of a quantized checkpoint holds them ("M.in_scale",
        "M.out_scale"): what rebuilds the folded full-precision weights from the source."""
        return {**{f"{n}.in_scale": s.float() for n, s in self.in_scales.items()},
                **{f"{n}.out_scale": s.float() for n, s in self.out_scales.items()}}


def unscale(w: torch.Tensor, in_scale: torch.Tensor | None, out_scale: torch.Tensor | None) -> torch.Tensor:
    """A weight of the folded model mapped back to the original model's inputs and outputs."""
    if out_scale is not None:
        w = w * out_scale[:, None]
    if in_scale is not None:
        w = w / in_scale[None, :]
    return w


def effective_weight(result: QuantizationResult, name: str) -> torch.Tensor:
    """The quantized weight of `name` expressed for the original (unfolded) model's inputs."""
    return unscale(result.weights[name].dequantize(), result.in_scales.get(name), result.out_scales.get(name))


# ---------------------------------------------------------------------------------------------
# capturing the decoder's inputs


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


@dataclass
class _Item:
    name: str
    hidden: torch.Tensor  # [1, T, hidden]
    kwargs: dict[str, dict]  # decoder layer type -> keyword arguments the layer receives
    n_image_tokens: int = 0

    @property
    def n_tokens(self) -> int:
        return int(self.hidden.shape[1])


class _Catcher(torch.nn.Module):
    """Stands in for a decoder layer during capture: records the inputs and passes them on, so
    the real layers before the first one of every type do not run."""

    def __init__(self, index: int, layer_type: str, record: dict, first: bool, last: bool):
        super().__init__()
        self.index, self.layer_type, self.record, self.first, self.last = index, layer_type, record, first, last

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise ConvertError("quantization: unexpected positional arguments to a decoder layer")
        if self.index == 0:
            self.record["hidden"] = hidden_states.detach()
        if self.first:
            self.record["kwargs"][self.layer_type] = kwargs
        if self.last:
            raise _Stop
        return hidden_states


def _decoder_layers(model):
    try:
        return model.model.language_model.layers
    except AttributeError:
        raise ConvertError("quantization: the model has no model.language_model.layers") from None


@torch.no_grad()  # without it autograd keeps every vision layer's activations: GBs per image sample
def _capture(model, ckpt, samples, *, seqlen: int, mode: str | None, quiet: bool,
             narrow: torch.dtype | None = None) -> list[_Item]:
    layers = _decoder_layers(model)
    types = ckpt.spec.text.layer_types
    firsts = {t: types.index(t) for t in dict.fromkeys(types)}
    last = max(firsts.values())
    proc = ckpt.processor
    mode = mode or getattr(proc.image_processor, "downsample_mode", None) or ckpt.spec.downsample_mode
    saved = [layers[i] for i in range(last + 1)]
    record: dict = {}
    items = []
    try:
        for i in range(last + 1):
            layers[i] = _Catcher(i, types[i], record, firsts[types[i]] == i, i == last)
        with _widened_front(model, narrow):
            _run_capture(model, samples, proc, seqlen, mode, record, items, quiet)
    finally:
        for i, layer in enumerate(saved):
            layers[i] = layer
    return items


def _run_capture(model, samples, proc, seqlen, mode, record, items, quiet) -> None:
    from tqdm import tqdm

    from .calibration import encode_sample

    for s in tqdm(samples, desc="calibration inputs", unit="sample", disable=quiet, leave=False):
        enc = encode_sample(proc, s, seqlen=seqlen, mode=mode)
        kw = {}
        if enc.pixel_values is not None:
            kw = dict(pixel_values=enc.pixel_values, target_sizes=enc.target_sizes)
        record.clear()
        record["kwargs"] = {}
        try:
            model.model(input_ids=enc.input_ids, use_cache=False, downsample_mode=mode, **kw)
        except _Stop:
            pass
        if "hidden" not in record:
            raise ConvertError(f"quantization: sample {s.name} never reached the decoder layers")
        h = record["hidden"].to(torch.float32)
        if not torch.isfinite(h).all():
            raise ConvertError(f"quantization: non-finite (NaN/Inf) decoder inputs for calibration sample {s.name}")
        items.append(_Item(s.name, h, dict(record["kwargs"]), enc.n_image_tokens))


# ---------------------------------------------------------------------------------------------
# memory: a model stored in 16 bits, computed in float32 part by part

_WIDE = torch.float32


def _widen(params, stash: dict | None = None) -> None:
    """Float32 copies of narrow params; `stash` keeps the narrow tensors for _restore (no new
    narrow copy, so nothing is allocated on the way back and the heap does not fragment)."""
    for p in params:
        if p.dtype != _WIDE and p.is_floating_point():
            if stash is not None:
                stash[id(p)] = p.data
            p.data = p.data.to(_WIDE)


def _restore(params, stash: dict) -> None:
    for p in params:
        if id(p) in stash:
            p.data = stash.pop(id(p))


def _outermost_lists(root: torch.nn.Module, exclude: torch.nn.Module):
    """The elements of every ModuleList under root that is not inside another one (nor `exclude`)."""
    out, inside = [], set()
    for name, mod in root.named_modules():
        if any(name.startswith(q + ".") for q in inside) or mod is exclude:
            if mod is exclude:
                inside.add(name)
            continue
        if isinstance(mod, torch.nn.ModuleList):
            inside.add(name)
            out.extend(mod)
    return out


@contextlib.contextmanager
def _widened_front(model, narrow: torch.dtype | None):
    """While the capture runs on a model stored in `narrow`: every part before the decoder layers
    computes in float32, one ModuleList element (vision encoder layer) at a time, the rest (patch
    embedding, compressor, merger, which the model reads outside their own calls, e.g.
    `vision_tower.dtype`) for the whole capture; the token embedding stays narrow with its output
    widened (a lookup is exact), so image features are not rounded into a narrow inputs_embeds."""
    if narrow is None or narrow == _WIDE:
        yield
        return
    inner = model.model
    lm = inner.language_model
    units = _outermost_lists(inner, lm.layers)
    own = {id(p) for m in units for p in m.parameters()} | {id(p) for p in lm.layers.parameters()} \
        | {id(p) for p in lm.embed_tokens.parameters()}
    rest = [p for p in inner.parameters() if id(p) not in own]
    stash: dict = {}
    handles = [lm.embed_tokens.register_forward_hook(lambda m, a, out: out.to(_WIDE))]
    for m in units:
        handles.append(m.register_forward_pre_hook(lambda m, a: _widen(m.parameters(), stash)))
        handles.append(m.register_forward_hook(lambda m, a, out: _restore(m.parameters(), stash)))
    _widen(rest, stash)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        _restore(inner.parameters(), stash)


def _free(module: torch.nn.Module) -> None:
    """Drop a part's weights (the model is this run's own and the part will not run again)."""
    module.to_empty(device="meta")


def _widen_from_checkpoint(layer: torch.nn.Module, prefix: str, ckpt: "Checkpoint") -> None:
    """A decoder layer's float32 weights read from the checkpoint's own mmap, whose pages are
    released after the read (Checkpoint.tensor); widening transformers' mmapped 16-bit tensors
    instead would leave every layer's file pages in the process until the end of the run."""
    for name, p in layer.named_parameters():
        full = f"{prefix}.{name}"
        if p.is_floating_point() and full in ckpt and tuple(ckpt.info(full).shape) == tuple(p.shape):
            p.data = torch.from_numpy(ckpt.tensor(full))
    _widen(layer.parameters())  # anything the checkpoint names differently


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it; the per-sample tensors of a layer's
    passes leave holes that otherwise count in the peak RSS of every later layer)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ---------------------------------------------------------------------------------------------
# per-layer statistics


_GRAM_TOKENS = 4096  # tokens gathered before one Σ x xᵀ update: larger products, fewer float64 additions
_GRAM_BLOCK = 512  # Σ x xᵀ is symmetric: computed by row blocks of its upper triangle (about half the work)


def _add_gram(acc: torch.Tensor, x: torch.Tensor) -> None:
    """acc (float64 [n, n]) += xᵀ x (x float32 [tokens, n]), each block's product in float32."""
    n, b = int(x.shape[1]), _GRAM_BLOCK
    if n <= 2 * b:
        acc += (x.T @ x).to(torch.float64)
        return
    for i in range(0, n, b):
        blk = (x[:, i:i + b].T @ x[:, i:]).to(torch.float64)  # rows i..i+b, columns i..n
        acc[i:i + b, i:] += blk
        acc[i + b:, i:i + b] += blk[:, b:].T


class _InputStats:
    """Σ|x| and Σ x xᵀ (float64; the products in float32 over batches of _GRAM_TOKENS tokens) of
    one input site."""

    def __init__(self, n: int, label: str):
        self.label = label
        self.abs_sum = torch.zeros(n, dtype=torch.float64)
        self._gram = torch.zeros(n, n, dtype=torch.float64)
        self._pending: list[torch.Tensor] = []
        self._pending_tokens = 0
        self.count = 0

    def add(self, x: torch.Tensor, sample: str) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32, copy=True)  # the layer may reuse its input
        if not torch.isfinite(x).all():
            raise ConvertError(f"quantization: non-finite (NaN/Inf) activations at the input of {self.label} "
                               f"on calibration sample {sample}")
        self.abs_sum += x.abs().sum(0).to(torch.float64)
        self._pending.append(x)
        self._pending_tokens += int(x.shape[0])
        self.count += int(x.shape[0])
        if self._pending_tokens >= _GRAM_TOKENS:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            x = torch.cat(self._pending) if len(self._pending) > 1 else self._pending[0]
            self._pending, self._pending_tokens = [], 0
            _add_gram(self._gram, x)

    @property
    def gram(self) -> torch.Tensor:
        self._flush()
        return self._gram

    @gram.setter
    def gram(self, value: torch.Tensor) -> None:  # AWQ rescales it in place (st.gram /= ...)
        self._flush()
        self._gram = value

    @property
    def x_mean(self) -> torch.Tensor:
        return (self.abs_sum / max(self.count, 1)).to(torch.float32)


def _layer_forward(layer, item: _Item, layer_type: str) -> torch.Tensor:
    out = layer(item.hidden, **item.kwargs[layer_type])
    return out[0] if isinstance(out, tuple) else out


class _MixerReplay:
    """A decoder layer's token mixer (self_attn / linear_attn) replaced by its recorded output per
    sample. GPTQ's later passes over a layer (the MLP's statistics, the layer's outputs) come after
    the mixer's linears are final, so attention, the costliest part on CPU, runs once per layer
    instead of four times; the outputs are the same tensors the mixer would compute."""

    def __init__(self, mixer: torch.nn.Module, proj: torch.nn.Module):
        self.mixer, self.proj = mixer, proj
        self.inputs: dict[str, torch.Tensor] = {}  # sample -> the output projection's input
        self.rest: dict[str, tuple | None] = {}  # sample -> the mixer's other outputs (None: a bare tensor)
        self.outputs: dict[str, object] = {}

    def finish(self) -> None:
        """The outputs once the output projection is quantized: its result on the kept inputs."""
        for name in list(self.inputs):
            y = self.proj(self.inputs.pop(name))
            rest = self.rest.pop(name)
            self.outputs[name] = y if rest is None else (y, *rest)

    @contextlib.contextmanager
    def active(self, current: dict):
        self.mixer.forward = lambda *a, **k: self.outputs[current["sample"]]
        try:
            yield
        finally:
            del self.mixer.forward  # the instance attribute shadowed the class's method


def _replaying(replay: _MixerReplay | None, current: dict):
    return replay.active(current) if replay is not None else contextlib.nullcontext()


def _passes(layer, items: list[_Item], layer_type: str, current: dict, replay: _MixerReplay | None) -> None:
    """One forward of the layer per item (a hook may end it early), the mixer replayed if given."""
    with _replaying(replay, current):
        for item in items:
            current["sample"] = item.name
            try:
                _layer_forward(layer, item, layer_type)
            except _Stop:
                pass


def _input_hook(st: _InputStats, current: dict, stop: bool, keep: dict | None = None):
    def h(module, args, kwargs):
        x = args[0] if args else kwargs["input"]
        st.add(x, current["sample"])
        if keep is not None:
            keep[current["sample"]] = x.detach()
        if stop:
            raise _Stop

    return h


@torch.no_grad()
def _collect(layer, items: list[_Item], layer_type: str, sites: Sequence[Site], prefix: str,
             replay: _MixerReplay | None = None) -> dict[str, _InputStats]:
    """Statistics of `sites` (forward order) over all items; each pass stops after the last site."""
    stats: dict[str, _InputStats] = {}
    current = {"sample": ""}
    handles = []
    try:
        for k, site in enumerate(sites):
            lin = layer.get_submodule(site.linears[0])
            st = stats[site.name] = _InputStats(int(lin.in_features), f"{prefix}.{site.linears[0]}")
            handles.append(lin.register_forward_pre_hook(_input_hook(st, current, k == len(sites) - 1),
                                                         with_kwargs=True))
        _passes(layer, items, layer_type, current, replay)
    finally:
        for h in handles:
            h.remove()
    return stats


@torch.no_grad()
def _collect_mixer_output(layer, items: list[_Item], layer_type: str, site: Site,
                          prefix: str) -> tuple[_InputStats, _MixerReplay | None]:
    """The statistics of the mixer's output projection (`site`, e.g. o_proj) from passes that end
    with the mixer, keeping the projection's inputs for a replay. The replay is offered only if
    the mixer's output is the projection's own result (alone or first of a tuple) on every sample;
    otherwise None (the later passes run the mixer)."""
    mixer_name = site.linears[0].rsplit(".", 1)[0]
    mixer, proj = layer.get_submodule(mixer_name), layer.get_submodule(site.linears[0])
    st = _InputStats(int(proj.in_features), f"{prefix}.{site.linears[0]}")
    replay = _MixerReplay(mixer, proj)
    current = {"sample": "", "ok": True}

    def proj_out(module, args, kwargs, out):
        current["y"] = out

    def mixer_out(module, args, kwargs, out):
        y = current.pop("y", None)
        if y is not None and out is y:
            replay.rest[current["sample"]] = None
        elif y is not None and isinstance(out, tuple) and out and out[0] is y:
            replay.rest[current["sample"]] = tuple(out[1:])
        else:
            current["ok"] = False
        raise _Stop

    handles = [proj.register_forward_pre_hook(_input_hook(st, current, False, replay.inputs), with_kwargs=True),
               proj.register_forward_hook(proj_out, with_kwargs=True),
               mixer.register_forward_hook(mixer_out, with_kwargs=True)]
    try:
        _passes(layer, items, layer_type, current, None)
    finally:
        for h in handles:
            h.remove()
    return st, (replay if current["ok"] else None)


@torch.no_grad()
def _propagate(layer, items: list[_Item], layer_type: str, prefix: str, replay: _MixerReplay | None = None) -> None:
    current = {"sample": ""}
    with _replaying(replay, current):
        for item in items:
            current["sample"] = item.name
            out = _layer_forward(layer, item, layer_type).detach()
            if not torch.isfinite(out).all():
                raise ConvertError(f"quantization: non-finite (NaN/Inf) outputs of {prefix} on calibration sample {item.name}")
            item.hidden = out


# ---------------------------------------------------------------------------------------------
# methods


def _targets(site: Site, skip: Sequence[str]) -> tuple[str, ...]:
    return tuple(n for n in site.linears if n not in skip)


def _check_layers(model, spec, scheme: Scheme, skip: Sequence[str]) -> tuple[str, int]:
    """Every linear of every decoder layer is known; the group size fits every target.
    Returns (name, in_features) of the widest target."""
    widest = ("", 0)
    for li, layer in enumerate(_decoder_layers(model)):
        prefix = f"{LAYERS_PREFIX}.{li}"
        sites = layer_sites(spec, spec.text.layer_types[li])
        known = {n for s in sites for n in s.linears}
        for name, mod in layer.named_modules():
            if isinstance(mod, torch.nn.Linear) and name not in known:
                raise ConvertError(f"quantization: {prefix}.{name} is a linear layer the quantizer does not know")
        for s in sites:
            for n in _targets(s, skip):
                lin = layer.get_submodule(n)
                group_size_for(scheme, int(lin.in_features), f"{prefix}.{n}")
                if lin.in_features > widest[1]:
                    widest = (f"{prefix}.{n}", int(lin.in_features))
    return widest


def _set_weight(lin, w: torch.Tensor) -> None:
    lin.weight.data.copy_(w.to(lin.weight.dtype))


def _gptq_site(layer, site: Site, st: _InputStats, scheme: Scheme, prefix: str, skip, damp: float,
               block_size: int, out: QuantizationResult) -> None:
    for n in _targets(site, skip):
        lin = layer.get_submodule(n)
        name = f"{prefix}.{n}"
        g = GPTQ(lin, name)
        g.set_hessian(st.gram, st.count)
        qw = g.quantize(scheme, damp=damp, block_size=block_size)
        _set_weight(lin, qw.dequantize())
        out.weights[name] = qw
        out.stats.setdefault("damp", {})[name] = g.damp_used
        g.free()


def _awq_layer(layer, sites: Sequence[Site], stats: dict[str, _InputStats], scheme: Scheme, prefix: str, skip,
               clip: bool, out: QuantizationResult, keep_folded: bool = True) -> None:
    touched: set[str] = set()
    for site in sites:
        targets = _targets(site, skip)
        if site.fold is None or not targets:
            continue
        st = stats[site.name]
        group = FoldGroup(site.smooth, site.fold, targets, tuple(n for n in site.linears if n not in targets), site.tie)
        gain = awq_mod.smooth_gain(layer.get_submodule(site.smooth), site.fold)
        frozen = None
        if gain is not None:
            g = gain.abs()  # per channel, or per tied channel (the gated norm's w is per head dim)
            frozen = g < awq_mod.GAIN_EPS * g.max()
        names = [f"{prefix}.{n}" for n in targets]
        weights = [layer.get_submodule(n).weight.detach().to(torch.float32) for n in targets]
        s, info = awq_mod.search_scale(st.x_mean, st.gram, weights, scheme, names, tie=site.tie, frozen=frozen)
        awq_mod.fold_scale(layer, group, s)
        full = s.repeat(site.tie) if site.tie > 1 else s
        # the activation is now x / s: keep the statistics in step for the clip search
        st.gram /= torch.outer(full, full).to(torch.float64)
        st.abs_sum /= full.to(torch.float64)
        for n in group.linears + group.dense:
            out.in_scales[f"{prefix}.{n}"] = full.clone()
            touched.add(n)
        touched.add(site.smooth)
        if site.fold == "linear_rows":
            out.out_scales[f"{prefix}.{site.smooth}"] = s.clone()
        out.stats.setdefault("awq_ratio", {})[f"{prefix}.{site.smooth}"] = info["ratio"]
    quantized = {n for site in sites for n in _targets(site, skip)}
    for n in sorted(touched):
        if not keep_folded and n in quantized:
            continue
        out.dense_updates[f"{prefix}.{n}.weight"] = layer.get_submodule(n).weight.detach().to(torch.float32).clone()
    for site in sites:
        for n in _targets(site, skip):
            lin = layer.get_submodule(n)
            name = f"{prefix}.{n}"
            do_clip = clip and n.rsplit(".", 1)[-1] not in awq_mod.CLIP_SKIP
            qw = awq_mod.quantize_clipped(lin.weight.detach(), stats[site.name].gram, scheme, name, clip=do_clip)
            _set_weight(lin, qw.dequantize())
            out.weights[name] = qw


@contextlib.contextmanager
def _reference_session(ckpt: "Checkpoint", model, *, quiet: bool, n_threads: int | None, dtype: str = "float32"):
    """The reference (loaded in `dtype` unless given) with transformers quiet and torch's thread
    count set for the run (DEFAULT_THREADS unless given), restored afterwards."""
    from runtimes.reference import DEFAULT_THREADS, hf_quiet, load_reference_model

    old = torch.get_num_threads()
    n = DEFAULT_THREADS if n_threads is None else n_threads
    if n:
        torch.set_num_threads(int(n))
    try:
        with hf_quiet(quiet):
            if model is None:
                model = load_reference_model(ckpt, quiet=quiet, dtype=dtype)
            yield model.eval()
    finally:
        torch.set_num_threads(old)


def quantize_model(ckpt: "Checkpoint", method: str, scheme: Scheme, samples: Sequence["Sample"] | None = None, *,
                   seqlen: int = 512, mode: str | None = None, model=None, skip: Sequence[str] = DENSE,
                   damp: float = 0.01, block_size: int = 128, clip: bool = True, quiet: bool = False,
                   n_threads: int | None = None, keep_folded: bool = True) -> QuantizationResult:
    """Quantize the decoder's linears of `ckpt` with `method` ("rtn", "gptq", "awq").

    samples: calibration samples (quantize.calibration), not needed for RTN. model: a loaded
    float32 reference to use (it is modified in place: folded and fake-quantized); by default one
    is loaded in the checkpoint's 16-bit dtype, computed in float32 part by part and freed as it
    goes (same numbers, a fraction of the memory). n_threads: torch threads for the run (default:
    convert.gguf.imatrix.DEFAULT_THREADS). keep_folded=False: AWQ's dense_updates leave out the
    scaled weights of the quantized linears (the checkpoint writer does not take them; the scales
    rebuild them), which on the full-size model is a float32 copy of the decoder.
    """
    from tqdm import tqdm

    if method not in METHODS:
        raise ConvertError(f"quantization method {method!r} is not one of {', '.join(METHODS)}")
    check_scheme(scheme)
    if method != "gptq" and (scheme.act_order or scheme.static_groups):
        raise ConvertError(f"act-order and static groups are GPTQ options, not {method.upper()}'s")
    if method == "gptq" and not 0 <= damp < DAMP_MAX:  # NaN too: the retry loop would never reach DAMP_MAX
        raise ConvertError(f"--damp {damp}: the GPTQ dampening fraction must be at least 0 and below {DAMP_MAX}")
    spec = ckpt.spec
    t0 = time.perf_counter()
    own = model is None
    dtype = storage_dtype(ckpt) if own and method != "rtn" else "float32"
    narrow = getattr(torch, dtype)
    with _reference_session(ckpt, model, quiet=quiet, n_threads=n_threads, dtype=dtype) as model:
        widest = _check_layers(model, spec, scheme, skip)
        out = QuantizationResult(method, scheme, {})
        layers = _decoder_layers(model)
        if method == "rtn":
            for li, layer in enumerate(layers):
                for site in layer_sites(spec, spec.text.layer_types[li]):
                    for n in _targets(site, skip):
                        name = f"{LAYERS_PREFIX}.{li}.{n}"
                        lin = layer.get_submodule(n)
                        out.weights[name] = rtn(lin.weight, scheme, name, lin.bias)
            out.stats.update(seconds=time.perf_counter() - t0)
            return out

        samples = list(samples or [])
        need = int(MIN_TOKENS_PER_FEATURE * widest[1])
        if len(samples) * seqlen < need:
            raise ConvertError(_few_tokens(method, len(samples) * seqlen, widest, need, "at most "))
        items = _capture(model, ckpt, samples, seqlen=seqlen, mode=mode, quiet=quiet, narrow=narrow)
        n_tok = sum(it.n_tokens for it in items)
        if n_tok < need:
            raise ConvertError(_few_tokens(method, n_tok, widest, need, ""))
        if own:  # nothing before or after the decoder layers runs again
            for name, part in model.named_children():
                if name != "model":
                    _free(part)
            for name, part in model.model.named_children():
                if name != "language_model":
                    _free(part)
            _free(model.model.language_model.embed_tokens)
            _trim_heap()
        for li, layer in enumerate(tqdm(layers, desc=method.upper(), unit="layer", disable=quiet, leave=False)):
            prefix = f"{LAYERS_PREFIX}.{li}"
            lt = spec.text.layer_types[li]
            if own:
                _widen_from_checkpoint(layer, prefix, ckpt)
            else:
                _widen(layer.parameters())
            sites = [s for s in layer_sites(spec, lt) if _targets(s, skip)]
            replay = None
            if method == "gptq":
                for site in sites:  # true sequential: each site sees the quantized earlier ones
                    if site.name == "attn_out":  # the mixer's last linear: its output is final after this one
                        st, replay = _collect_mixer_output(layer, items, lt, site, prefix)
                    else:
                        st = _collect(layer, items, lt, [site], prefix, replay)[site.name]
                    _gptq_site(layer, site, st, scheme, prefix, skip, damp, block_size, out)
                    if site.name == "attn_out" and replay is not None:
                        replay.finish()
            else:
                stats = _collect(layer, items, lt, sites, prefix)
                _awq_layer(layer, sites, stats, scheme, prefix, skip, clip, out, keep_folded)
            _propagate(layer, items, lt, prefix, replay)
            if own:
                _free(layer)
                _trim_heap()
        out.stats.update(tokens=n_tok, samples=len(items), image_tokens=sum(it.n_image_tokens for it in items),
                         seconds=time.perf_counter() - t0)
        return out



def _few_tokens(method, n, widest, need, qual) -> str:
    return (f"{method.upper()} needs at least {need} calibration tokens (the widest quantized layer, {widest[0]}, has "
            f"{widest[1]} input features), the samples give {qual}{n}; use more samples or a longer seqlen")


# ---------------------------------------------------------------------------------------------
# the acceptance metric


def output_errors(ckpt: "Checkpoint", results, samples: Sequence["Sample"], *, seqlen: int = 512,
                  mode: str | None = None, model=None, squared: bool = True, quiet: bool = False,
                  n_threads: int | None = None):
    """Output error per quantized linear: ‖W X − Ŵ X‖²_F / N (squared=True; GPTQ's layer-wise
    objective, the quantity GPTQ and AWQ minimise, additive over tokens and output channels) or
    its square root, ‖W X − Ŵ X‖_F / √N. X [in, N] = the linear's inputs in the *original float*
    model on `samples` (held-out calibration data; every method is measured on the same X, which
    is not what the sequential passes quantized against); Ŵ = the result's weight mapped back to
    the original model's inputs (effective_weight: AWQ's scales undone). Computed layer by layer
    from Σ x xᵀ.

    results: one QuantizationResult -> {name: error}; a mapping label -> result -> {label: {name: error}}.
    model: an unmodified float32 reference (default: loaded).
    """
    from tqdm import tqdm

    single = not isinstance(results, Mapping)
    res = {"": results} if single else dict(results)
    spec = ckpt.spec
    errs: dict[str, dict[str, float]] = {k: {} for k in res}
    with _reference_session(ckpt, model, quiet=quiet, n_threads=n_threads) as model:
        items = _capture(model, ckpt, list(samples), seqlen=seqlen, mode=mode, quiet=quiet)
        for li, layer in enumerate(tqdm(_decoder_layers(model), desc="output error", unit="layer",
                                        disable=quiet, leave=False)):
            prefix = f"{LAYERS_PREFIX}.{li}"
            lt = spec.text.layer_types[li]
            sites = layer_sites(spec, lt)
            stats = _collect(layer, items, lt, sites, prefix)
            for site in sites:
                for n in site.linears:
                    name = f"{prefix}.{n}"
                    w = layer.get_submodule(n).weight.detach().to(torch.float32)
                    for k, r in res.items():
                        if name in r.weights:
                            st = stats[site.name]
                            e = max(awq_mod.output_error(w, effective_weight(r, name), st.gram), 0.0) / st.count
                            errs[k][name] = e if squared else e ** 0.5
            _propagate(layer, items, lt, prefix)

    return errs[""] if single else errs


def compare_errors(errors: Mapping[str, float], baseline: Mapping[str, float]) -> dict:
    """Summed-error ratio and the share of linears with a smaller error than the baseline's."""
    names = sorted(set(errors) & set(baseline))
    if not names:
        raise ConvertError("no quantized linears in common to compare")
    total, base = sum(errors[n] for n in names), sum(baseline[n] for n in names)
    better = sum(errors[n] < baseline[n] for n in names)
    return {"sum": total, "baseline_sum": base, "ratio": total / base if base else float("inf"),
            "better": better, "count": len(names), "better_fraction": better / len(names)}
