"""Fidelity table: each GGUF type against the transformers reference, in llama.cpp.

    python bench/fidelity.py [--model DIR] [--quants F16,Q8_0,Q6_K,...] [--imatrix] [--json out.json]

For each type: KL divergence of llama.cpp's next-token distribution from the float32 reference's
(mean and p99 over every position of the held-out chat prompts, recipes/chat_prompts.json, which the
calibration set does not contain), top-1 agreement, decoder file size and bits per weight. With
--imatrix, Q4_K_M is also measured with an importance matrix from the default calibration set.
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_QUANTS = "F16,Q8_0,Q6_K,Q5_K_M,Q5_K_S,Q4_K_M,Q4_K_S,Q3_K_M,Q2_K"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="checkpoint folder (default: the embedded tiny synthetic model)")
    ap.add_argument("--quants", default=DEFAULT_QUANTS)
    ap.add_argument("--imatrix", action="store_true", help="also Q4_K_M with an importance matrix")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))

    from convert.gguf.export import export_gguf
    from runtimes.llamacpp import LlamaCppRuntime
    from runtimes.reference import ReferenceRuntime
    from validate.metrics import logits_agreement

    from common import held_out_ids, open_checkpoint

    ckpt = open_checkpoint(args.model)
    ref = ReferenceRuntime(ckpt, n_threads=args.threads)
    ids = [t for p in held_out_ids(ref.tokenizer) for t in p]
    ref_logits = ref.logits(ids)
    ref.close()

    # decoder weights (bits per weight count the whole decoder file, as llama.cpp reports it)
    n_params = sum(math.prod(ckpt.info(n).shape) for n in ckpt.names() if n.startswith("model.language_model."))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(q, None) for q in args.quants.split(",")]
        if args.imatrix:
            from convert.gguf.imatrix import collect_imatrix
            from quantize.calibration import load_calibration
            from quantize.imatrix import write_imatrix_gguf

            samples, ds = load_calibration("default", tokenizer=ckpt.tokenizer, n=args.calib_samples, seqlen=512)
            imat = write_imatrix_gguf(Path(tmp) / "imatrix.gguf",
                                      collect_imatrix(ckpt, samples, seqlen=512, datasets=[ds], n_threads=args.threads))
            jobs.append(("Q4_K_M", imat))
        for q, imat in jobs:
            label = q + (" + imatrix" if imat else "")
            out = Path(tmp) / label.replace(" ", "_")
            dec = export_gguf(ckpt, out, quant=q, quiet=True, imatrix=imat)[0]
            with LlamaCppRuntime(dec, n_ctx=max(2048, len(ids) + 16), n_threads=args.threads) as rt:
                m = logits_agreement(ref_logits, rt.logits(ids))
            size = dec.stat().st_size
            rows.append({"type": label, "kl_mean": m["kl_mean"], "kl_p99": m["kl_p99"], "top1": m["top1_agreement"],
                         "positions": m["positions"], "bytes": size, "bpw": 8 * size / n_params})
            print(f"{label}: KL {m['kl_mean']:.5f} (p99 {m['kl_p99']:.4f}), top-1 {m['top1_agreement']:.4f}", flush=True)

    print(f"\n{ckpt.name}: {len(ids)} positions\n")
    print("| type | KL mean | KL p99 | top-1 agreement | decoder size | bits/weight |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['type']} | {r['kl_mean']:.5f} | {r['kl_p99']:.4f} | {100 * r['top1']:.2f}% | "
              f"{r['bytes'] / 2**20:.1f} MiB | {r['bpw']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
