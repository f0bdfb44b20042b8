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

    from common import decoder_params, held_out_reference, measure_decoder, open_checkpoint, print_decoder_table

    ckpt = open_checkpoint(args.model)
    ids, ref_logits = held_out_reference(ckpt, args.threads)
    n_params = decoder_params(ckpt)
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
            rows.append(measure_decoder(label, dec, ids, ref_logits, n_params, args.threads))

    print(f"\n{ckpt.name}: {len(ids)} positions\n")
    print_decoder_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
