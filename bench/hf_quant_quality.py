"""GPTQ and AWQ against round-to-nearest with the same scheme: KL divergence to the reference.

    python bench/hf_quant_quality.py [--model DIR] [--calib-samples 128] [--seqlen 512] [--json out.json]
                                     [--from gptq=DIR] [--from awq=DIR]

Each method quantizes the decoder's linears (4-bit, group 128; GPTQ and its RTN baseline
symmetric, AWQ and its baseline asymmetric, RTN without clipping); the model carrying the
result's weights (dequantized, AWQ's scales undone: `effective_weight`) is then run in float32 on
the held-out chat prompts (recipes/chat_prompts.json, not in the calibration set) and on the
validation scenarios' text prompts, and compared with the unquantized checkpoint: mean KL
divergence and top-1 agreement over every position. The loaders reproduce these weights to one
float16 step (tests/test_hf_quant.py), so this is the checkpoint's quality, not a loader's.
--from METHOD=DIR takes that method's result from a checkpoint `python -m quantize` wrote (e.g. the
benchmark's, with the same calibration budget) instead of quantizing again: its dense tensors
(AWQ's folded norms) and its dequantized linears, i.e. exactly what the folder holds.
Prints a Markdown table; target: GPTQ and AWQ KL <= 0.8 x their RTN baseline's.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--json")
    ap.add_argument("--from", dest="sources", action="append", default=[], metavar="METHOD=DIR",
                    help="gptq=DIR or awq=DIR: evaluate that checkpoint instead of quantizing")
    args = ap.parse_args()
    sources = dict(x.split("=", 1) for x in args.sources)
    if set(sources) - {"gptq", "awq"}:
        ap.error("--from takes gptq=DIR or awq=DIR")
    sys.path.insert(0, str(ROOT))

    import torch

    from convert.gguf.imatrix import load_reference_model
    from quantize.calibration import load_calibration
    from quantize.qweight import Scheme
    from quantize.sequential import LAYERS_PREFIX, effective_weight, quantize_model
    from validate.metrics import compare_logits
    from validate.scenarios import TextPart, build_turns, load_scenarios

    from common import held_out_ids, open_checkpoint

    ckpt = open_checkpoint(args.model)
    tok = ckpt.tokenizer
    prompts = held_out_ids(tok)
    for sc in load_scenarios("text"):
        prompts.append([t for turn in build_turns(sc, tok) for p in turn if isinstance(p, TextPart) for t in p.ids])
    base = load_reference_model(ckpt, quiet=True)

    def logits(model):
        with torch.no_grad():
            return [model(input_ids=torch.tensor([p]), use_cache=False).logits[0].float().numpy() for p in prompts]

    ref = logits(base)
    samples, _ = load_calibration("default", tokenizer=tok, n=args.calib_samples, seqlen=args.seqlen, seed=0)
    sym, asym = Scheme(4, args.group_size, sym=True), Scheme(4, args.group_size, sym=False)
    rows = []
    for label, method, scheme in (("RTN sym", "rtn", sym), ("GPTQ sym", "gptq", sym), ("RTN asym", "rtn", asym),
                                  ("AWQ asym", "awq", asym)):
        t0 = time.perf_counter()
        if method in sources:
            from convert.hf_quant import read_quantized

            _, weights, dense = read_quantized(sources[method])
            sd = {k: v.float() for k, v in dense.items() if k.startswith(LAYERS_PREFIX)}
            sd.update({f"{m}.weight": qw.dequantize() for m, qw in weights.items()})
            label += " (checkpoint)"
        else:
            # RTN only reads the weights; GPTQ and AWQ modify the model they are given
            res = quantize_model(ckpt, method, scheme, samples, seqlen=args.seqlen, quiet=True,
                                 model=base if method == "rtn" else copy.deepcopy(base))
            sd = {f"{n}.weight": effective_weight(res, n) for n in res.weights}
        model = copy.deepcopy(base)
        missing = set(sd) - set(model.state_dict())
        if missing:
            raise SystemExit(f"{sorted(missing)[:3]}: not tensors of the model")
        model.load_state_dict(sd, strict=False)
        got = logits(model)
        del model, sd  # one quantized copy at a time next to the reference (the full model is 5 GB in float32)
        import numpy as np

        m = compare_logits(np.concatenate(ref), np.concatenate(got))[0]
        rows.append({"method": label, "kl_mean": m["kl_mean"], "kl_p99": m["kl_p99"], "top1": m["top1_agreement"],
                     "positions": m["positions"], "seconds": time.perf_counter() - t0})
        print(f"{label}: KL {m['kl_mean']:.5f}, top-1 {m['top1_agreement']:.4f} ({rows[-1]['seconds']:.0f} s)", flush=True)
    by = {r["method"]: r for r in rows}
    print(f"\n{ckpt.name}: {rows[0]['positions']} positions, {args.calib_samples} calibration samples x {args.seqlen}\n")
    print("| method | KL mean | KL p99 | top-1 agreement | KL / RTN's |\n|---|---|---|---|---|")
    for r in rows:
        b = by["RTN asym" if "asym" in r["method"] else "RTN sym"]
        print(f"| {r['method']} | {r['kl_mean']:.5f} | {r['kl_p99']:.4f} | {100 * r['top1']:.2f}% | "
              f"{r['kl_mean'] / b['kl_mean']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
