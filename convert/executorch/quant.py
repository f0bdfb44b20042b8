"""torchao quantization of the export modules, as ExecuTorch's own LLM exporters apply it.

The same function quantizes the modules the `.pte` is traced from and the eager fake-quant reference
of the harness (validate/references.py), so the two differ only by the kernels that run them.

- `8da4w`: every decoder Linear (LM head included) with int8 dynamic per-token activations and int4
  weights in groups of 32 (torchao's `Int8DynamicActivationIntxWeightConfig`, the layout XNNPACK's
  dynamically-quantized fully-connected kernels take); a Linear whose input width is not a multiple
  of 32 gets int8 weights per output channel instead (XNNPACK's 4-bit weights, blockwise or per
  channel, need widths that are multiples of 32; its int8 per-channel kernel takes any width).
- `8da8w`: the same with int8 weights per output channel.
- The token embedding of a quantized export: int8 weights per row (`IntxWeightOnlyConfig`).
- The vision tower: fp32, or `8da8w` with `vision_quant="8da8w"`.
"""

from __future__ import annotations

from torch import nn

QUANTS = ("fp32", "8da4w", "8da8w")
VISION_QUANTS = ("fp32", "8da8w")
GROUP = 32


def _linear_config(quant: str, in_features: int):
    import torch
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    if quant == "8da4w" and in_features % GROUP == 0:
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(GROUP))
    return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))


def quantize_linears(module: nn.Module, quant: str) -> dict[str, str]:
    """Quantize every nn.Linear under `module` in place; returns {linear name: scheme} (the manifest's
    record of what got which layout)."""
    from torchao.quantization import quantize_

    if quant == "fp32":
        return {}
    done: dict[str, str] = {}
    for width in sorted({m.in_features for m in module.modules() if isinstance(m, nn.Linear)}):
        cfg = _linear_config(quant, width)

        def pick(m, fqn, width=width):
            return isinstance(m, nn.Linear) and m.in_features == width

        names = [n for n, m in module.named_modules() if pick(m, n)]
        quantize_(module, cfg, filter_fn=pick)
        scheme = f"8da4w group {GROUP}" if quant == "8da4w" and width % GROUP == 0 else "8da8w per channel"
        done.update({n: scheme for n in names})
    return done


def quantize_embedding(embedding: nn.Embedding) -> None:
    import torch
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis

    holder = nn.Module()
    holder.e = embedding
    quantize_(holder, IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)),
              filter_fn=lambda m, _: isinstance(m, nn.Embedding))


def untie_lm_head(hf_model) -> None:
    """Give the LM head its own weight (a copy) so quantizing it leaves the token embedding alone."""
    head = hf_model.lm_head
    if head.weight is hf_model.get_input_embeddings().weight:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)


def quantize_model(hf_model, quant: str, vision_quant: str = "fp32") -> dict[str, str]:
    """The transformers model quantized as the `.pte` is: decoder Linears (and the LM head), the token
    embedding, optionally the vision tower and merger. Returns {HF module name: scheme}."""
    if quant == "fp32" and vision_quant == "fp32":
        return {}
    untie_lm_head(hf_model)
    out: dict[str, str] = {}
    if quant != "fp32":
        lm = hf_model.model.language_model
        out.update({f"model.language_model.{n}": s for n, s in quantize_linears(lm.layers, quant).items()
                    if n})
        out.update({"lm_head": s for s in quantize_linears(_wrap(hf_model.lm_head), quant).values()})
        quantize_embedding(lm.embed_tokens)
        out["model.language_model.embed_tokens"] = "int8 per row (weight only)"
    if vision_quant != "fp32":
        for prefix, mod in (("model.vision_tower", hf_model.model.vision_tower), ("model.merger", hf_model.model.merger)):
            out.update({f"{prefix}.{n}": s for n, s in quantize_linears(mod, vision_quant).items()})
    return out


def _wrap(linear: nn.Module) -> nn.Module:
    holder = nn.Module()
    holder.lm_head = linear
    return holder
