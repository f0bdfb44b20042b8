"""`python -m convert SUBCOMMAND`: thin argument parsing over library calls.

Exit codes: 0 success, 2 bad input or options (one-line message, no traceback), 1 unexpected error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import ConvertError


def _model(args) -> "Checkpoint":  # noqa: F821
    from .checkpoint import Checkpoint

    if args.model is None:
        from .synth.build import default_model

        path = default_model(quiet=args.quiet)
        print(f"no --model given: using the embedded default, the tiny synthetic MiniCPM-V 4.6 ({path})")
        return Checkpoint(path)
    return Checkpoint(args.model)


def cmd_synth(args) -> int:
    from .synth.build import build_synthetic

    rep = build_synthetic(args.preset, Path(args.out), seed=args.seed, report=not args.no_report, quiet=args.quiet)
    print(f"wrote synthetic MiniCPM-V 4.6 ({args.preset}, seed {args.seed}) to {args.out}")
    if rep and not args.quiet:
        from .synth.behaviour import format_report

        print(format_report(rep))
    return 0


def cmd_gguf(args) -> int:
    from .gguf.export import export_gguf

    ckpt = _model(args)
    out = Path(args.out) if args.out else Path("out") / ckpt.name
    paths = export_gguf(ckpt, out, quant=args.quant, mode=args.mode, force=args.force,
                        allow_nonfinite=args.allow_nonfinite, quiet=args.quiet, name=args.name)
    for p in paths:
        print(f"wrote {p} ({p.stat().st_size / 2**20:.1f} MiB)")
    print(f"wrote {out / 'manifest.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m convert", description="Export MiniCPM-V 4.6 to edge formats.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("synth", help="build a synthetic MiniCPM-V 4.6 checkpoint (real architecture, seeded weights)")
    s.add_argument("--preset", default="tiny", help="tiny (default), tiny-alt, tiny-k or full (real shapes, ~1.3B)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-report", action="store_true", help="skip the behaviour report")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_synth)

    g = sub.add_parser("gguf", help="write the decoder GGUF and the vision projector GGUF(s) for llama.cpp")
    g.add_argument("--model", help="checkpoint folder or a hub id in the local cache (default: the tiny synthetic model)")
    g.add_argument("--quant", "--outtype", dest="quant", default="f16", help="f32, f16 (default), bf16 or q8_0")
    g.add_argument("--mode", default="16x", help="projector downsample mode: 16x (default), 4x or both")
    g.add_argument("--out", help="output folder (default ./out/<model name>)")
    g.add_argument("--name", help="general.name written into the files (default: from the checkpoint)")
    g.add_argument("--force", action="store_true", help="write into a folder that holds other files")
    g.add_argument("--allow-nonfinite", action="store_true", help="write tensors holding NaN/Inf instead of refusing")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.set_defaults(func=cmd_gguf)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
