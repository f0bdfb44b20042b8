"""What ggml's CPU backend does to a matmul's activations, for the fake-quant reference.

ggml multiplies a weight of type T with activations converted to T's `vec_dot_type`
(ggml-cpu.c's type traits): F16 weights with F16 activations, Q8_0/Q4_0/Q5_0 with Q8_0 blocks,
Q4_1/Q5_1 with Q8_1, every k-quant with Q8_K blocks of 256. On the tiny synthetic model that
rounding is most of what separates llama.cpp's Q8_0 logits from the weights-only fake-quant
model, so the reference applies it too (forward pre-hooks on each nn.Linear): what is then
left between the artifact and this reference is the runtime's summation order, and any
conversion error.
"""

from __future__ import annotations

from gguf import GGMLQuantizationType as T

_Q8_0 = {T.Q8_0, T.Q4_0, T.Q5_0, T.Q4_1, T.Q5_1}  # Q8_1 quantizes the same values as Q8_0
_Q8_K = {T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K}


def vec_dot_kind(qt: T) -> str | None:
    if qt == T.F16:
        return "f16"
    if qt == T.BF16:
        return "bf16"
    if qt in _Q8_0:
        return "q8_0"
    if qt in _Q8_K:
        return "q8_K"
    return None  # F32 (or a type this emulation does not know): activations stay float32


def quantize_activations(x, kind: str | None):
    """x (float32, rows along the last dim) as ggml hands it to the dot product."""
    import torch

    if kind is None:
        return x
    if kind == "f16":
        return x.half().float()
    if kind == "bf16":
        return x.bfloat16().float()
    block = 32 if kind == "q8_0" else 256
    shape = x.shape
    if shape[-1] % block:
        return x
    b = x.float().reshape(-1, shape[-1] // block, block)
    if kind == "q8_0":
        # x86 quantize_row_q8_0: d = amax/127 stored as fp16; q = round-half-even(x * 127/amax)
        amax = b.abs().amax(-1, keepdim=True)
        d = (amax / 127).half().float()
        inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
        q = torch.round(b * inv)
    else:
        # quantize_row_q8_K_ref: iscale = -127/max (max: the value of largest magnitude), q =
        # min(127, nearest_int(iscale * x)), d = 1/iscale in float32
        idx = b.abs().argmax(-1, keepdim=True)
        mx = torch.gather(b, -1, idx)
        iscale = torch.where(mx != 0, -127 / mx, torch.zeros_like(mx))
        q = torch.clamp(torch.round(b * iscale), max=127)
        d = torch.where(mx != 0, 1 / iscale, torch.zeros_like(mx))
    return (q * d).reshape(shape).to(x.dtype)


def _in_order(x, kind: str | None, order):
    """quantize_activations along the GGUF's column order `order` (HF indices), back in HF order."""
    import torch

    if order is None:
        return quantize_activations(x, kind)
    order = torch.as_tensor(order)
    back = torch.argsort(order)
    return quantize_activations(x[..., order], kind)[..., back]


def emulate_matmul_inputs(model, types: dict[str, T], col_orders: dict | None = None, when=None) -> list:
    """Register pre-hooks on the nn.Linear modules whose weight (HF name -> ggml type) is not F32;
    returns the hook handles (call .remove() on each to undo). `col_orders`: HF weight name -> the
    GGUF's column order, where it differs (see weights.fake_quant_state_dict). `when`: a predicate
    that switches the emulation on (a model shared with the fp32 reference: while its variant runs)."""
    import torch

    handles = []
    col_orders = col_orders or {}
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        kind = vec_dot_kind(types.get(f"{name}.weight", T.F32))
        if kind is None:
            continue
        order = col_orders.get(f"{name}.weight")
        handles.append(mod.register_forward_pre_hook(
            lambda m, args, kind=kind, order=order: None if when is not None and not when()
            else (_in_order(args[0], kind, order), *args[1:])))
    return handles
