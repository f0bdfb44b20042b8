"""`python -m convert SUBCOMMAND`: thin argument parsing over library calls.

Exit codes: 0 success, 2 bad input or options (one-line message, no traceback), 3 the written
artifacts failed validation (kept, marked failed in manifest.json), 4 the runtime crashed or hung
during validation, 1 unexpected error (a bug: one line, the traceback in a log file or
under --debug), 130/143 interrupted by SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import ConvertError


def open_model(args) -> "Checkpoint":  # noqa: F821
    """`--model`, or the embedded default (built on first use) with a line saying so. Shared by the CLIs."""
    from .checkpoint import Checkpoint
    from .quantized_source import open_checkpoint

    if args.model is None:
        from .synth.build import default_model

        path = default_model(quiet=args.quiet)
        print(f"no --model given: using the embedded default, the tiny synthetic MiniCPM-V 4.6 ({path})")
        return Checkpoint(path)
    # a GPTQ/AWQ/compressed-tensors folder is read as a dense float checkpoint (convert/quantized_source.py)
    return open_checkpoint(args.model, awq_source=getattr(args, "awq_source", None))


def check_validation_args(args) -> None:
    """Options of the validation that follows a write, checked before writing (an unknown
    --scenarios used to fail after the files were written). Shared by the CLIs."""
    max_kl = getattr(args, "max_kl", None)
    if max_kl is not None and not max_kl > 0:
        raise ConvertError(f"--max-kl {max_kl}: must be positive")
    if not args.no_validate and not getattr(args, "dry_run", False):
        from validate.scenarios import load_scenarios

        load_scenarios(args.scenarios)
    if getattr(args, "phone", None):
        if args.no_validate:
            raise ConvertError("--phone chooses where the validation runs: it cannot go with --no-validate")
        from runtimes.phone.profiles import get_profile
        from validate.harness import PHONE_RUNTIMES

        get_profile(args.phone)
        rt = getattr(args, "validation_runtime", None)
        if rt not in PHONE_RUNTIMES:
            raise ConvertError(f"--phone {args.phone}: these files run in {rt or 'transformers'}, which has no aarch64 "
                               f"build yet (the phone profiles run {', '.join(PHONE_RUNTIMES)})")


def cmd_synth(args) -> int:
    from .synth.build import build_synthetic

    # the behaviour report prints itself (unless --quiet) and is kept as synth_report.json
    build_synthetic(args.preset, Path(args.out), seed=args.seed, report=not args.no_report, quiet=args.quiet)
    print(f"wrote synthetic MiniCPM-V 4.6 ({args.preset}, seed {args.seed}) to {args.out}")
    return 0


def _overrides(args):
    """llama-quantize's overrides; they only mean something under a quantized mixture."""
    import re

    from quantize.mixtures import Overrides

    from .gguf.export import parse_quant, parse_type

    given = [f for f, v in (("--pure", args.pure), ("--output-tensor-type", args.output_tensor_type),
                            ("--token-embedding-type", args.token_embedding_type),
                            ("--tensor-type", args.tensor_type)) if v]
    if not given:
        return None
    if parse_quant(args.quant).mixture is None:
        raise ConvertError(f"{given[0]} needs a quantized --quant mixture (e.g. Q4_K_M), not {args.quant}")
    pats = []
    for spec in args.tensor_type or []:
        pat, sep, typ = spec.rpartition("=")
        if not sep or not pat:
            raise ConvertError(f"--tensor-type {spec!r}: expected PATTERN=TYPE")
        try:
            pats.append((re.compile(pat), parse_type(typ, "--tensor-type")))
        except re.error as e:
            raise ConvertError(f"--tensor-type {spec!r}: bad pattern ({e})") from None
    return Overrides(pure=args.pure,
                     output_type=parse_type(args.output_tensor_type, "--output-tensor-type") if args.output_tensor_type else None,
                     token_embedding_type=parse_type(args.token_embedding_type, "--token-embedding-type")
                     if args.token_embedding_type else None,
                     tensor_types=pats)


