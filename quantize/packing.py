"""Packers and unpackers between `QuantizedWeight` and the tensors of three HF checkpoint formats.

Pure torch; bits are shifted in int64 (no sign trouble at bit 31) and the words are then viewed as
int32, which is what every reader expects. Layouts (reference: shared quantization.md §1.2, §2.2, §3.3):

* GPTQ v1       `qweight [in/pf, out]`  codes packed along the input dim, sequential nibbles
                `qzeros  [G, out/pf]`   zero - 1 (the v1 convention), packed along the output dim
                `scales  [G, out]` fp16, `g_idx [in]` int32
* AWQ GEMM      `qweight [in, out/8]`   packed along the output dim with the [0,2,4,6,1,3,5,7] interleave
                `qzeros  [G, out/8]`    same interleave, zero stored as is
                `scales  [G, out]` fp16; no g_idx, so no act-order
* compressed-tensors pack-quantized (symmetric)
                `weight_packed [out, in/pf]` int32, stored value = signed code + 2^(bits-1), i.e. our
                unsigned code when the zero point is 2^(bits-1); `weight_scale [out, G]` in the model
                dtype; `weight_shape [2]` int64

pf = 32 // bits codes per int32 word. Choices where a format cannot hold a result:
* GPTQ v1 cannot store a zero point of 0 (it would be written as -1 and read back as 15+1 after the
  v1->v2 nibble carry). We refuse rather than clamp: clamping changes codes that GPTQ's error
  compensation already accounted for, so the checkpoint would silently differ from the result.
* AWQ GEMM has no g_idx: act-order results with a non-trivial group order are refused.
* compressed-tensors asymmetric does not load in transformers 5.23 (zero-point shape mismatch), so
  only results with every zero == 2^(bits-1) are accepted.
"""

from __future__ import annotations

import dataclasses

import torch

from convert.errors import ConvertError

from .qweight import QuantizedWeight, Scheme

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble j of a word holds column 8k + AWQ_ORDER[j]
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
SCALE_DTYPE = {"gptq": torch.float16, "awq": torch.float16}  # compressed-tensors: the model's dtype
_BLOCK_CODES = 1 << 20
PACK_BITS = (2, 4, 8)  # widths that tile an int32 word exactly (3-bit GPTQ packing is not supported)


# -- bit packing ----------------------------------------------------------------------------------

def _per_word(bits: int) -> int:
    if bits not in PACK_BITS:
        raise ConvertError(f"{bits}-bit codes cannot be packed here (supported: {', '.join(map(str, PACK_BITS))})")
    return 32 // bits


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words in [0, 2^32) -> the same bits as int32."""
    return (words & 0xFFFFFFFF).to(torch.uint32).view(torch.int32)


def _by_row_blocks(q: torch.Tensor, rows_per_word: int, out_shape: tuple[int, int], block) -> torch.Tensor:
    """`block` applied to slices of q's rows, into one int32 output: the int64 temporaries stay
    about _BLOCK_CODES codes, so packing a large linear neither doubles as int64 nor grows the heap."""
    out = torch.empty(out_shape, dtype=torch.int32, device=q.device)
    step = max(1, _BLOCK_CODES // max(1, q.shape[1] * rows_per_word))  # output rows per block
    for r in range(0, out_shape[0], step):
        out[r:r + step] = block(q[r * rows_per_word:(r + step) * rows_per_word])
    return out


def pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """[R, C] codes -> int32 [R/pf, C]: word r holds rows pf*r .. pf*r+pf-1, first row in the low bits."""
    pf = _per_word(bits)
    shifts = (torch.arange(pf, dtype=torch.int64, device=q.device) * bits).view(1, pf, 1)

    def block(b: torch.Tensor) -> torch.Tensor:
        return _to_int32((b.to(torch.int64).reshape(b.shape[0] // pf, pf, b.shape[1]) << shifts).sum(1))

    return _by_row_blocks(q, pf, (q.shape[0] // pf, q.shape[1]), block)


def unpack_rows(p: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_rows: int32 [R/pf, C] -> int32 codes [R, C]."""
    pf = _per_word(bits)
    w = p.view(torch.uint32).to(torch.int64).unsqueeze(1)
    shifts = (torch.arange(pf, dtype=torch.int64) * bits).view(1, pf, 1)
    return ((w >> shifts) & ((1 << bits) - 1)).reshape(p.shape[0] * pf, p.shape[1]).to(torch.int32)


