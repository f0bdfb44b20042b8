"""`python -m convert coreml`: Core ML packages for an iOS app.

    OUT/MiniCPM-V-4.6-vision-16x.mlpackage   pixel_values [1, 3, 14h, 14w] -> image_features [n, H]
                                              (mlprogram, iOS 18, float16; enumerated slice shapes)
    OUT/MiniCPM-V-4.6-decoder-int4.mlpackage  decode / prefill / embed functions, the conversation in
                                              iOS 18 states (decoder.py)
    OUT/config.json, tokenizer and processor files, manifest.json (sha256 and size of every file
                                              inside each package, and of the package as a whole)

Core ML runs only on Apple systems; here the packages are converted and checked from their own bytes
(validate/coreml_artifact.py) and their weights run by the coreml-proxy runtime (validate/coreml_proxy.py).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from .. import manifest
from ..checkpoint import Checkpoint
from ..errors import ConvertError
from ..folder import staged_folder

MODEL_NAME = "MiniCPM-V-4.6"
QUANTS = ("fp16", "int8", "int4")
PARTS = ("vision", "decoder")
BUILT = ("vision", "decoder")
DEFAULT_CONTEXT = 4096  # the phone apps' context; the K/V states are static at this size
DEFAULT_PREFILL = 32  # tokens per call of the decoder's prefill function


def package_name(part: str, mode: str = "16x", quant: str = "fp16") -> str:
    return f"{MODEL_NAME}-vision-{mode}.mlpackage" if part == "vision" else f"{MODEL_NAME}-decoder-{quant}.mlpackage"


def check_options(quant: str, mode: str, parts: str, head_quant: str | None = None) -> list[str]:
    if quant not in QUANTS:
        raise ConvertError(f"--quant {quant!r} is not supported for Core ML; choose one of {', '.join(QUANTS)}")
    if head_quant is not None and head_quant not in QUANTS:
        raise ConvertError(f"--head-quant {head_quant!r}: choose one of {', '.join(QUANTS)}")
    if mode not in ("16x", "4x"):
        raise ConvertError(f"--mode {mode!r}: choose 16x or 4x")
    got = [p.strip() for p in parts.split(",") if p.strip()]
    bad = [p for p in got if p not in PARTS]
    if bad or not got:
        raise ConvertError(f"--parts {parts!r}: choose from {', '.join(PARTS)} (comma-separated)")
    missing = [p for p in got if p not in BUILT]
    if missing:
        raise ConvertError(f"--parts {','.join(missing)}: the Core ML {' and '.join(missing)} package is not built by "
                           f"this version yet; use --parts vision")
    return got


def check_sizes(max_context: int, prefill: int) -> None:
    if not 16 <= max_context <= 1 << 17:
        raise ConvertError(f"--max-context {max_context}: choose 16..131072 positions")
    if not 2 <= prefill <= min(max_context, 512):
        raise ConvertError(f"--prefill-len {prefill}: choose 2..{min(max_context, 512)} tokens per prefill call")


def _imports():
    try:
        import coremltools  # noqa: F401
    except ImportError as e:
        raise ConvertError(f"Core ML export needs coremltools (pip install -e '.[coreml]'): {e}") from None


def package_entry(path: Path, **fields) -> dict:
    """A manifest entry for a package (a folder): every file's size and sha256, and one sha256 over
    their relative paths and hashes."""
    files = []
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        files.append({"path": f.relative_to(path).as_posix(), "size": f.stat().st_size,
                      "sha256": manifest.sha256_file(f)})
    h = hashlib.sha256("".join(f"{f['path']}\0{f['sha256']}\n" for f in files).encode())
    return {"file": path.name, "size": sum(f["size"] for f in files), "sha256": h.hexdigest(), "files": files, **fields}


def _save_multifunction(packages: list[Path], names: list[str], dest: Path) -> None:
    """One package holding every function (consts equal across functions are stored once), the first
    one the default."""
    import coremltools as ct

    desc = ct.utils.MultiFunctionDescriptor()
    for p, fname in zip(packages, names):
        desc.add_function(str(p), src_function_name="main", target_function_name=fname)
    desc.default_function_name = names[0]
    ct.utils.save_multifunction(desc, str(dest))


def make_reproducible(package: Path) -> None:
    """Same input, same bytes: coremltools writes the spec with protobuf maps in process-dependent order
    and names the package's items by random UUIDs; here the spec is re-serialized deterministically and
    the UUIDs derived from the package and item names. A file ExecuTorch's coremltools hook adds
    (executorch_debug_handle_mapping.json) is not part of the package format and is removed."""
    import uuid

    from coremltools.proto import Model_pb2

    (package / "executorch_debug_handle_mapping.json").unlink(missing_ok=True)
    man_path = package / "Manifest.json"
    man = json.loads(man_path.read_text())
    ids = {}
    for old, item in man["itemInfoEntries"].items():
        ids[old] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"minicpmv-edge/{package.name}/{item['path']}")).upper()
        if item["name"] == "model.mlmodel":
            spec_path = package / "Data" / item["path"]
            m = Model_pb2.Model()
            m.ParseFromString(spec_path.read_bytes())
            spec_path.write_bytes(m.SerializeToString(deterministic=True))
    man["itemInfoEntries"] = {ids[k]: v for k, v in sorted(man["itemInfoEntries"].items(), key=lambda kv: kv[1]["path"])}
    man["rootModelIdentifier"] = ids[man["rootModelIdentifier"]]
    man_path.write_text(json.dumps(man, indent=4) + "\n", encoding="utf-8")


def export_coreml(ckpt: Checkpoint, out_dir: str | Path, *, quant: str = "int4", mode: str = "16x",
                  parts: str = "vision,decoder", max_context: int = DEFAULT_CONTEXT, prefill: int = DEFAULT_PREFILL,
                  head_quant: str | None = None, force: bool = False, quiet: bool = False) -> list[Path]:
    """Write the folder; returns the package paths."""
    from ..gguf.export import source_info
    from ..hf_quant import check_out_dir, copy_side_files
    from runtimes.reference import hf_quiet, load_reference_model

    got = check_options(quant, mode, parts, head_quant)
    head_quant = head_quant or quant
    check_sizes(max_context, prefill)
    with _quiet_coremltools(quiet):
        _imports()
    out_dir = Path(out_dir)
    check_out_dir(ckpt, out_dir, force)

    def log(msg):
        if not quiet:
            print(msg, flush=True)

    from .vision import convert_vision, drop_text, slice_shapes

    import shutil
    import tempfile

    hf = load_reference_model(ckpt, quiet=quiet)
    if "decoder" not in got:
        drop_text(hf)
    info = {}
    built = []  # (part, package name)
    # each converted program is saved at once and dropped: three decoder functions held together with the
    # model took 19 GB at full size
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.scratch-") as scratch_dir:
        scratch = Path(scratch_dir)
        if "vision" in got:
            shapes = slice_shapes(ckpt.processor.image_processor, mode)
            t0 = time.perf_counter()
            with hf_quiet(quiet), _quiet_coremltools(quiet):
                convert_vision(hf, ckpt.spec, mode, shapes).save(str(scratch / "vision.mlpackage"))
            built.append(("vision", package_name("vision", mode)))
            info["vision"] = {"mode": mode, "precision": "float16", "deployment_target": "iOS18",
                              "pixel_shapes": [list(s) for s in shapes], "default_shape": list(shapes[0])}
            log(f"  converted the {mode} vision encoder ({len(shapes)} enumerated slice shapes) in "
                f"{time.perf_counter() - t0:.1f} s")
        if "decoder" in got:
            from .decoder import convert_decoder_function, convert_embedding
            from .vision import drop_vision

            drop_vision(hf)  # the decoder functions read the text weights only
            t0 = time.perf_counter()
            text = ckpt.spec.text
            steps = {"decode": lambda: convert_decoder_function(hf, text, quant, max_context, 1, head_quant),
                     "prefill": lambda: convert_decoder_function(hf, text, quant, max_context, prefill, head_quant),
                     "embed": lambda: convert_embedding(hf, text, quant, max_context, head_quant)}
            for fname, step in steps.items():
                with hf_quiet(quiet), _quiet_coremltools(quiet):
                    step().save(str(scratch / f"{fname}.mlpackage"))
            built.append(("decoder", package_name("decoder", quant=quant)))
            info["decoder"] = {"quant": quant, "head_quant": head_quant, "block_size": 32 if quant == "int4" else None,
                               "precision": "float16", "deployment_target": "iOS18", "max_context": max_context,
                               "prefill_len": prefill, "functions": {"decode": 1, "prefill": prefill, "embed": None},
                               "default_function": "decode"}
            log(f"  converted the {quant} decoder (decode, prefill of {prefill}, embed) in "
                f"{time.perf_counter() - t0:.1f} s")
        hf = None
        with staged_folder(out_dir) as tmp:
            for part, name in built:
                with _quiet_coremltools(quiet):
                    if part == "decoder":
                        _save_multifunction([scratch / f"{f}.mlpackage" for f in steps], list(steps), tmp / name)
                    else:
                        shutil.move(str(scratch / "vision.mlpackage"), str(tmp / name))
                make_reproducible(tmp / name)
            (tmp / "config.json").write_text(json.dumps(ckpt.config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            copied = [tmp / "config.json"] + copy_side_files(ckpt.path, tmp)
            entries = [package_entry(tmp / n, kind="mlpackage", format="coreml", part=part) for part, n in built]
            entries += [manifest.artifact_entry(p, kind="copied") for p in copied]
            import coremltools as ct

            manifest.write(tmp, {**source_info(ckpt), "coreml": {**info, "coremltools": ct.__version__,
                                                                "parts": got, "quant": quant}}, entries)
    return [out_dir / n for _, n in built]


def _quiet_coremltools(quiet: bool):
    """coremltools' conversion bars, its import notes (no Core ML framework on Linux) and its warnings
    about untested torch versions all go to stderr: silenced when quiet (errors still raise)."""
    import contextlib
    import io
    import warnings

    if not quiet:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    return stack
