"""`python -m validate`: every artifact against the PyTorch reference, scenario by scenario.

    python -m validate [--model SRC] (ARTIFACTS_DIR | --decoder FILE [--mmproj FILE ...])
                       [--scenarios SET|NAMES] [--threads N] [--ctx N] [--memory-budget MB]
                       [--timeout S] [--phone PROFILE] [--imatrix FILE] [--json out.json] [--report out.html] [--quiet]

Exit codes: 0 every scenario passed (known differences and skips allowed), 2 bad input (one line
`error: ...`), 3 validation failed, 4 a runtime crashed or hung, 1 unexpected error.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from convert.cli import open_model, run
from convert.errors import ConvertError

REPORT_JSON, REPORT_HTML = "validation.json", "validation.html"


def _write_json(path: Path, report: dict) -> None:
    from convert.manifest import write_text_atomic

    write_text_atomic(path, json.dumps(report, indent=1, sort_keys=True) + "\n")


def validate_and_report(ckpt, artifacts, *, scenarios: str = "default", profile=None, quiet: bool = False,
                        imatrix=None, json_out: Path | None = None, html_out: Path | None = None,
                        speed_anchor: bool = True, max_kl: float | None = None) -> dict:
    """Run the harness, print the summary, write the reports. Shared with `python -m convert`."""
    from .harness import run_validation
    from .report import summary_text, write_html
    from .scenarios import load_scenarios

    chosen = load_scenarios(scenarios)
    report = run_validation(ckpt, artifacts, chosen, profile=profile, scenario_set=scenarios, quiet=quiet,
                            imatrix=imatrix, speed_anchor=speed_anchor, max_kl=max_kl)
    print(summary_text(report))
    if json_out:
        _write_json(Path(json_out), report)
        print(f"wrote {json_out}")
    if html_out:
        write_html(report, Path(html_out))
        print(f"wrote {html_out}")
    return report


def cmd_validate(args) -> int:
    from .artifacts import discover

    if args.artifacts is None and args.decoder is None:
        raise ConvertError("give an artifacts folder or --decoder FILE")
    if args.mmproj and args.decoder is None:
        raise ConvertError("--mmproj goes with --decoder (a folder's projectors are found by themselves)")
    for flag, v in (("--threads", args.threads), ("--ctx", args.ctx), ("--memory-budget", args.memory_budget),
                    ("--timeout", args.timeout), ("--max-kl", args.max_kl)):
        if v is not None and not 0 < v < math.inf:  # NaN and inf too: a deadline select() cannot take
            raise ConvertError(f"{flag} {v}: must be a positive finite number")
    from .scenarios import load_scenarios

    load_scenarios(args.scenarios)  # an unknown set fails before anything loads
    if args.phone:
        from runtimes.phone.profiles import get_profile

        get_profile(args.phone)
    from runtimes.base import RUNTIMES

    if args.runtime is not None and args.runtime not in RUNTIMES and ":" not in args.runtime:
        raise ConvertError(f"--runtime {args.runtime!r}: unknown; choose one of {', '.join(RUNTIMES)} or MODULE:CLASS")
    artifacts = discover(args.artifacts, args.decoder, args.mmproj, runtime=args.runtime)
    ckpt = open_model(args)
    profile = make_profile(args, runtime=args.runtime or "llama.cpp")
    folder = Path(args.artifacts) if args.artifacts else None
    json_out = Path(args.json) if args.json else (folder / REPORT_JSON if folder else None)
    html_out = Path(args.report) if args.report else (folder / REPORT_HTML if folder else None)
    report = validate_and_report(ckpt, artifacts, scenarios=args.scenarios, profile=profile, quiet=args.quiet,
                                 imatrix=args.imatrix, json_out=json_out, html_out=html_out,
                                 speed_anchor=not args.no_speed_anchor, max_kl=args.max_kl)
    return report["exit_code"]


def make_profile(args, **fields):
    """The harness's profile from the options: a phone profile's settings (and its aarch64 runtimes,
    built on first use) under --phone, the options given on top."""
    from .harness import Profile

    over = {"threads": getattr(args, "threads", None), "n_ctx": getattr(args, "ctx", None),
            "memory_budget_mb": getattr(args, "memory_budget", None), "timeout_s": getattr(args, "timeout", None)}
    if getattr(args, "phone", None):
        from runtimes.phone.build import ensure
        from runtimes.phone.profiles import get_profile

        return Profile.for_phone(ensure(get_profile(args.phone), quiet=args.quiet), **fields, **over)
    prof = Profile(**fields)
    for k, v in over.items():
        if v is not None:
            setattr(prof, k, v)
    return prof


def add_phone_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--phone", metavar="PROFILE", help="run the runtimes under an emulated phone (recipes/phones.toml: "
                   "android-armv82, android-armv86, harmonyos): the app's llama.cpp build for aarch64 under qemu, "
                   "compared with the references and with this machine's run of the same file (emulated ISA and "
                   "numerics, not phone speed; built on first use, python -m runtimes.phone setup)")


def add_profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scenarios", default="default", help="scenario set (default, quick, text, images) or a comma list")
    p.add_argument("--threads", type=int, help="runtime threads (default min(4, cores): a phone's big cores)")
    p.add_argument("--ctx", type=int, help="runtime context size (default 4096)")
    p.add_argument("--memory-budget", type=float, help="fail when a runtime's peak RSS exceeds this many MB (default 3072)")
    p.add_argument("--timeout", type=float, help="seconds per artifact before its runtime counts as hung (default 600)")
    p.add_argument("--max-kl", type=float, help="quality budget: fail when an artifact's mean KL divergence from the "
                   "fp32 reference exceeds this (nats; default: quality is reported, not judged)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m validate", description=__doc__.split("\n")[0])
    ap.add_argument("artifacts", nargs="?", help="folder with decoder and mmproj GGUFs (this project's or anyone's), "
                                                 "a GPTQ / AWQ / compressed-tensors checkpoint folder, an ONNX export "
                                                 "(python -m convert onnx) or an ExecuTorch export (python -m convert executorch)")
    ap.add_argument("--model", help="the source checkpoint (default: the tiny synthetic model)")
    ap.add_argument("--decoder", help="decoder GGUF (instead of a folder)")
    ap.add_argument("--mmproj", action="append", help="projector GGUF for --decoder; repeat for 16x and 4x")
    add_profile_args(ap)
    ap.add_argument("--runtime", help="runtime to load the artifacts in (default: the folder's own: llama.cpp for GGUF, "
                    "onnxruntime, executorch, coreml on macOS; coreml-proxy runs a Core ML package's weights in PyTorch)")
    add_phone_arg(ap)
    ap.add_argument("--imatrix", help="the importance matrix the artifact was quantized with (exact tensor checks)")
    ap.add_argument("--json", help=f"JSON report (default: {REPORT_JSON} in the artifacts folder)")
    ap.add_argument("--report", help=f"HTML report (default: {REPORT_HTML} in the artifacts folder)")
    ap.add_argument("--no-speed-anchor", action="store_true",
                    help="do not export a temporary F16 to measure speed ratios against")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.set_defaults(func=cmd_validate)
    return ap


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)
