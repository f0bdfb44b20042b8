"""AWQ carry-over into GGUF: does AWQ's activation-aware scaling help llama.cpp's Q4_K_M?

    python bench/awq_gguf.py [--model DIR] [--calib-samples N] [--seqlen 512] [--json out.json]

Rows (all Q4_K_M decoders, llama.cpp, against the ORIGINAL checkpoint's float32 reference):
plain; plain + importance matrix; AWQ-folded (the AWQ folder's folded full-precision model,
convert/quantized_source.py, quantized by the exporter); AWQ-folded + an importance matrix collected
on the folded model (its activations differ: every scaled input is x / s); and, for comparison, the
AWQ folder's int4 weights dequantized and re-quantized (what the exporter does without the source).
KL divergence of the next-token distribution (mean and p99 over every position of the held-out chat
prompts, recipes/chat_prompts.json, which the calibration set does not contain), top-1 agreement,
decoder size and bits per weight, as bench/fidelity.py. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="checkpoint folder (default: the embedded tiny synthetic model)")
    ap.add_argument("--calib-samples", type=int, help="calibration samples (default 128 for AWQ, 64 for the "
                    "importance matrices, as `python -m quantize awq` and bench/fidelity.py)")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))

    from convert.gguf.export import export_gguf
    from convert.gguf.imatrix import collect_imatrix
    from convert.hf_quant import write_quantized_checkpoint
    from convert.quantized_source import AWQ_SCALES, QuantizedCheckpoint
    from quantize.calibration import load_calibration
    from quantize.imatrix import write_imatrix_gguf
    from quantize.qweight import Scheme
    from quantize.sequential import quantize_model

    from common import decoder_params, held_out_reference, measure_decoder, open_checkpoint, print_decoder_table

    ckpt = open_checkpoint(args.model)
    ids, ref_logits = held_out_reference(ckpt, args.threads)
    n_params = decoder_params(ckpt)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        n_awq, n_imat = (args.calib_samples, args.calib_samples) if args.calib_samples else (128, 64)
        samples, ds = load_calibration("default", tokenizer=ckpt.tokenizer, n=n_awq, seqlen=args.seqlen)
        result = quantize_model(ckpt, "awq", Scheme(4, args.group_size, sym=False), samples, seqlen=args.seqlen,
                                n_threads=args.threads)
        # the folder `python -m quantize awq` writes, scales included
        extra = {AWQ_SCALES: result.scale_tensors()}
        awq_dir = write_quantized_checkpoint(ckpt, result.weights, tmp / "awq", "awq", extra_tensors=extra,
                                             dense_updates=result.dense_for_checkpoint(), quiet=True)
        print(f"AWQ: {len(result.weights)} linears, {result.stats.get('tokens')} tokens, "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        folded = QuantizedCheckpoint(awq_dir, quiet=True)
        if folded.dense_kind != "awq-folded":
            raise SystemExit(f"the AWQ folder did not give the folded model: {folded.note}")
        # the same folder with its source out of reach: the exporter's fallback
        (tmp / "awq-alone").mkdir()
        for p in awq_dir.iterdir():
            (tmp / "awq-alone" / p.name).symlink_to(p)
        (tmp / "awq-alone" / "manifest.json").unlink()
        dequant = QuantizedCheckpoint(tmp / "awq-alone", quiet=True)
        assert dequant.dense_kind == "dequantized"

        isamples, ids_ds = load_calibration("default", tokenizer=ckpt.tokenizer, n=n_imat,
                                            seqlen=args.seqlen)
        imats = {}
        for label, src in (("plain", ckpt), ("folded", folded)):
            # collect_imatrix runs the reference of `src`: the folded model for the AWQ view
            imats[label] = write_imatrix_gguf(tmp / f"imatrix-{label}.gguf", collect_imatrix(
                src, isamples, seqlen=args.seqlen, datasets=[ids_ds], n_threads=args.threads, quiet=True))

        jobs = [("Q4_K_M", ckpt, None), ("Q4_K_M + imatrix", ckpt, imats["plain"]),
                ("AWQ-folded Q4_K_M", folded, None), ("AWQ-folded Q4_K_M + imatrix (folded)", folded, imats["folded"]),
                ("AWQ int4 dequantized -> Q4_K_M", dequant, None)]
        for k, (label, src, imat) in enumerate(jobs):
            dec = export_gguf(src, tmp / f"gguf{k}", quant="Q4_K_M", quiet=True, imatrix=imat)[0]
            rows.append(measure_decoder(label, dec, ids, ref_logits, n_params, args.threads))

    print(f"\n{ckpt.name}: {len(ids)} positions; AWQ 4-bit g{args.group_size} asym on {n_awq} samples, "
          f"imatrix on {n_imat}, seqlen {args.seqlen}\n")
    print_decoder_table(rows, "decoder")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
