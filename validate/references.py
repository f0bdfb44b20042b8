"""The two PyTorch references an artifact is compared with.

* "fp32": the checkpoint in float32 through transformers, the ground truth.
* "fake-quant": the same model with every weight replaced by the source fake-quantized with the
  artifact's own per-tensor ggml types (this project's bit-exact quantizers), and each matmul's
  input rounded the way ggml's CPU backend rounds it for that type (cpu_numerics.py). An artifact that is
  a faithful conversion sits as close to it as the runtime's arithmetic allows, so what remains
  against "fp32" is quantization error, and what shows against "fake-quant" is conversion error.

A reference takes a prompt laid out the way the runtime under test lays it out: token-id
segments and image-chunk embeddings, the latter computed by the reference's own vision tower
from the runtime's own preprocessed pixels (so a different slice grid or letterbox in the
runtime's preprocessing does not hide or fake a runtime error).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from convert.checkpoint import Checkpoint
from runtimes.reference import ReferenceRuntime

_VARIANTS = itertools.count()


class Reference:
    """One reference model plus caches of its image features and sequence results."""

    def __init__(self, label: str, runtime: ReferenceRuntime, variant: str | None = None, hooks: list | None = None):
        self.label = label
        self.rt = runtime
        self.variant = variant  # a weight variant of a model shared with another reference
        self._hooks = hooks or []
        self._features: dict[tuple, list[np.ndarray]] = {}
        self._native: dict[tuple, list[np.ndarray]] = {}

    @classmethod
    def fp32(cls, ckpt: Checkpoint, threads: int | None = None, lazy: bool = False) -> "Reference":
        """lazy: weights held in the checkpoint's dtype, widened per part (runtimes/lazy_weights.py);
        the same numbers, a half of the memory for a bfloat16 checkpoint."""
        return cls("fp32", ReferenceRuntime(ckpt, n_threads=threads, lazy=lazy))

    @classmethod
    def fake_quant(cls, ckpt: Checkpoint, ggufs: list[Path], threads: int | None = None,
                   imatrix: str | Path | None = None, base: "Reference | None" = None) -> "Reference":
        """With `base` (a lazy fp32 reference): a variant of its model whose quantized weights are
        held as their bytes and dequantized per part as they run; else a model of its own."""
        from .cpu_numerics import emulate_matmul_inputs
        from .weights import iter_fake_quant, load_fake_quant

        if base is not None and base.rt.lazy is not None:
            return cls._variant(ckpt, ggufs, base, imatrix)
        rt = ReferenceRuntime(ckpt, n_threads=threads)
        types: dict = {}
        orders: dict = {}
        load_fake_quant(rt, iter_fake_quant(ckpt, ggufs, imatrix=imatrix, types=types, col_orders=orders),
                        restore=False)
        embed = "model.language_model.embed_tokens.weight"
        if ckpt.spec.tie_word_embeddings and embed in types:
            types.setdefault("lm_head.weight", types[embed])  # llama.cpp's output matmul reads token_embd
        emulate_matmul_inputs(rt.model, types, orders)
        return cls("fake-quant", rt)

    @classmethod
    def _variant(cls, ckpt: Checkpoint, ggufs: list[Path], base: "Reference", imatrix) -> "Reference":
        from .cpu_numerics import emulate_matmul_inputs
        from .weights import packed_fake_quant

        lazy = base.rt.lazy
        name = f"fake-quant-{next(_VARIANTS)}"
        types: dict = {}
        orders: dict = {}
        fill, rows = {}, {}
        for hf, packed in packed_fake_quant(ckpt, ggufs, imatrix=imatrix, types=types, col_orders=orders):
            fill[hf] = packed.fill
            if packed.row_wise:
                rows[hf] = packed.rows
        embed = "model.language_model.embed_tokens.weight"
        if ckpt.spec.tie_word_embeddings and embed in types:
            types.setdefault("lm_head.weight", types[embed])  # llama.cpp's output matmul reads token_embd
        lazy.add_variant(name, fill, rows)
        hooks = emulate_matmul_inputs(base.rt.model, types, orders, when=lambda: lazy.active == name)
        return cls("fake-quant", base.rt, variant=name, hooks=hooks)

    def _using(self):
        import contextlib

        return self.rt.lazy.using(self.variant) if self.variant else contextlib.nullcontext()

    @classmethod
    def from_hf_quantized(cls, ckpt: Checkpoint, folder: Path, threads: int | None = None,
                          dtype: str = "float16") -> "Reference":
        """The source model carrying a quantized HF folder's own weights: its dense tensors (AWQ's
        folded norms included) and every quantized linear dequantized, computed in float32. What is
        left between the loaders' output and this is their arithmetic (float16) and any misloading."""
        from convert.hf_quant import read_quantized

        from .weights import load_fake_quant

        _, weights, dense = read_quantized(folder)
        sd = {k: v.float() for k, v in dense.items()}
        sd.update({f"{m}.weight": qw.dequantize() for m, qw in weights.items()})
        rt = ReferenceRuntime(ckpt, n_threads=threads)
        load_fake_quant(rt, sd, restore=False)
        return cls("fake-quant", rt)

    @classmethod
    def from_onnx(cls, ckpt: Checkpoint, roles: dict[str, Path], threads: int | None = None) -> "Reference":
        """The source model carrying an ONNX export's own weights: an fp16 graph's as a float16 model
        (its activations are float16 too, so rounding every intermediate is what its type costs), an
        int4 graph's dequantized into the float32 model. A tied lm_head is untied first: the decoder's
        output matmul and the token embedding are quantized separately (MatMulNBits, GatherBlockQuantized)."""
        import torch

        from .onnx_artifact import artifact_weights
        from .weights import load_fake_quant

        weights = artifact_weights(roles)
        half = any(w.dtype == "float16" for n, w in weights.items() if n.startswith("model.language_model"))
        rt = ReferenceRuntime(ckpt, n_threads=threads, dtype="float16" if half else "float32")
        sd = {n: torch.from_numpy(w.value) for n, w in weights.items()}
        head = rt.model.lm_head
        if "lm_head.weight" in sd and head.weight.data_ptr() == rt.model.get_input_embeddings().weight.data_ptr():
            head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        load_fake_quant(rt, sd, restore=False)
        return cls("fake-quant", rt)

    @classmethod
    def from_coreml(cls, ckpt: Checkpoint, folder: Path, threads: int | None = None) -> "Reference":
        """transformers' model in float16 (a Core ML package computes in float16 whatever its weights)
        carrying the packages' own weights, int4 / int8 decompressed by coremltools: what the package
        computes, less the export modules' rewrite (one-hot cache writes, the unrolled delta rule,
        float16 states) and Core ML's kernels."""
        from runtimes.coreml import coreml_folder

        from .coreml_proxy import package_state, untie_if_apart

        from .weights import load_fake_quant

        _, _, sd = package_state(Path(folder), coreml_folder(Path(folder))["packages"], ckpt.path)
        rt = ReferenceRuntime(ckpt, n_threads=threads, dtype="float16")
        untie_if_apart(rt.model, sd)
        load_fake_quant(rt, sd, restore=False)
        return cls("fake-quant", rt)

    @classmethod
    def from_torchao(cls, ckpt: Checkpoint, quant: str, vision_quant: str = "fp32",
                     threads: int | None = None) -> "Reference":
        """The source model with the torchao quantization an ExecuTorch export applies, run in eager
        PyTorch (torchao's own int8-dynamic-activation / intx-weight arithmetic): what the `.pte`
        computes, less XNNPACK's kernels."""
        from convert.executorch.quant import quantize_model

        rt = ReferenceRuntime(ckpt, n_threads=threads)
        quantize_model(rt.model, quant, vision_quant)
        return cls("fake-quant", rt)

    @property
    def tokenizer(self):
        return self.rt.tokenizer

    def native_image(self, key: tuple, image, mode: str) -> list[np.ndarray]:
        """Embeddings per chunk with transformers' own preprocessing (its slice grid), cached by
        key: every artifact of a run compares with the same ones."""
        if key not in self._native:
            with self._using():
                self._native[key] = self.rt.image_embeddings(image, mode=mode)
        return self._native[key]

    def runtime_pixels_image(self, key: tuple, chunks: list[np.ndarray], patch_size: int, mode: str) -> list[np.ndarray]:
        """Embeddings per chunk of pixels preprocessed the way the runtime does (cached by key)."""
        if key not in self._features:
            from runtimes.mtmd_preproc import pack_for_reference

            pv, ts = pack_for_reference(chunks, patch_size)
            with self._using():
                self._features[key] = self.rt.features(pv, ts, mode)
        return self._features[key]

    def run(self, segments: list, n_greedy: int, teacher: list[int] | None = None) -> tuple[list[int], np.ndarray]:
        """(greedy tokens, logits at every text position of segments + teacher[:-1]).

        With `teacher` None the reference's own greedy continuation is the teacher."""
        with self._using():
            toks = self.rt.sequence_greedy(segments, n_greedy) if teacher is None else list(teacher)
            full = segments + ([toks[:-1]] if len(toks) > 1 else [])
            keep = np.concatenate([np.full(len(s), not _is_embedding(s)) for s in full])
            return toks, self.rt.sequence_logits(full, keep)  # logits only where they are scored

    def close(self) -> None:
        if self.variant is None:
            self.rt.close()
            return
        for h in self._hooks:
            h.remove()
        self.rt.lazy.drop_variant(self.variant)


def _is_embedding(seg) -> bool:
    return isinstance(seg, np.ndarray) and seg.dtype.kind == "f"