def cmd_gguf(args) -> int:
    from .gguf.export import describe_plan, export_gguf, plan_outputs

    if args.quant is not None and args.outtype is not None and args.quant.lower() != args.outtype.lower():
        raise ConvertError(f"--quant {args.quant} and --outtype {args.outtype} disagree; give one")
    args.quant = args.quant or args.outtype or "f16"
    if args.quant_threads is not None and args.quant_threads < 1:
        raise ConvertError(f"--quant-threads {args.quant_threads}: must be at least 1")
    overrides = _overrides(args)
    check_validation_args(args)
    ckpt = open_model(args)
    out = Path(args.out) if args.out else Path("out") / ckpt.name
    if args.dry_run:
        print(describe_plan(plan_outputs(ckpt, out, args.quant, args.mode, mmproj_quant=args.mmproj_quant,
                                         overrides=overrides, has_imatrix=args.imatrix is not None)))
        return 0
    paths = export_gguf(ckpt, out, quant=args.quant, mode=args.mode, force=args.force,
                        allow_nonfinite=args.allow_nonfinite, quiet=args.quiet, name=args.name,
                        mmproj_quant=args.mmproj_quant, overrides=overrides, imatrix=args.imatrix,
                        quantizer=args.quantizer, threads=args.quant_threads)
    for p in paths:
        print(f"wrote {p} ({p.stat().st_size / 2**20:.1f} MiB)")
    print(f"wrote {out / 'manifest.json'}")
    if args.no_validate:
        return 0
    return validate_outputs(args, ckpt, out, paths)


