"""`python -m convert onnx`: the export modules as ONNX files in the layout onnx-community repositories use.

    OUT/onnx/vision_encoder{sfx}.onnx      pixel_values [1, 3, 14h, 14w] -> image_features [n, H]
    OUT/onnx/vision_encoder_4x{sfx}.onnx   (--mode both, or --mode 4x)
    OUT/onnx/embed_tokens{sfx}.onnx        input_ids [1, T] -> inputs_embeds [1, T, H]
    OUT/onnx/decoder_model_merged{sfx}.onnx
    OUT/config.json, tokenizer, processor files, chat template, manifest.json

Suffixes as onnx-community names them: fp32 none, fp16 `_fp16`, int4 `_q4` (its vision encoder is
`_fp16`: 4-bit weights are for the decoder, as the phone apps keep an F16 projector). A file whose
weights pass 2 GB keeps them in `NAME.onnx_data` beside it (ONNX's protobuf limit).
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path


from .. import manifest
from ..checkpoint import Checkpoint
from ..errors import ConvertError
from ..folder import staged_folder

QUANTS = ("fp32", "fp16", "int4")
SUFFIX = {"fp32": "", "fp16": "_fp16", "int4": "_q4"}
VISION_QUANT = {"fp32": "fp32", "fp16": "fp16", "int4": "fp16"}
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's hard limit is 2 GiB; leave room for the graph
# dynamic-shape bounds of the export (not of the model): slices up to 256 patches a side, calls of up
# to 32k tokens on a context of up to 128k positions
MAX_GRID = 256
MAX_T, MAX_PAST = 32768, 131072


def file_names(quant: str, modes: list[str]) -> dict[str, str]:
    """Role -> file name under onnx/ (roles: vision_16x, vision_4x, embed, decoder)."""
    sfx, vsfx = SUFFIX[quant], SUFFIX[VISION_QUANT[quant]]
    names = {f"vision_{m}": f"vision_encoder{'_4x' if m == '4x' and len(modes) == 2 else ''}{vsfx}.onnx" for m in modes}
    names["embed"] = f"embed_tokens{sfx}.onnx"
    names["decoder"] = f"decoder_model_merged{sfx}.onnx"
    return names


def _save(model, path: Path) -> None:
    import onnx

    big = sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_DATA_BYTES
    if big:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + "_data", size_threshold=1024)
    else:
        onnx.save(model, str(path))


def _vision(hf, spec, mode: str):
    import torch

    from ..modules import VisionEncoder, grid_multiple

    m = grid_multiple(mode)
    p = spec.vision.patch_size
    hd = torch.export.Dim("grid_h", min=1, max=MAX_GRID // m)
    wd = torch.export.Dim("grid_w", min=1, max=MAX_GRID // m)
    args = (torch.zeros(1, spec.vision.num_channels, p * m * 2, p * m * 3),)
    dyn = ({2: p * m * hd, 3: p * m * wd},)
    return VisionEncoder(hf, spec, mode, max_grid=MAX_GRID).eval(), args, dyn, ["pixel_values"], ["image_features"]


def _embed(hf, spec):
    import torch

    from ..modules import TokenEmbedding

    T = torch.export.Dim("sequence_length", min=1, max=MAX_T)
    return TokenEmbedding(hf), (torch.zeros(1, 3, dtype=torch.long),), ({1: T},), ["input_ids"], ["inputs_embeds"]


def _decoder(hf, spec):
    import torch

    from ..modules import TextDecoder, state_specs

    specs = state_specs(spec.text)
    T = torch.export.Dim("sequence_length", min=1, max=MAX_T)
    P = torch.export.Dim("past_sequence_length", min=0, max=MAX_PAST)
    S = torch.export.Dim("total_sequence_length", min=1, max=MAX_PAST + MAX_T)
    state = []
    for s in specs:
        shp = list(s.shape)
        if s.seq_axis is not None:
            shp[s.seq_axis] = 3
        state.append(torch.zeros(shp))
    args = (torch.zeros(1, 5, spec.text.hidden_size), torch.ones(1, 8, dtype=torch.long), torch.arange(3, 8)[None], *state)
    dyn = ({1: T}, {1: S}, {1: T}, tuple(({2: P} if s.seq_axis is not None else None) for s in specs))
    names_in = ["inputs_embeds", "attention_mask", "position_ids"] + [s.input_name for s in specs]
    names_out = ["logits"] + [s.output_name for s in specs]
    return TextDecoder(hf, spec.text).eval(), args, dyn, names_in, names_out


def _ort_format(tmp: Path, quiet: bool) -> list[dict]:
    """Every .onnx also as ONNX Runtime's .ort (optimizations fixed for ARM, what ORT Mobile loads),
    plus `required_operators.config` for a reduced ORT Mobile build; their manifest entries."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    from .precision import _silenced

    t0 = time.perf_counter()
    try:
        with _silenced():
            convert_onnx_models_to_ort(tmp / "onnx", output_dir=tmp / "onnx", target_platform="arm",
                                       optimization_styles=[OptimizationStyle.Fixed])
    except Exception as e:
        raise ConvertError(f"--ort: ONNX Runtime cannot convert the files to its .ort format "
                           f"({e.__class__.__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None
    out = []
    for p in sorted((tmp / "onnx").iterdir()):
        if p.suffix in (".ort", ".config"):
            e = manifest.artifact_entry(p, kind="ort" if p.suffix == ".ort" else "ort_operators", format="ort")
            e["file"] = p.relative_to(tmp).as_posix()
            out.append(e)
    if not quiet:
        print(f"  .ort files and required_operators.config in {time.perf_counter() - t0:.1f} s", flush=True)
    return out


def _quantized_weights(ckpt) -> dict:
    """HF module -> QuantizedWeight of a quantized source folder (its own integers)."""
    from ..hf_quant import read_quantized

    return read_quantized(ckpt.path)[1]


def check_options(quant: str, mode: str, int4_algo: str) -> list[str]:
    from .precision import INT4_ALGOS

    if quant not in QUANTS:
        raise ConvertError(f"--quant {quant!r} is not supported for ONNX; choose one of {', '.join(QUANTS)}")
    if mode not in ("16x", "4x", "both"):
        raise ConvertError(f"--mode {mode!r}: choose 16x, 4x or both")
    if int4_algo not in INT4_ALGOS:
        raise ConvertError(f"--int4-algo {int4_algo!r}: choose one of {', '.join(INT4_ALGOS)}")
    return ["16x", "4x"] if mode == "both" else [mode]


def export_onnx(ckpt: Checkpoint, out_dir: str | Path, *, quant: str = "fp32", mode: str = "16x",
                portable: bool = False, int4_algo: str = "k_quant", ort_format: bool = False, force: bool = False,
                quiet: bool = False) -> list[Path]:
    """Write the ONNX folder; returns the .onnx paths (vision first, then embedding, decoder)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ConvertError(f"ONNX export needs the onnx extra (pip install -e '.[onnx]'): {e}") from None
    from ..hf_quant import check_out_dir, copy_side_files
    from ..gguf.export import source_info
    from runtimes.reference import load_reference_model

    from .graph import export_module
    from .lowering import add_logits_to_keep, lower, translation_table
    from .precision import to_fp16, to_int4

    modes = check_options(quant, mode, int4_algo)
    carried_from = getattr(ckpt, "method", None) if quant == "int4" else None  # a GPTQ / AWQ folder's integers
    out_dir = Path(out_dir)
    check_out_dir(ckpt, out_dir, force)
    spec = ckpt.spec
    names = file_names(quant, modes)
    hf = load_reference_model(ckpt, quiet=quiet)
    jobs = [(f"vision_{m}", lambda m=m: _vision(hf, spec, m)) for m in modes]
    jobs += [("embed", lambda: _embed(hf, spec)), ("decoder", lambda: _decoder(hf, spec))]
    paths: list[Path] = []
    entries: list[dict] = []
    with staged_folder(out_dir) as tmp:
        (tmp / "onnx").mkdir()
        for role, build in jobs:
            t0 = time.perf_counter()
            module, args, dyn, ins, outs = build()
            model = export_module(module, args, dynamic_shapes=dyn, input_names=ins, output_names=outs,
                                  table=translation_table() if role == "decoder" else None)
            if role.startswith("vision"):  # torch.export calls it s52*s80 (h*w / 16)
                model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "num_image_tokens"
            info: dict = {"role": role.split("_")[0]}
            q = VISION_QUANT[quant] if role.startswith("vision") else quant
            if q == "fp16":  # before lowering: the Gated DeltaNet placeholders stay float32 as one node each
                model = to_fp16(model)
            if role == "decoder":
                info["gated_deltanet"] = "portable" if portable else "fused"
                lower(model, spec.text, portable=portable)
                add_logits_to_keep(model)
            if q == "int4" and carried_from and role == "decoder":
                from .carry import carry_over
                from .names import hf_name
                from .precision import ACCURACY_LEVEL

                qweights = _quantized_weights(ckpt)
                carried, refused = carry_over(model, qweights, lambda n: hf_name("decoder", n), ACCURACY_LEVEL)
                info["carried_over"] = {"from": carried_from, "weights": len(carried), "requantized": refused}
                if refused and not quiet:
                    print(f"note: {len(refused)} {carried_from} weight(s) re-quantized, not carried over "
                          f"({next(iter(refused.values()))})")
            if q == "int4":
                if role == "decoder":  # the last job: the source model's weights are not needed any more
                    jobs.clear()
                    hf = module = None
                    gc.collect()
                model, rtn = to_int4(model, algo=int4_algo, gather=role == "embed")
                info.update(int4_algo=int4_algo if role == "decoder" else "rtn", block_size=32)
                if rtn:
                    info["int4_rtn_fallback"] = rtn  # widths that are not a multiple of the block
            if role.startswith("vision"):
                info["mode"] = role.split("_")[1]
            model.producer_name, model.producer_version = manifest.TOOL, manifest.versions().get(manifest.TOOL, "")
            path = tmp / "onnx" / names[role]
            _save(model, path)
            del model, module
            if role.startswith("vision") and role == f"vision_{modes[-1]}":
                hf.model.vision_tower = None  # the decoder's export does not need its weights resident
                gc.collect()
            for p in sorted(path.parent.glob(path.name + "*")):
                e = manifest.artifact_entry(p, kind="onnx" if p.suffix == ".onnx" else "onnx_data", format="onnx",
                                            quant=q, **info)
                e["file"] = p.relative_to(tmp).as_posix()
                entries.append(e)
            paths.append(out_dir / "onnx" / names[role])
            if not quiet:
                print(f"  {names[role]}: {path.stat().st_size / 2**20:.1f} MiB in {time.perf_counter() - t0:.1f} s", flush=True)
        if ort_format:
            entries += _ort_format(tmp, quiet)
        (tmp / "config.json").write_text(json.dumps(ckpt.config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        copied = [tmp / "config.json"] + copy_side_files(ckpt.path, tmp)
        entries += [manifest.artifact_entry(p, kind="copied") for p in copied]
        src = {**source_info(ckpt), "onnx": {"quant": quant, "modes": modes, "portable": portable, "ort_format": ort_format,
                                             "files": names, "int4_algo": int4_algo if quant == "int4" else None}}
        manifest.write(tmp, src, entries)
    return paths
