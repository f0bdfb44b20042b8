"""The export plan: every output tensor's source, name, transforms, shape and ggml type.

Built from the checkpoint's tensor index alone (no data read), so `--dry-run`, the writer's
header and validation all see the same plan. Type rules follow llama.cpp's converter:
1-D tensors, norms, position embeddings, `ssm_conv1d` and non-`.weight` tensors stay F32;
rows that don't fill a block fall back to F16.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import GGMLQuantizationType as T

from quantize import ggml

from ..checkpoint import Checkpoint
from ..errors import ConvertError
from ..spec import ModelSpec
from .names import DECODER, MMPROJ_4X, MMPROJ_16X, NameMap

# Names kept in F32 whatever the file type (llama.cpp's converter list, as it applies here).
_ALWAYS_F32 = [re.compile(p) for p in (
    r".*_norm\.weight", r"blk\.\d+\.ssm_conv1d\.weight", r"v\.position_embd\.weight",
)]


@dataclass(frozen=True)
class TensorPlan:
    name: str  # GGUF name
    source: str  # HF name
    transforms: tuple[str, ...]
    shape: tuple[int, ...]  # numpy order, after transforms
    qtype: T
    bid: int | None = None
    # written with ggml_n_dims dimensions (trailing ggml dims of 1 dropped), as llama-quantize
    # writes every tensor; llama.cpp's converter keeps them
    squeeze: bool = False

    @property
    def nbytes(self) -> int:
        return ggml.nbytes(self.qtype, self.shape)

    @property
    def n_params(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def _shape_after(shape: tuple[int, ...], transforms: tuple[str, ...]) -> tuple[int, ...]:
    if "squeeze" in transforms:
        shape = tuple(d for d in shape if d != 1)
    return shape


def float_type_rule(name: str, shape: tuple[int, ...], ftype: T, *, kind: str) -> T:
    """llama.cpp converter's per-tensor type for a float/Q8_0 file type."""
    if len(shape) <= 1 or any(rx.fullmatch(name) for rx in _ALWAYS_F32) or not name.endswith(".weight"):
        return T.F32
    if kind == "mmproj" and name == "v.patch_embd.weight":
        # the converter keeps the patch conv at F16 for F16 files and F32 otherwise
        return T.F16 if ftype == T.F16 else T.F32
    if ftype in (T.F32, T.F16, T.BF16):
        return ftype
    return ftype if ggml.fits(ftype, shape[-1]) else T.F16


def _order_key(p: TensorPlan) -> tuple:
    # token_embd first, blocks in order, then the rest: independent of shard layout
    return (0 if p.bid is None and p.name.startswith(("token_embd", "v.patch", "v.position")) else
            1 if p.bid is not None else 2, p.bid if p.bid is not None else -1, p.name)


def build_plan(ckpt: Checkpoint, kind: str, ftype: T, mode: str = "16x",
               type_rule=float_type_rule) -> list[TensorPlan]:
    """kind: 'decoder' or 'mmproj' (mode 16x or 4x)."""
    spec = ckpt.spec
    nm: NameMap = DECODER if kind == "decoder" else (MMPROJ_16X if mode == "16x" else MMPROJ_4X)
    plans: list[TensorPlan] = []
    unknown = []
    for hf in ckpt.names():
        try:
            m = nm.map(hf)
        except KeyError:
            unknown.append(hf)
            continue
        if m is None:
            continue
        if kind == "decoder" and m.gguf_name == "output.weight" and spec.tie_word_embeddings:
            continue  # tied: llama.cpp reuses token_embd
        info = ckpt.info(hf)
        shape = _shape_after(info.shape, m.transforms)
        qt = type_rule(m.gguf_name, shape, ftype, kind=kind)
        plans.append(TensorPlan(m.gguf_name, hf, m.transforms, shape, qt, m.bid))
    if unknown:
        raise ConvertError(f"{ckpt.path}: {len(unknown)} tensor(s) this converter does not know, e.g. {unknown[0]}")
    plans.sort(key=_order_key)
    check_shapes(plans, spec, kind, mode)
    return plans


def plan_from_spec(spec: ModelSpec, kind: str, ftype: T, mode: str = "16x") -> list[TensorPlan]:
    """A plan from the config alone (no weights): for sizing and --dry-run on shapes not on disk."""
    plans = []
    for name, shape in expected_shapes(spec, kind, mode).items():
        m = re.match(r"(v\.)?blk\.(\d+)\.", name)
        plans.append(TensorPlan(name, "", (), shape, float_type_rule(name, shape, ftype, kind=kind),
                                int(m.group(2)) if m else None))
    return sorted(plans, key=_order_key)


