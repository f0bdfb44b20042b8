"""Collecting an importance matrix through the PyTorch reference, keyed by GGUF tensor name.

Forward pre-hooks on the decoder's linears sum the squared inputs per column (in the GGUF
tensor's column order: where the converter reorders input columns, the sums are permuted the
same way). The file format and llama.cpp's normalisation live in quantize/imatrix.py; this
module is the glue between the converter's name tables and that format.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Iterable

import numpy as np

from quantize.imatrix import ImatrixData, ImatrixEntry

from ..errors import ConvertError

if TYPE_CHECKING:  # pragma: no cover
    from quantize.calibration import Sample

    from ..checkpoint import Checkpoint


# Transforms of the converter (convert/gguf/transforms.py) by what they do to a weight's input
# columns: "v_cols" reorders them; the others touch rows (output side) or 1-D tensors only.
COLUMN_TRANSFORMS = frozenset({"v_cols"})
ROW_TRANSFORMS = frozenset({"v_rows", "v_heads", "v_rows_after_qk", "add_one", "neg_exp", "squeeze"})


def column_permutation(transform_names: tuple[str, ...], n_in: int, spec) -> np.ndarray | None:
    """Index array p such that GGUF column j holds HF column p[j], or None for the identity."""
    from . import transforms

    unknown = [t for t in transform_names if t not in COLUMN_TRANSFORMS | ROW_TRANSFORMS]
    if unknown:
        raise ConvertError(f"imatrix: converter transform(s) {unknown} not classified as row or column reorders")
    cols = [t for t in transform_names if t in COLUMN_TRANSFORMS]
    if not cols:
        return None
    p = np.arange(n_in, dtype=np.int64)[None, :]
    for t in cols:
        p = transforms.TRANSFORMS[t](p, spec)
    p = np.asarray(p).reshape(-1)
    return None if np.array_equal(p, np.arange(n_in)) else p


class _Acc:
    __slots__ = ("name", "sum2", "count", "perm")

    def __init__(self, name: str, n_in: int, perm: np.ndarray | None):
        import torch

        self.name = name
        self.sum2 = torch.zeros(n_in, dtype=torch.float64)
        self.count = 0
        self.perm = perm


class ImatrixCollector:
    """Forward pre-hooks on a MiniCPM-V 4.6 model's decoder linears, keyed by GGUF tensor name.

    Hooks every `nn.Linear` whose `<module>.weight` maps (convert.gguf.names.DECODER) to a
    `blk.*` tensor; `lm_head` (`output.weight`) only with `process_output` and untied embeddings
    (with tied ones the GGUF has no `output.weight`). Use as a context manager.
    """

    def __init__(self, model, spec, *, process_output: bool = False):
        import torch

        from .names import DECODER

        self.spec = spec
        self.accs: dict[str, _Acc] = {}
        self._handles = []
        for mod_name, mod in model.named_modules():
            if not isinstance(mod, torch.nn.Linear):
                continue
            hf = f"{mod_name}.weight"
            try:
                m = DECODER.map(hf)
            except KeyError:
                raise ConvertError(f"imatrix: the model has a linear layer {mod_name} the converter "
                                   "does not know") from None
            if m is None:
                continue  # vision tower, merger, MTP: not in the decoder GGUF
            if m.gguf_name == "output.weight":
                if not process_output or spec.tie_word_embeddings:
                    continue
            elif not m.gguf_name.startswith("blk."):
                continue
            n_in = int(mod.in_features)
            acc = _Acc(m.gguf_name, n_in, column_permutation(m.transforms, n_in, spec))
            if acc.name in self.accs:
                raise ConvertError(f"imatrix: two layers map to {acc.name}")
            self.accs[acc.name] = acc
            self._handles.append(mod.register_forward_pre_hook(self._hook(acc), with_kwargs=True))

    @staticmethod
    def _hook(acc: _Acc):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["input"]
            x = x.detach().reshape(-1, x.shape[-1]).to(dtype=acc.sum2.dtype)
            acc.sum2 += (x * x).sum(0)
            acc.count += int(x.shape[0])

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def entries(self) -> dict[str, ImatrixEntry]:
        out = {}
        for name, a in self.accs.items():
            if a.count == 0:
                continue
            s = a.sum2.numpy()
            if a.perm is not None:
                s = s[a.perm]
            out[name] = ImatrixEntry(s.astype(np.float32), [a.count])
        return out


# The reference model loader lives with the reference runtime, where quantize/ can use it too
# (quantize must not import convert); re-exported here for this module's callers.
from runtimes.reference import DEFAULT_THREADS, hf_quiet as _hf_quiet, load_reference_model  # noqa: E402,F401


def collect_imatrix(ckpt: "Checkpoint", samples: Iterable["Sample"], *, seqlen: int, mode: str | None = None,
                    datasets: list[str] | None = None, process_output: bool = False, model=None,
                    quiet: bool = False, n_threads: int | None = DEFAULT_THREADS,
                    stats: dict | None = None) -> ImatrixData:
    """Run calibration samples (batch 1, float32, no grad) through the reference, hooked.

    chunk_size = `seqlen` (the most tokens any sample may have), chunk_count = samples run.
    n_threads: torch threads for the run (restored afterwards); None or 0 keeps torch's setting.
    `stats`, if given, receives tokens / image_tokens / samples / images / seconds.
    """
    import torch

    if seqlen < 1:
        raise ConvertError(f"--seqlen {seqlen}: must be at least 1")
    old = torch.get_num_threads()
    if n_threads:
        torch.set_num_threads(int(n_threads))
    try:
        if model is None:
            model = load_reference_model(ckpt, quiet=quiet)
        with _hf_quiet(quiet):
            return _collect(ckpt, model, list(samples), seqlen=seqlen, mode=mode, datasets=datasets,
                            process_output=process_output, quiet=quiet, stats=stats)
    finally:
        torch.set_num_threads(old)


def _collect(ckpt, model, samples, *, seqlen, mode, datasets, process_output, quiet, stats) -> ImatrixData:
    import torch
    from tqdm import tqdm

    from .plan import expected_shapes

    from quantize.calibration import encode_sample

    model.eval()
    proc = ckpt.processor
    mode = mode or getattr(proc.image_processor, "downsample_mode", None) or ckpt.spec.downsample_mode
    t0 = time.perf_counter()
    n_tok = n_img_tok = n_img = n_run = 0
    with ImatrixCollector(model, ckpt.spec, process_output=process_output) as col, torch.no_grad():
        bar = tqdm(samples, desc="imatrix", unit="sample", disable=quiet, leave=False)
        for s in bar:
            enc = encode_sample(proc, s, seqlen=seqlen, mode=mode)
            kw = {}
            if enc.pixel_values is not None:
                kw = dict(pixel_values=enc.pixel_values, target_sizes=enc.target_sizes)
                n_img += 1
            out = model.model(input_ids=enc.input_ids, use_cache=False, downsample_mode=mode, **kw)
            if "output.weight" in col.accs:
                model.lm_head(out.last_hidden_state)
            n_run += 1
            n_tok += enc.n_tokens
            n_img_tok += enc.n_image_tokens
            bar.set_postfix_str(f"{n_tok} tokens", refresh=False)
        entries = col.entries()
    want = expected_shapes(ckpt.spec, "decoder")
    for name, e in entries.items():
        if name in want and want[name][-1] != e.n_per_row:
            raise ConvertError(f"imatrix: {name} has {e.n_per_row} input columns, the GGUF tensor {want[name][-1]}")
    if n_run:
        missing = sorted(n for n, shp in want.items() if n.startswith("blk.") and len(shp) == 2
                         and not n.endswith("ssm_conv1d.weight") and n not in entries)
        if missing:
            raise ConvertError(f"imatrix: no statistics for {len(missing)} matrices, e.g. {missing[0]}")
    if stats is not None:
        stats.update(tokens=n_tok, image_tokens=n_img_tok, samples=n_run, images=n_img,
                     seconds=time.perf_counter() - t0)
    return ImatrixData(entries, list(datasets or []), chunk_count=n_run, chunk_size=int(seqlen))
