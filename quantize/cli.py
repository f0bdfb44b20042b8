"""`python -m quantize SUBCOMMAND`: thin argument parsing over library calls.

    python -m quantize imatrix [--model SRC] [--calib SET|PATH] [--samples N] [--seqlen N]
                               [--seed N] [--mode 16x|4x] [--process-output] [--threads N]
                               --out imatrix.gguf [--quiet]
    python -m quantize gptq|awq [--model SRC] --out DIR [--bits 4] [--group-size 128]
                               [--format gptq|awq|compressed-tensors] [--sym|--asym] [--act-order]
                               [--static-groups] [--damp F] [--no-clip] [--calib SET|PATH]
                               [--calib-samples N] [--seqlen N] [--seed N] [--threads N]
                               [--no-validate] [--scenarios SET] [--force] [--quiet]

Exit codes: 0 success, 2 bad input or options (one line `error: ...` on stderr), 3 the written
checkpoint failed validation (kept, marked in manifest.json), 4 its runtime crashed, 1 unexpected error.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from convert.cli import check_validation_args, open_model
from convert.errors import ConvertError


def cmd_imatrix(args) -> int:
    from .calibration import calibration_layout, load_calibration
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
    print(f"calibration layout: {calibration_layout(ckpt, samples)}")
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


# Valid (algorithm, format) pairs. compressed-tensors is symmetric only: the asymmetric variant
# does not load in transformers 5.23 (checked in quantization.md, section 3.2).
FORMATS_BY_METHOD = {"gptq": ("gptq", "compressed-tensors"), "awq": ("awq", "compressed-tensors")}
DEFAULT_FORMAT = {"gptq": "gptq", "awq": "awq"}
DEFAULT_SYM = {"gptq": True, "awq": False}
DEFAULT_CALIB_SAMPLES = 128


def _scheme_and_format(args):
    from .qweight import Scheme

    method = args.cmd
    fmt = args.format or DEFAULT_FORMAT[method]
    if fmt not in FORMATS_BY_METHOD[method]:
        raise ConvertError(f"--format {fmt} is not valid for {method}: choose {' or '.join(FORMATS_BY_METHOD[method])}")
    sym = DEFAULT_SYM[method] if args.sym is None else args.sym
    if fmt == "compressed-tensors" and not sym:
        raise ConvertError(f"--format compressed-tensors needs a symmetric scheme (pass --sym): the asymmetric variant does "
                           f"not load in transformers 5.23{'; or use --format awq' if method == 'awq' else ''}")
    if method == "awq" and (args.act_order or args.static_groups):
        raise ConvertError("--act-order and --static-groups are GPTQ options, not AWQ's")
    for flag, v, lo in (("--bits", args.bits, 2), ("--group-size", args.group_size, 1), ("--calib-samples", args.calib_samples, 1),
                        ("--seqlen", args.seqlen, 1)):
        if v < lo:
            raise ConvertError(f"{flag} {v}: must be at least {lo}")
    if args.bits not in (2, 4, 8) or (fmt == "awq" and args.bits != 4):
        raise ConvertError(f"--bits {args.bits}: {'the AWQ GEMM format holds 4 bits only' if fmt == 'awq' else 'choose 2, 4 or 8'}")
    return Scheme(bits=args.bits, group_size=args.group_size, sym=sym, act_order=args.act_order,
                  static_groups=args.static_groups), fmt


def cmd_gptq_awq(args) -> int:
    """Quantize the decoder with GPTQ or AWQ and write a complete HF folder, then validate it."""
    from .calibration import calibration_layout, load_calibration
    from .sequential import quantize_model

    from convert.hf_quant import write_quantized_checkpoint

    scheme, fmt = _scheme_and_format(args)
    check_validation_args(args)
    if args.threads is not None and args.threads < 0:
        raise ConvertError(f"--threads {args.threads}: must be 0 (torch's default) or more")
    t0 = time.perf_counter()
    ckpt = open_model(args)
    if "quantization_config" in ckpt.config:
        raise ConvertError(f"{ckpt.path} is already quantized ({ckpt.config['quantization_config'].get('quant_method')}); "
                           "start from the full-precision checkpoint")
    samples, dataset = load_calibration(args.calib, tokenizer=ckpt.tokenizer, n=args.calib_samples, seqlen=args.seqlen,
                                        seed=args.seed)
    print(f"calibration layout: {calibration_layout(ckpt, samples)}")
    result = quantize_model(ckpt, args.cmd, scheme, samples, seqlen=args.seqlen, damp=args.damp, clip=not args.no_clip,
                            quiet=args.quiet, n_threads=args.threads, keep_folded=False)
    st = result.stats
    meta = {"quantizer": ["minicpmv-edge"], "method": args.cmd, "damp_percent": args.damp if args.cmd == "gptq" else None,
            "true_sequential": True, "static_groups": scheme.static_groups, "clip": args.cmd == "awq" and not args.no_clip,
            "calibration": {"dataset": dataset, "samples": st.get("samples"), "tokens": st.get("tokens"),
                            "image_tokens": st.get("image_tokens"), "seqlen": args.seqlen, "seed": args.seed}}
    meta = {k: v for k, v in meta.items() if v is not None}
    extra = None
    if args.cmd == "awq":
        # the scales let `python -m convert gguf --model DIR` rebuild the folded full-precision
        # weights from the source instead of re-quantizing dequantized int4 weights
        from convert.quantized_source import AWQ_SCALES

        extra = {AWQ_SCALES: result.scale_tensors()}
    out = write_quantized_checkpoint(ckpt, result.weights, args.out, fmt, dense_updates=result.dense_for_checkpoint(),
                                     meta=meta, quiet=args.quiet, force=args.force, extra_tensors=extra)
    print(f"{args.cmd.upper()} {scheme.bits}-bit g{scheme.group_size} {'sym' if scheme.sym else 'asym'} -> {fmt}: "
          f"{len(result.weights)} linears from {st.get('samples')} samples ({st.get('tokens')} tokens, "
          f"{st.get('image_tokens')} image tokens) in {time.perf_counter() - t0:.1f} s; wrote {out}")
    if args.no_validate:
        return 0
    from convert.cli import validate_hf_folder  # the entry point reaches into validate, as DESIGN.md allows

    return validate_hf_folder(args, ckpt, Path(out))


def _add_quant_parser(sub, method: str) -> None:
    from .calibration import SETS

    fmts = FORMATS_BY_METHOD[method]
    q = sub.add_parser(method, help=f"{method.upper()}-quantize the decoder's linears into an HF checkpoint "
                                    f"({' or '.join(fmts)} format) that transformers and vLLM load")
    q.add_argument("--model", help="checkpoint folder or a hub id in the local cache (default: the tiny synthetic model)")
    q.add_argument("--out", required=True, help="output folder (a complete HF checkpoint)")
    q.add_argument("--bits", type=int, default=4)
    q.add_argument("--group-size", type=int, default=128, help="columns per scale (must divide every in-features)")
    q.add_argument("--format", help=f"{' or '.join(fmts)} (default {DEFAULT_FORMAT[method]})")
    sym = q.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=None,
                     help=f"symmetric (zero point 2^(bits-1)){' (default)' if DEFAULT_SYM[method] else ''}")
    sym.add_argument("--asym", dest="sym", action="store_false",
                     help=f"asymmetric (a zero point per group){' (default)' if not DEFAULT_SYM[method] else ''}")
    q.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns by decreasing Hessian diagonal")
    q.add_argument("--static-groups", action="store_true", help="GPTQ: group parameters from the original weights")
    q.add_argument("--damp", type=float, default=0.01, help="GPTQ dampening, fraction of mean diag(H) (default 0.01)")
    q.add_argument("--no-clip", action="store_true", help="AWQ: skip the clipping search")
    q.add_argument("--calib", default="default", help=f"calibration set ({', '.join(SETS)}), a folder of image+text "
                                                      "pairs, or a .txt file (as for imatrix)")
    q.add_argument("--calib-samples", type=int, default=DEFAULT_CALIB_SAMPLES,
                   help=f"calibration samples (default {DEFAULT_CALIB_SAMPLES}; half of the default set's carry an image)")
    q.add_argument("--seqlen", type=int, default=512, help="max tokens per sample (default 512)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--threads", type=int, help="torch threads (default 1, robust on a shared machine, as for imatrix; "
                                                "0: torch's default, one per core)")
    q.add_argument("--no-validate", action="store_true", help="skip validating the checkpoint against the reference")
    q.add_argument("--scenarios", default="default", help="validation scenario set (default, quick, text, images)")
    q.add_argument("--force", action="store_true", help="replace a folder that holds other files")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=cmd_gptq_awq)


def build_parser() -> argparse.ArgumentParser:
    from .calibration import DEFAULT_SAMPLES, DEFAULT_SEQLEN, SETS
    from runtimes.reference import DEFAULT_THREADS

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
    _add_quant_parser(sub, "gptq")
    _add_quant_parser(sub, "awq")
    return ap


def main(argv: list[str] | None = None) -> int:
    from convert.cli import run

    return run(build_parser(), argv)