def expected_shapes(spec: ModelSpec, kind: str, mode: str = "16x") -> dict[str, tuple[int, ...]]:
    """Every GGUF tensor's shape (numpy order) as the config says it must be."""
    t, v = spec.text, spec.vision
    if kind == "decoder":
        d, ff = t.hidden_size, t.intermediate_size
        out: dict[str, tuple[int, ...]] = {"token_embd.weight": (t.vocab_size, d), "output_norm.weight": (d,)}
        if not spec.tie_word_embeddings:
            out["output.weight"] = (t.vocab_size, d)
        for i, lt in enumerate(t.layer_types):
            b = f"blk.{i}."
            out.update({b + "attn_norm.weight": (d,), b + "post_attention_norm.weight": (d,),
                        b + "ffn_gate.weight": (ff, d), b + "ffn_up.weight": (ff, d), b + "ffn_down.weight": (d, ff)})
            if lt == "full_attention":
                q, kv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
                out.update({b + "attn_q.weight": (2 * q, d), b + "attn_k.weight": (kv, d), b + "attn_v.weight": (kv, d),
                            b + "attn_output.weight": (d, q), b + "attn_q_norm.weight": (t.head_dim,),
                            b + "attn_k_norm.weight": (t.head_dim,)})
            else:
                nv = t.linear_num_value_heads
                out.update({b + "attn_qkv.weight": (t.linear_conv_dim, d), b + "attn_gate.weight": (t.linear_v_dim, d),
                            b + "ssm_beta.weight": (nv, d), b + "ssm_alpha.weight": (nv, d),
                            b + "ssm_conv1d.weight": (t.linear_conv_dim, t.conv_kernel), b + "ssm_dt.bias": (nv,),
                            b + "ssm_a": (nv,), b + "ssm_norm.weight": (t.linear_value_head_dim,),
                            b + "ssm_out.weight": (d, t.linear_v_dim)})
        return out
    h, ff, p = v.hidden_size, v.intermediate_size, v.patch_size
    out = {"v.patch_embd.weight": (h, v.num_channels, p, p), "v.patch_embd.bias": (h,),
           "v.position_embd.weight": (v.num_positions, h), "v.post_ln.weight": (h,), "v.post_ln.bias": (h,)}
    for i in range(v.num_layers):
        b = f"v.blk.{i}."
        for n in ("ln1", "ln2"):
            out[b + n + ".weight"] = out[b + n + ".bias"] = (h,)
        for n in ("attn_q", "attn_k", "attn_v", "attn_out"):
            out[b + n + ".weight"], out[b + n + ".bias"] = (h, h), (h,)
        out.update({b + "ffn_up.weight": (ff, h), b + "ffn_up.bias": (ff,), b + "ffn_down.weight": (h, ff),
                    b + "ffn_down.bias": (h,)})
    if mode == "16x":
        wh, wi = v.window_hidden_size, v.window_intermediate_size
        b = "v.vit_merger."
        out[b + "ln1.weight"] = out[b + "ln1.bias"] = (h,)
        for n in ("attn_q", "attn_k", "attn_v", "attn_out"):
            out[b + n + ".weight"], out[b + n + ".bias"] = (h, h), (h,)
        out.update({b + "ds_ln.weight": (wh,), b + "ds_ln.bias": (wh,), b + "ds_ffn_up.weight": (wi, wh),
                    b + "ds_ffn_up.bias": (wi,), b + "ds_ffn_down.weight": (h, wi), b + "ds_ffn_down.bias": (h,)})
    m = spec.merger_hidden_size
    out.update({"mm.input_norm.weight": (m,), "mm.input_norm.bias": (m,), "mm.up.weight": (m, m), "mm.up.bias": (m,),
                "mm.down.weight": (t.hidden_size, m), "mm.down.bias": (t.hidden_size,)})
    return out


def check_shapes(plans: list[TensorPlan], spec: ModelSpec, kind: str, mode: str) -> None:
    want = expected_shapes(spec, kind, mode)
    have = {p.name: p for p in plans}
    for p in plans:
        w = want.get(p.name)
        if w is None:
            raise ConvertError(f"tensor {p.source} maps to {p.name}, which the config does not call for")
        if tuple(p.shape) != w:
            raise ConvertError(f"tensor {p.source} has shape {list(p.shape)}, the config implies {list(w)}")
    missing = [n for n in want if n not in have]
    if missing:
        raise ConvertError(f"checkpoint lacks {len(missing)} tensor(s) the config calls for, e.g. {missing[0]}")