def pack_cols(q: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """[R, C] codes -> int32 [R, C/pf]: word k holds columns pf*k + order[j] at bit j*bits."""
    pf = _per_word(bits)
    shifts = (torch.arange(pf, dtype=torch.int64, device=q.device) * bits).view(1, 1, pf)

    def block(b: torch.Tensor) -> torch.Tensor:
        b = b.to(torch.int64).reshape(b.shape[0], b.shape[1] // pf, pf)
        if order is not None:
            b = b[:, :, list(order)]
        return _to_int32((b << shifts).sum(-1))

    return _by_row_blocks(q, 1, (q.shape[0], q.shape[1] // pf), block)


def unpack_cols(p: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Inverse of pack_cols: int32 [R, C/pf] -> int32 codes [R, C]."""
    pf = _per_word(bits)
    w = p.view(torch.uint32).to(torch.int64).unsqueeze(-1)
    shifts = (torch.arange(pf, dtype=torch.int64) * bits).view(1, 1, pf)
    q = (w >> shifts) & ((1 << bits) - 1)  # [R, C/pf, pf]: slot j
    if order is not None:
        inv = [0] * pf
        for j, col in enumerate(order):
            inv[col] = j
        q = q[:, :, inv]
    return q.reshape(p.shape[0], p.shape[1] * pf).to(torch.int32)


# -- checks shared by the formats -----------------------------------------------------------------

def n_groups(qw: QuantizedWeight) -> int:
    return int(qw.scales.shape[1])


def group_size_of(qw: QuantizedWeight) -> int:
    """The group size a config records: -1 for one group over all input columns."""
    gs = qw.scheme.group_size
    return -1 if gs <= 0 or (gs >= qw.shape[1] and n_groups(qw) == 1) else gs


def trivial_g_idx(qw: QuantizedWeight) -> bool:
    """True when input column i belongs to group i // group_size (no act-order reordering)."""
    n_in = qw.shape[1]
    gs = n_in if group_size_of(qw) == -1 else qw.scheme.group_size
    return bool(torch.equal(qw.g_idx.to(torch.int64), torch.arange(n_in, dtype=torch.int64) // gs))


def check(qw: QuantizedWeight, fmt: str, dtype: torch.dtype = torch.bfloat16) -> None:
    """Raise ConvertError if `fmt` cannot store `qw` exactly (`dtype`: the model's float dtype, which
    compressed-tensors stores its scales in)."""
    out_f, in_f = qw.shape
    bits = qw.scheme.bits
    pf = _per_word(bits)
    g = n_groups(qw)
    gs = in_f if group_size_of(qw) == -1 else qw.scheme.group_size
    if tuple(qw.scales.shape) != (out_f, g) or tuple(qw.zeros.shape) != (out_f, g) or qw.g_idx.numel() != in_f:
        raise ConvertError(f"{qw.name}: inconsistent QuantizedWeight (q {tuple(qw.q.shape)}, scales "
                           f"{tuple(qw.scales.shape)}, zeros {tuple(qw.zeros.shape)}, g_idx {qw.g_idx.numel()})")
    if in_f % gs or g != in_f // gs:
        raise ConvertError(f"{qw.name}: group size {gs} does not tile the {in_f} input columns into {g} groups")
    if int(qw.q.min()) < 0 or int(qw.q.max()) > qw.scheme.maxq:
        raise ConvertError(f"{qw.name}: codes outside [0, {qw.scheme.maxq}]")
    if int(qw.zeros.min()) < 0 or int(qw.zeros.max()) > qw.scheme.maxq:
        raise ConvertError(f"{qw.name}: zero points outside [0, {qw.scheme.maxq}]")
    if qw.scheme.sym and not bool((qw.zeros == (1 << (bits - 1))).all()):
        # readers of sym checkpoints (e.g. vLLM's Marlin) assume the zero point and never read qzeros
        raise ConvertError(f"{qw.name}: the scheme is symmetric but some zero points differ from {1 << (bits - 1)}")
    if fmt == "gptq":
        if in_f % pf or out_f % pf:
            raise ConvertError(f"{qw.name}: GPTQ packing needs both dims divisible by {pf}, got {out_f}x{in_f}")
        n0 = int((qw.zeros == 0).sum())
        if n0:
            raise ConvertError(f"{qw.name}: GPTQ v1 stores zero-1 and cannot hold a zero point of 0 ({n0} groups); "
                               "use a symmetric scheme, --format awq, or quantize with zero points >= 1")
    elif fmt == "awq":
        if bits != 4:
            raise ConvertError(f"{qw.name}: the AWQ GEMM format holds 4-bit codes only, not {bits}-bit")
        if out_f % 8:
            raise ConvertError(f"{qw.name}: AWQ packing needs the output dim divisible by 8, got {out_f}")
        if not trivial_g_idx(qw):
            raise ConvertError(f"{qw.name}: the AWQ GEMM format has no g_idx, so act-order results cannot be stored; "
                               "use --format gptq or quantize without act-order")
    elif fmt == "compressed-tensors":
        if in_f % pf:
            raise ConvertError(f"{qw.name}: compressed-tensors packing needs the input dim divisible by {pf}, got {in_f}")
        if not bool((qw.zeros == (1 << (bits - 1))).all()):
            raise ConvertError("asymmetric compressed-tensors does not load in transformers 5.23; "
                               "use --format awq or a symmetric scheme")
        if not trivial_g_idx(qw):
            raise ConvertError(f"{qw.name}: act-order group order is not supported for compressed-tensors here; "
                               "use --format gptq or quantize without act-order")
    else:
        raise ConvertError(f"unknown quantized checkpoint format {fmt!r}; choose gptq, awq or compressed-tensors")
    sdt = SCALE_DTYPE.get(fmt, dtype)
    if not bool(torch.isfinite(_scales_as(qw, sdt)).all()):
        raise ConvertError(f"{qw.name}: a scale overflows {str(sdt).removeprefix('torch.')} "
                           f"(max {float(qw.scales.abs().max()):.4g})")


def _scales_as(qw: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    return qw.scales.to(torch.float32).to(dtype)


# -- formats --------------------------------------------------------------------------------------

def _gptq(qw: QuantizedWeight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """GPTQ v1 tensors, keyed by the suffix after the module name."""
    bits = qw.scheme.bits
    out = {
        "qweight": pack_rows(qw.q.t(), bits),
        "qzeros": pack_cols((qw.zeros.to(torch.int64) - 1).t(), bits),  # v1 stores zero - 1
        "scales": _scales_as(qw, SCALE_DTYPE["gptq"]).t().contiguous(),
        "g_idx": qw.g_idx.to(torch.int32).contiguous(),
    }
    if qw.bias is not None:
        out["bias"] = qw.bias.to(torch.float16)
    return out


def unpack_gptq(t: dict[str, torch.Tensor], scheme: Scheme, name: str = "") -> QuantizedWeight:
    bits = scheme.bits
    return QuantizedWeight(
        name=name, scheme=scheme,
        q=unpack_rows(t["qweight"], bits).t().contiguous(),
        scales=t["scales"].to(torch.float32).t().contiguous(),
        zeros=(unpack_cols(t["qzeros"], bits) + 1).t().contiguous(),
        g_idx=t["g_idx"].to(torch.int32),
        bias=t["bias"].to(torch.float32) if "bias" in t else None,
    )


def _awq(qw: QuantizedWeight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """AWQ GEMM tensors (AutoAWQ `WQLinear_GEMM`), keyed by the suffix after the module name."""
    out = {
        "qweight": pack_cols(qw.q.t(), 4, AWQ_ORDER),
        "qzeros": pack_cols(qw.zeros.t(), 4, AWQ_ORDER),
        "scales": _scales_as(qw, SCALE_DTYPE["awq"]).t().contiguous(),
    }
    if qw.bias is not None:
        out["bias"] = qw.bias.to(torch.float16)
    return out


def unpack_awq(t: dict[str, torch.Tensor], scheme: Scheme, name: str = "") -> QuantizedWeight:
    q = unpack_cols(t["qweight"], 4, AWQ_ORDER).t().contiguous()
    n_in = q.shape[1]
    g = t["scales"].shape[0]
    return QuantizedWeight(
        name=name, scheme=scheme, q=q,
        scales=t["scales"].to(torch.float32).t().contiguous(),
        zeros=unpack_cols(t["qzeros"], 4, AWQ_ORDER).t().contiguous(),
        g_idx=(torch.arange(n_in) // (n_in // g)).to(torch.int32),
        bias=t["bias"].to(torch.float32) if "bias" in t else None,
    )


def _compressed(qw: QuantizedWeight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """compressed-tensors pack-quantized (symmetric) tensors; `dtype` is the model's float dtype."""
    out = {
        "weight_packed": pack_cols(qw.q, qw.scheme.bits),
        "weight_scale": _scales_as(qw, dtype).contiguous(),
        "weight_shape": torch.tensor(qw.shape, dtype=torch.int64),
    }
    if qw.bias is not None:
        out["bias"] = qw.bias.to(dtype)
    return out


def unpack_compressed(t: dict[str, torch.Tensor], scheme: Scheme, name: str = "") -> QuantizedWeight:
    out_f, in_f = (int(x) for x in t["weight_shape"])
    q = unpack_cols(t["weight_packed"], scheme.bits)[:, :in_f].contiguous()
    g = t["weight_scale"].shape[1]
    return QuantizedWeight(
        name=name, scheme=scheme, q=q,
        scales=t["weight_scale"].to(torch.float32).contiguous(),
        zeros=torch.full((out_f, g), 1 << (scheme.bits - 1), dtype=torch.int32),
        g_idx=(torch.arange(in_f) // (in_f // g)).to(torch.int32),
        bias=t["bias"].to(torch.float32) if "bias" in t else None,
    )


_TRANSFORMS = {"gptq": _gptq, "awq": _awq, "compressed-tensors": _compressed}


def pack(qw: QuantizedWeight, fmt: str, dtype: torch.dtype = torch.bfloat16, *, checked: bool = False
         ) -> dict[str, torch.Tensor]:
    """`fmt`'s tensors for `qw`, keyed by the suffix after the module name (`dtype`: the model's float
    dtype, for compressed-tensors' scales and bias). checked=True skips `check` (already done)."""
    if not checked:
        check(qw, fmt, dtype)
    return {k: v.contiguous() for k, v in _TRANSFORMS[fmt](qw, dtype).items()}


def packed_layout(qw: QuantizedWeight, fmt: str, dtype: torch.dtype = torch.bfloat16
                  ) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """suffix -> (dtype, shape) of what `pack` returns, without packing: the same transform run on
    meta tensors (a checkpoint writer plans its shards from this and packs one module at a time)."""
    m = dataclasses.replace(qw, q=qw.q.to("meta"), scales=qw.scales.to("meta"), zeros=qw.zeros.to("meta"),
                            g_idx=qw.g_idx.to("meta"), bias=None if qw.bias is None else qw.bias.to("meta"))
    return {k: (v.dtype, tuple(v.shape)) for k, v in _TRANSFORMS[fmt](m, dtype).items()}


UNPACKERS = {"gptq": unpack_gptq, "awq": unpack_awq, "compressed-tensors": unpack_compressed}
