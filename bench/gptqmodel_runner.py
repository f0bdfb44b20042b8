"""GPTQModel quantizing a MiniCPM-V 4.6 checkpoint with the project's calibration set (bench/quant_bench.py's job).

    python bench/gptqmodel_runner.py --method gptq|awq --model DIR --out DIR [--calib default]
                                     [--calib-samples 128] [--seqlen 512] [--seed 0] [--threads N]
                                     [--dtype auto|float32|bfloat16] [--feed encoded|conversations]
                                     [--report out.json]

The scheme is the one `python -m quantize gptq|awq` uses by default: 4-bit, group 128;
GPTQ symmetric, desc_act False, act_group_aware (GPTQModel's "GAR" reordering, on by default there)
False, damp 0.01; AWQ asymmetric (zero point), GEMM format, packed with BACKEND.AWQ_TORCH (the
CUDA-only AWQ GEMM extension is not there on CPU). Every other GPTQModel setting is its default
(dtype auto = the checkpoint's bfloat16, offload_to_disk True, RTN fallback for modules that see
< 0.5% of the calibration tokens, the AWQ clip search).

How GPTQModel 7.7 takes calibration data for MiniCPM-V 4.6
(`gptqmodel/models/definitions/minicpmv_4_6.py::MiniCPMV4_6QModel`): `quantize(calibration)` hands
the list to the model class's `prepare_dataset`, which normalizes each row to a chat conversation
(`utils/calibration.py::normalize_chat_calibration_sample`: a str or {"text": str} becomes one user
turn, {"messages": [...]} is taken as is) and runs every batch through
`processor.apply_chat_template(conv, tokenize=True, add_generation_prompt=True, return_dict=True,
downsample_mode="16x", max_slice_nums=36)`; images ride inside the message content as
{"type": "image", "image": PIL}. The processor outputs (input_ids, attention_mask, pixel_values,
target_sizes) go through `model.generate(**batch)` until the first decoder layer stops the forward
and its inputs are cached. There is no token budget: nothing is cut at `seqlen`, images are sliced
up to 36 times, and a generation prompt is always appended.

--feed encoded (the default) gives GPTQModel exactly the model inputs our tool runs: the samples of
`quantize.calibration.load_calibration` encoded by `encode_sample(processor, sample, seqlen=L)` (cut at
L tokens, never inside an image, slicing reduced 9 -> 4 -> 2 -> 1 when an image does not fit) with
the processor's downsample mode, batch 1. This replaces the instance's `prepare_dataset` (the only
place GPTQModel turns rows into model inputs) with one that returns these batches; the rest of its
pipeline (input capture through `generate`, the layer loop, packing, saving) is untouched.
--feed conversations hands GPTQModel the same chats as conversations (the image put into the
content) and lets its own processor call build the inputs: same text and images, but not cut at
seqlen, slicing up to 36, and a generation prompt added, so it sees more tokens than ours.

The encoding of the calibration set happens inside this process, as it does inside ours.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# GPTQModel sizes its CPU worker pool from this (default (cores + 1) // 2, at most 12); with fewer than 2
# workers it refuses to start ("Virtual pool 'model_loader:cpu' requests 2 workers but parent ... only has 1"),
# which is the default on a 2-core machine.
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(min(12, max(2, ((os.cpu_count() or 1) + 1) // 2))))


def _conversation(sample) -> list[dict]:
    """One of our samples as a GPTQModel chat conversation (the image inside the content)."""
    conv = []
    for m in sample.messages:
        content = []
        for part in m["content"]:
            part = dict(part)
            if part.get("type") == "image":
                part["image"] = sample.image
            content.append(part)
        conv.append({"role": m["role"], "content": content})
    return conv


def _encoded_batches(ckpt, samples, seqlen: int) -> tuple[list[dict], dict]:
    """Our encoding of every sample as a GPTQModel calibration batch (batch size 1)."""
    import torch

    from quantize.calibration import encode_sample

    proc = ckpt.processor
    mode = getattr(proc.image_processor, "downsample_mode", None) or ckpt.spec.downsample_mode  # as sequential._capture
    batches = []
    st = {"samples": 0, "image_samples": 0, "tokens": 0, "image_tokens": 0, "downsample_mode": mode}
    for s in samples:
        enc = encode_sample(proc, s, seqlen=seqlen, mode=mode)
        b = {"input_ids": enc.input_ids, "attention_mask": torch.ones_like(enc.input_ids)}
        if enc.pixel_values is not None:
            b.update(pixel_values=enc.pixel_values, target_sizes=enc.target_sizes)
            st["image_samples"] += 1
        b["downsample_mode"] = mode
        batches.append(b)
        st["samples"] += 1
        st["tokens"] += enc.n_tokens
        st["image_tokens"] += enc.n_image_tokens
    return batches, st


def _quant_log(out: Path) -> dict:
    """GPTQModel's per-module log (quant_log.csv): modules quantized and the tokens each saw."""
    p = out / "quant_log.csv"
    if not p.is_file():
        return {}
    with open(p, newline="") as f:
        rows = list(csv.DictReader(f))
    mods = sorted({r.get("module", "") for r in rows})
    toks = sorted({r.get("samples", "") for r in rows})
    return {"modules_quantized": len(rows), "module_kinds": mods, "tokens_per_module": toks}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", choices=("gptq", "awq"), required=True)
    ap.add_argument("--model", required=True, help="checkpoint folder (full precision)")
    ap.add_argument("--out", required=True, help="output folder for GPTQModel's checkpoint")
    ap.add_argument("--calib", default="default", help="calibration set, as for python -m quantize (default: default)")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default 0: torch's default, all cores)")
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                    help="dtype GPTQModel loads the model in (default auto: GPTQModel's choice, bfloat16 here; "
                         "float32 works for GPTQ only)")
    ap.add_argument("--feed", default="encoded", choices=("encoded", "conversations"),
                    help="encoded: our processor outputs (identical inputs); conversations: GPTQModel's own encoding")
    ap.add_argument("--report", help="write figures and what was fed as JSON here")
    args = ap.parse_args(argv)
    if args.method == "awq" and args.dtype == "float32":
        ap.error("--dtype float32 with AWQ: GPTQModel's CPU AWQ packer (AwqTorchLinear) takes float16/bfloat16 only "
                 "(NotImplementedError at the first layer's packing)")

    t0 = time.perf_counter()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from gptqmodel import BACKEND, GPTQModel, __version__ as gptqmodel_version
    from gptqmodel.quantization.config import AWQConfig, FORMAT, GPTQConfig

    from convert import Checkpoint
    from quantize.calibration import load_calibration

    t_import = time.perf_counter() - t0
    ckpt = Checkpoint(args.model)
    samples, dataset = load_calibration(args.calib, tokenizer=ckpt.tokenizer, n=args.calib_samples, seqlen=args.seqlen,
                                        seed=args.seed)
    if args.feed == "encoded":
        batches, fed = _encoded_batches(ckpt, samples, args.seqlen)
        calibration = [f"placeholder {i}" for i in range(len(batches))]  # only its length is looked at
    else:
        batches = None
        calibration = [_conversation(s) for s in samples]
        fed = {"samples": len(samples), "image_samples": sum(s.image is not None for s in samples),
               "tokens": None, "image_tokens": None, "downsample_mode": "16x (GPTQModel's)"}
    t_calib = time.perf_counter() - t0 - t_import

    if args.method == "gptq":
        qcfg = GPTQConfig(bits=4, group_size=128, sym=True, desc_act=False, act_group_aware=False, damp_percent=0.01)
        qkw = {}
    else:
        qcfg = AWQConfig(bits=4, group_size=128, sym=False, format=FORMAT.GEMM)
        qkw = {"backend": BACKEND.AWQ_TORCH}
    lkw = {} if args.dtype == "auto" else {"dtype": getattr(torch, args.dtype)}
    model = GPTQModel.load(str(ckpt.path), qcfg, **lkw)
    dtype = str(model.model.dtype).replace("torch.", "")
    if batches is not None:
        def prepare_dataset(*_a, **_k):
            return batches

        model.prepare_dataset = prepare_dataset  # the instance attribute wins over MiniCPMV4_6QModel.prepare_dataset
    t_load = time.perf_counter() - t0 - t_import - t_calib
    head = {"tool": f"gptqmodel {gptqmodel_version}", "method": args.method, "model": str(ckpt.path), "feed": args.feed,
            "calibration": dataset, "dtype": dtype, "torch_threads": torch.get_num_threads(),
            "cpu_workers": os.environ.get("GPTQMODEL_CPU_WORKERS"), **fed}
    print("gptqmodel_runner: " + json.dumps(head), flush=True)  # what was fed, also for a run stopped before the end
    model.quantize(calibration, batch_size=1, **qkw)
    t_quant = time.perf_counter() - t0 - t_import - t_calib - t_load
    model.save(args.out)
    t_total = time.perf_counter() - t0
    rep = {
        **head, "out": args.out, **_quant_log(Path(args.out)),
        "seconds": {"import": round(t_import, 2), "calibration": round(t_calib, 2), "load": round(t_load, 2),
                    "quantize": round(t_quant, 2), "save": round(t_total - t_import - t_calib - t_load - t_quant, 2),
                    "total": round(t_total, 2)},
    }
    print("gptqmodel_runner: " + json.dumps(rep), flush=True)
    if args.report:
        Path(args.report).write_text(json.dumps(rep, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
