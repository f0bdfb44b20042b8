"""A quantized HF checkpoint (GPTQ v1, AWQ GEMM, compressed-tensors pack-quantized) loaded by
transformers on CPU through the real loaders, as a deployment would load it:

* GPTQ: transformers -> optimum -> gptqmodel `TorchLinear` (config `"backend": "torch"`)
* AWQ: transformers -> gptqmodel `AwqTorchLinear` (config `"backend": "torch_awq"`)
* compressed-tensors: transformers -> compressed-tensors, decompressed to dense on first use

Those backends dequantize and then matmul, so the result equals a fake-quant model up to the
matmul's rounding (shared quantization.md §3.2). Everything else is the float reference's code.
The loaders are an optional extra: `pip install -e '.[hf-quant]'`.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path

from convert.checkpoint import Checkpoint
from convert.errors import ConvertError

from .base import RuntimeUnavailableError
from .reference import ReferenceRuntime

# quant_method -> the modules transformers imports to load it (import name, pip name)
LOADER_DEPS = {
    "gptq": (("optimum", "optimum"), ("gptqmodel", "gptqmodel")),
    "awq": (("gptqmodel", "gptqmodel"), ("accelerate", "accelerate")),
    "compressed-tensors": (("compressed_tensors", "compressed-tensors"),),
}


def require_loaders(method: str) -> None:
    """Raise RuntimeUnavailableError (one line) if a loader for `method` cannot be imported."""
    missing = []
    for mod, pip_name in LOADER_DEPS[method]:
        try:
            importlib.import_module(mod)
        except ImportError:
            missing.append(pip_name)
    if missing:
        raise RuntimeUnavailableError(f"the transformers-quant runtime needs {', '.join(missing)} to load {method} "
                                      f"checkpoints: pip install -e '.[hf-quant]'")


def _eager_dequant(model) -> int:
    """gptqmodel's TorchLinear wraps its dequantize in torch.compile (inductor), which costs about a
    minute of C++ compilation on first use on 2 cores and gives the same values (dequantization
    is exact either way); drop the per-instance wrapper so the class's eager method is used."""
    n = 0
    for mod in model.modules():
        if "dequantize_weight" in vars(mod):
            del mod.dequantize_weight
            n += 1
    return n


class HFQuantRuntime(ReferenceRuntime):
    """transformers' MiniCPMV4_6ForConditionalGeneration over a quantized folder.

    dtype: the compute dtype. float16 by default: the GPTQ/AWQ torch kernels compute in fp16 (AWQ
    casts float32 inputs to fp16 anyway), and their fp16 scales are then used as stored; under
    bfloat16 the fp16 scales are rounded again and results drift by bf16 steps.
    """

    name = "transformers-quant"

    reads_dense_view = False  # always the real loaders, even when handed a QuantizedCheckpoint

    def __init__(self, model: str | Path | Checkpoint, *, n_threads: int | None = None, dtype: str = "float16", **kwargs):
        ckpt = model if isinstance(model, Checkpoint) else Checkpoint(model)
        qcfg = ckpt.config.get("quantization_config")
        if not isinstance(qcfg, dict):
            raise ConvertError(f"{ckpt.path}: not a quantized checkpoint (no quantization_config); "
                               "use the transformers runtime")
        self.method = str(qcfg.get("quant_method"))
        if self.method not in LOADER_DEPS:
            raise ConvertError(f"{ckpt.path}: quant_method {self.method!r} is not one of {', '.join(LOADER_DEPS)}")
        require_loaders(self.method)
        t0 = time.perf_counter()
        super().__init__(ckpt, n_threads=n_threads, dtype=dtype, **kwargs)
        _eager_dequant(self.model)
        self.load_seconds = time.perf_counter() - t0

    def _embeds(self, segments):
        # the reference builds float32 embeddings; a float16 model needs its own dtype
        return super()._embeds(segments).to(self.model.dtype)