def validate_outputs(args, ckpt, out: Path, paths: list[Path]) -> int:
    """Run the validation harness on what was just written (the entry point reaches into
    `validate`, as DESIGN.md allows); a failure keeps the files and marks them in the manifest."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        raise ConvertError("validation needs llama-cpp-python (pip install -e '.[llama]'); the files are written, "
                           "pass --no-validate to skip it")
    from validate.artifacts import Artifact, mark_manifest, read_gguf
    from validate.cli import REPORT_HTML, REPORT_JSON, make_profile, validate_and_report

    infos = [read_gguf(p) for p in paths]
    art = Artifact(infos[0], {i.mode: i for i in infos[1:]}, out)
    profile = make_profile(args)
    print(f"validating {art.name} against the PyTorch reference (scenarios: {args.scenarios}; --no-validate skips this)")
    report = validate_and_report(ckpt, [art], scenarios=args.scenarios, profile=profile, quiet=args.quiet,
                                 imatrix=args.imatrix, json_out=out / REPORT_JSON, html_out=out / REPORT_HTML,
                                 max_kl=args.max_kl)
    status = "pass" if report["exit_code"] == 0 else "fail"
    mark_manifest(out, {p.name: status for p in paths})
    if status == "fail":
        print(f"validation failed: the files are kept and marked failed in {out / 'manifest.json'}")
    return report["exit_code"]


def validate_hf_folder(args, ckpt, out: Path) -> int:
    """Validate a quantized HF checkpoint just written by `python -m quantize gptq|awq` with the
    harness (transformers through the real loaders); failures keep the folder, marked in its manifest."""
    from validate.artifacts import read_hf_quantized

    return validate_folder(args, ckpt, out, read_hf_quantized(out), "checkpoint")


def validate_folder(args, ckpt, out: Path, art, what: str) -> int:
    """Validate an artifact folder just written (an HF checkpoint, an ONNX export); a failure keeps it,
    its files marked failed in the manifest."""
    from validate.artifacts import mark_manifest
    from validate.cli import REPORT_HTML, REPORT_JSON, make_profile, validate_and_report

    profile = make_profile(args)
    print(f"validating {art.name} against the PyTorch reference (scenarios: {args.scenarios}; --no-validate skips this)")
    report = validate_and_report(ckpt, [art], scenarios=args.scenarios, profile=profile, quiet=args.quiet,
                                 json_out=out / REPORT_JSON, html_out=out / REPORT_HTML, speed_anchor=False,
                                 max_kl=getattr(args, "max_kl", None))
    status = "pass" if report["exit_code"] == 0 else "fail"
    mark_manifest(out, {p.relative_to(out).as_posix(): status for p in art.files})
    if status == "fail":
        print(f"validation failed: the {what} is kept and marked failed in {out / 'manifest.json'}")
    return report["exit_code"]


def cmd_onnx(args) -> int:
    from .onnx.export import check_options, export_onnx

    check_options(args.quant, args.mode, args.int4_algo)
    check_validation_args(args)
    ckpt = open_model(args)
    out = Path(args.out) if args.out else Path("out") / f"{ckpt.name}-onnx"
    paths = export_onnx(ckpt, out, quant=args.quant, mode=args.mode, portable=args.portable,
                        int4_algo=args.int4_algo, ort_format=args.ort, force=args.force, quiet=args.quiet)
    for p in paths:
        size = sum(f.stat().st_size for f in p.parent.glob(p.name + "*"))
        print(f"wrote {p} ({size / 2**20:.1f} MiB)")
    print(f"wrote {out / 'manifest.json'}")
    if args.no_validate:
        return 0
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is None:
        raise ConvertError("validation needs onnxruntime (pip install -e '.[onnx]'); the files are written, "
                           "pass --no-validate to skip it")
    from validate.onnx_artifact import read_onnx

    return validate_folder(args, ckpt, out, read_onnx(out), "export")


def cmd_executorch(args) -> int:
    from .executorch.export import check_options, export_executorch

    check_options(args.quant, args.mode, args.vision_quant, args.max_context, args.max_seq_len)
    check_validation_args(args)
    ckpt = open_model(args)
    out = Path(args.out) if args.out else Path("out") / f"{ckpt.name}-executorch"
    path = export_executorch(ckpt, out, quant=args.quant, mode=args.mode, vision_quant=args.vision_quant,
                             max_context=args.max_context, max_seq_len=args.max_seq_len, force=args.force,
                             quiet=args.quiet)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    print(f"wrote {out / 'manifest.json'}")
    if args.no_validate:
        return 0
    from validate.executorch_artifact import read_executorch

    return validate_folder(args, ckpt, out, read_executorch(out), "export")


def cmd_coreml(args) -> int:
    from .coreml.export import check_options, check_sizes, export_coreml

    parts = check_options(args.quant, args.mode, args.parts, args.head_quant)
    check_sizes(args.max_context, args.prefill_len)
    check_validation_args(args)
    ckpt = open_model(args)
    out = Path(args.out) if args.out else Path("out") / f"{ckpt.name}-coreml"
    paths = export_coreml(ckpt, out, quant=args.quant, mode=args.mode, parts=args.parts, force=args.force,
                          max_context=args.max_context, prefill=args.prefill_len, head_quant=args.head_quant,
                          quiet=args.quiet)
    for p in paths:
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        print(f"wrote {p} ({size / 2**20:.1f} MiB)")
    print(f"wrote {out / 'manifest.json'}")
    if args.no_validate:
        return 0
    import sys

    from validate.coreml_artifact import PROXY, PROXY_WORDING, read_coreml_artifact, validate_coreml

    if "decoder" in parts:
        # the harness: the structural checks, then every scenario in Core ML (macOS) or the proxy (elsewhere)
        runtime = "coreml" if sys.platform == "darwin" else PROXY
        if runtime == PROXY:
            print(f"Core ML runs only on macOS: the scenarios run in {PROXY} ({PROXY_WORDING})")
        return validate_folder(args, ckpt, out, read_coreml_artifact(out, runtime), "export")
    rep = validate_coreml(ckpt, out, quiet=args.quiet)  # the vision package alone: its checks and proxy cosine
    from .manifest import write_text_atomic

    write_text_atomic(out / "validation.json", json.dumps(rep, indent=2) + "\n")
    for c in rep["checks"]:
        print(f"  {c['check']:10s} {c['status']:5s} {c['message']}")
    print(f"validation {'passed' if rep['status'] == 'pass' else 'FAILED'} on Linux from the package's own bytes "
          f"(numerics: {PROXY_WORDING}); wrote {out / 'validation.json'}")
    return 0 if rep["status"] == "pass" else 3


def cmd_recipe(args) -> int:
    from .bundle import build_bundle
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe)  # bad input before any work
    ckpt = open_model(args)
    out = Path(args.out) if args.out else Path("out") / f"{ckpt.name}-{recipe.platform}"
    return build_bundle(recipe, ckpt, out, quiet=args.quiet, force=args.force)


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
    g.add_argument("--quant", help="f32, f16 (default), bf16, or a llama.cpp mixture: Q8_0, Q6_K, Q5_K_M, Q5_K_S, "
                   "Q4_K_M, Q4_K_S, Q3_K_M, Q3_K_S, Q3_K_L, Q2_K, Q4_0, Q4_1, Q5_0, Q5_1 (case-insensitive)")
    g.add_argument("--outtype", help="alias of --quant (llama.cpp converter's name)")
    g.add_argument("--mmproj-quant", help="the projector's type (default: the decoder's float type; F16 under a mixture)")
    g.add_argument("--pure", action="store_true", help="llama-quantize --pure: the mixture's default type everywhere")
    g.add_argument("--output-tensor-type", help="llama-quantize override for output.weight (token_embd when tied)")
    g.add_argument("--token-embedding-type", help="llama-quantize override for token_embd.weight")
    g.add_argument("--tensor-type", action="append", metavar="PATTERN=TYPE",
                   help="llama-quantize override: tensors whose name matches PATTERN (regex search) get TYPE; repeatable")
    g.add_argument("--awq-source", help="--model is an AWQ folder: its full-precision source checkpoint, if not where "
                   "the folder's manifest.json says (the folded weights are rebuilt from it)")
    g.add_argument("--imatrix", help="importance matrix (llama.cpp's imatrix GGUF or .dat; see `python -m quantize imatrix`)")
    g.add_argument("--quantizer", choices=["auto", "kquants", "ggml"],
                   help="block quantizer: kquants (this project's port, its searches compiled by numba), ggml (llama.cpp's "
                        "own C, from llama-cpp-python) or auto (default: kquants with numba, else ggml where it loads); "
                        "the same bytes; the manifest says which ran")
    g.add_argument("--quant-threads", type=int, help="quantizing threads (default: every core; 1 for kquants without numba)")
    g.add_argument("--dry-run", action="store_true", help="print every tensor's type, size and bits per weight; write nothing")
    g.add_argument("--mode", default="16x", help="projector downsample mode: 16x (default), 4x or both")
    g.add_argument("--out", help="output folder (default ./out/<model name>)")
    g.add_argument("--name", help="general.name written into the files (default: from the checkpoint)")
    g.add_argument("--force", action="store_true", help="write into a folder that holds other files")
    g.add_argument("--allow-nonfinite", action="store_true", help="write tensors holding NaN/Inf instead of refusing")
    _validation_options(g)
    g.set_defaults(func=cmd_gguf, validation_runtime="llama.cpp")

    o = sub.add_parser("onnx", help="write the vision encoder, token embedding and decoder as ONNX (onnx-community "
                       "layout), validated in ONNX Runtime")
    o.add_argument("--model", help="checkpoint folder or a hub id in the local cache (default: the tiny synthetic model)")
    o.add_argument("--quant", default="fp32", help="fp32 (default), fp16 or int4 (MatMulNBits 4-bit, block 32)")
    o.add_argument("--mode", default="16x", help="vision encoder downsample mode: 16x (default), 4x or both")
    o.add_argument("--int4-algo", default="k_quant", help="int4 quantizer of onnxruntime: k_quant (default), hqq or rtn")
    o.add_argument("--portable", action="store_true", help="Gated DeltaNet in standard ONNX ops (a Scan over tokens) "
                   "instead of ONNX Runtime's fused com.microsoft operators")
    o.add_argument("--ort", action="store_true", help="also ONNX Runtime's .ort format (optimized for ARM) and "
                   "required_operators.config, for ORT Mobile's reduced builds on Android and iOS")
    o.add_argument("--out", help="output folder (default ./out/<model name>-onnx)")
    o.add_argument("--force", action="store_true", help="replace a folder that holds other files")
    _validation_options(o)
    o.set_defaults(func=cmd_onnx, validation_runtime="onnxruntime")

    e = sub.add_parser("executorch", help="write one ExecuTorch .pte (vision_encoder, token_embedding, text_decoder; "
                       "XNNPACK) for ExecuTorch's multimodal runner, validated in the ExecuTorch runtime")
    e.add_argument("--model", help="checkpoint folder or a hub id in the local cache (default: the tiny synthetic model)")
    e.add_argument("--quant", default="8da4w", help="decoder linears: 8da4w (default; int8 dynamic activations, int4 "
                   "weights, group 32), 8da8w or fp32")
    e.add_argument("--vision-quant", help="vision tower and merger: fp32 or 8da8w (default: fp32 with --quant fp32, "
                   "else 8da8w)")
    e.add_argument("--mode", default="16x", help="vision encoder downsample mode: 16x (default), 4x or both "
                   "(both: vision_encoder is 16x, vision_encoder_4x beside it)")
    e.add_argument("--max-context", type=int, default=4096, help="positions the K/V cache holds (default 4096)")
    e.add_argument("--max-seq-len", type=int, default=512, help="tokens per text_decoder call (default 512); "
                   "the runner splits longer prompts")
    e.add_argument("--out", help="output folder (default ./out/<model name>-executorch)")
    e.add_argument("--force", action="store_true", help="replace a folder that holds other files")
    _validation_options(e)
    e.set_defaults(func=cmd_executorch, validation_runtime="executorch")

    c = sub.add_parser("coreml", help="write Core ML packages for iOS (the float16 vision encoder an app runs on "
                       "the Neural Engine beside llama.cpp's decoder), checked from their own bytes")
    c.add_argument("--model", help="checkpoint folder or a hub id in the local cache (default: the tiny synthetic model)")
    c.add_argument("--quant", default="int4", help="decoder weights: int4 (default, per block of 32), int8 or fp16")
    c.add_argument("--head-quant", help="lm_head and token embedding: int4, int8 or fp16 (default: as --quant; int8 "
                   "under int4 halves the tiny models' KL for 1 byte per vocabulary weight, as Q4_K_M keeps its output "
                   "matrix in Q6_K)")
    c.add_argument("--mode", default="16x", help="vision encoder downsample mode: 16x (default) or 4x")
    c.add_argument("--parts", default="vision,decoder", help="packages to write, comma-separated: vision, decoder "
                   "(default both)")
    c.add_argument("--max-context", type=int, default=4096, help="positions the K/V states hold (default 4096)")
    c.add_argument("--prefill-len", type=int, default=32, help="tokens per call of the decoder's prefill function "
                   "(default 32)")
    c.add_argument("--out", help="output folder (default ./out/<model name>-coreml)")
    c.add_argument("--force", action="store_true", help="replace a folder that holds other files")
    _validation_options(c)
    c.set_defaults(func=cmd_coreml, validation_runtime="coreml")

    r = sub.add_parser("recipe", help="build, validate (on this machine and the emulated phones) and package what an "
                       "app needs: a platform's release bundle (recipes/<platform>.toml)")
    r.add_argument("recipe", help="android, harmonyos, ios, or a recipe .toml file")
    r.add_argument("--model", help="checkpoint folder or a hub id in the local cache (default: the tiny synthetic model)")
    r.add_argument("--out", help="bundle folder (default ./out/<model name>-<platform>); a re-run reuses what is valid")
    r.add_argument("--force", action="store_true", help="replace a folder that is not a release bundle")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.set_defaults(func=cmd_recipe)
    return ap


def _validation_options(p: argparse.ArgumentParser) -> None:
    """The options of the validation every export subcommand runs after writing."""
    p.add_argument("--no-validate", action="store_true", help="skip validating the files against the PyTorch reference")
    p.add_argument("--scenarios", default="default", help="validation scenario set (default, quick, text, images)")
    p.add_argument("--threads", type=int, help="threads for the validation runtime (default min(4, cores))")
    p.add_argument("--max-kl", type=float, help="validation quality budget: fail when the decoder's mean KL from the "
                   "fp32 reference exceeds this (nats; default: reported, not judged)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    from validate.cli import add_phone_arg

    add_phone_arg(p)


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


def quiet_third_party_logs() -> None:
    """torchao (pulled in by the hf-quant extra) makes torch log deprecation warnings on import;
    they would break the one-line error contract on stderr."""
    import logging

    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """--debug on the parser and each of its subcommands (`python -m convert --debug gguf` and
    `python -m convert gguf --debug` both work)."""
    parsers = [parser] + [p for a in parser._actions if isinstance(a, argparse._SubParsersAction)
                          for p in a.choices.values()]
    for i, p in enumerate(parsers):
        if "--debug" not in p._option_string_actions:
            # SUPPRESS on subcommands: their default would overwrite a --debug given before them
            p.add_argument("--debug", action="store_true", default=False if i == 0 else argparse.SUPPRESS,
                           help="on an unexpected error (a bug), print the full traceback")


def run(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse and dispatch; a ConvertError becomes one line on stderr and its exit code. Shared by the CLIs.
    SIGINT/SIGTERM end the command through its cleanup with 130/143; any other exception is a bug:
    one line naming where it was raised, the traceback in a log file (or on stderr with --debug), exit 1."""
    from .interrupt import Interrupted, report_bug, signals_as_exceptions

    quiet_third_party_logs()
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    with signals_as_exceptions():
        try:
            return args.func(args)
        except ConvertError as e:
            # one line whatever the message holds (a damaged file's names can contain line breaks)
            print("error: " + " ".join(str(e).splitlines()), file=sys.stderr)
            return e.exit_code
        except Interrupted as e:
            print(f"error: interrupted ({e.name})", file=sys.stderr)
            return e.exit_code
        except KeyboardInterrupt:
            print("error: interrupted (SIGINT)", file=sys.stderr)
            return 130
        except Exception as e:
            return report_bug(e, argv, getattr(args, "debug", False))
