"""`python -m quantize SUBCOMMAND`: thin argument parsing over library calls.

    python -m quantize imatrix [--model SRC] [--calib SET|PATH] [--samples N] [--seqlen N]
                               [--seed N] [--mode 16x|4x] [--process-output] [--threads N]
                               --out imatrix.gguf [--quiet]

Exit codes: 0 success, 2 bad input or options (one line `error: ...` on stderr), 1 unexpected error.
"""

from __future__ import annotations

import argparse
import time

from convert.cli import open_model
from convert.errors import ConvertError


def cmd_imatrix(args) -> int:
    from .calibration import load_calibration
    from convert.gguf.imatrix import collect_imatrix

    from .imatrix import write_imatrix_gguf

    if args.seqlen < 1:
        raise ConvertError(f"--seqlen {args.seqlen}: must be at least 1")
    if args.samples is not None and args.samples < 1:
        raise ConvertError(f"--samples {args.samples}: must be at least 1")
    if args.threads < 0:
        raise ConvertError(f"--threads {args.threads}: must be 0 (torch's default) or more")
    if args.mode not in (None, "16x", "4x"):
        raise ConvertError(f"--mode {args.mode}: choose 16x or 4x")
    t0 = time.perf_counter()
    ckpt = open_model(args)
    samples, dataset = load_calibration(args.calib, tokenizer=ckpt.tokenizer, n=args.samples,
                                        seqlen=args.seqlen, seed=args.seed)
    stats: dict = {}
    data = collect_imatrix(ckpt, samples, seqlen=args.seqlen, mode=args.mode, datasets=[dataset],
                           process_output=args.process_output, quiet=args.quiet, n_threads=args.threads,
                           stats=stats)
    path = write_imatrix_gguf(args.out, data)
    if args.process_output and ckpt.spec.tie_word_embeddings:
        print("note: tied embeddings: the GGUF has no output.weight (llama.cpp reuses token_embd), so no entry for it")
    print(f"wrote {path}: {len(data)} matrices from {stats['samples']} samples ({stats['images']} with an image), "
          f"{stats['tokens']} tokens ({stats['image_tokens']} image tokens), chunk size {data.chunk_size}, "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .calibration import DEFAULT_SAMPLES, DEFAULT_SEQLEN, SETS
    from convert.gguf.imatrix import DEFAULT_THREADS

    ap = argparse.ArgumentParser(prog="python -m quantize", description="Quantization tools for MiniCPM-V 4.6.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    m = sub.add_parser("imatrix", help="importance matrix (llama.cpp's GGUF imatrix format) from image+text "
                                       "calibration chats run through the PyTorch reference")
    m.add_argument("--model", help="checkpoint folder or a hub id in the local cache "
                                   "(default: the tiny synthetic model)")
    m.add_argument("--calib", default="default",
                   help=f"calibration set ({', '.join(SETS)}; default: default), a folder of name.jpg|png + name.txt "
                        "pairs, or a .txt file cut into --seqlen chunks")
    m.add_argument("--samples", type=int, help=f"number of samples (default {DEFAULT_SAMPLES} for a set; "
                                               "all of a folder or file)")
    m.add_argument("--seqlen", type=int, default=DEFAULT_SEQLEN,
                   help=f"max tokens per sample, written as imatrix.chunk_size (default {DEFAULT_SEQLEN})")
    m.add_argument("--seed", type=int, default=0, help="seed for the calibration set (default 0)")
    m.add_argument("--mode", help="image downsample mode, 16x or 4x (default: the processor's)")
    m.add_argument("--process-output", action="store_true",
                   help="also collect output.weight (untied lm_head only), like llama-imatrix --process-output")
    m.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                   help=f"torch threads (default {DEFAULT_THREADS}; 0: torch's default)")
    m.add_argument("--out", required=True, help="output file, e.g. imatrix.gguf")
    m.add_argument("--quiet", action="store_true", help="no progress bars")
    m.set_defaults(func=cmd_imatrix)
    return ap


def main(argv: list[str] | None = None) -> int:
    from convert.cli import run

    return run(build_parser(), argv)
