"""`python -m convert executorch`: one `.pte` that ExecuTorch's `MultimodalRunner` loads.

    OUT/MiniCPM-V-4.6-{quant}.pte   methods (the runner's contract, extension/llm/runner/constants.h):
        vision_encoder     pixel_values [1, 3, 14h, 14w] (one slice) -> image features [1, n, H]
        vision_encoder_4x  (with --mode both: the 4x encoder beside the 16x one)
        token_embedding    input_ids [1, T] -> inputs_embeds [1, T, H]
        text_decoder       inputs_embeds [1, T, H], cache_position [T] -> logits of the last position [1, V]
      and constant methods get_max_seq_len (tokens per call), get_max_context_len, get_vocab_size,
      get_bos_id, get_eos_ids, use_kv_cache, enable_dynamic_shape.
    OUT/tokenizer.json, chat template, config files, manifest.json (with the delegation report)

T is dynamic up to get_max_seq_len, so a prompt prefills in one call; the conversation state (K/V
caches, Gated DeltaNet states) lives in the program as mutable buffers in their own memory arena
(shared across methods, so running the vision encoder between turns leaves it alone). The decoder
returns the last position's logits, as ExecuTorch's LLM exporters do by default: a 512-token prefill
then holds one row of the 248k vocabulary instead of 512.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

from torch import nn

from .. import manifest
from ..checkpoint import Checkpoint
from ..errors import ConvertError
from ..folder import staged_folder
from .quant import QUANTS, VISION_QUANTS

MODEL_NAME = "MiniCPM-V-4.6"
# ExecuTorch plans memory for the largest shape a method takes, per axis: a slice grid of up to 128
# patches a side (1792 px; the processor's chunks stay within 1200 patches, and only an overview of an
# image more than ~16:1 passes 128 a side) plans ~16k tokens where a 256 bound planned 65k and the
# program no longer loaded
MAX_GRID = 128
DEFAULT_CONTEXT = 4096  # the phone apps' context (recipes: apps.md); K/V cache is static at this size
DEFAULT_SEQ = 512  # tokens per text_decoder call; memory is planned for this many


def pte_name(quant: str, mode: str) -> str:
    return f"{MODEL_NAME}{'-4x' if mode == '4x' else ''}-{quant}.pte"


def vision_quant_for(quant: str, vision_quant: str | None) -> str:
    """--vision-quant's default: fp32 beside an fp32 decoder, 8da8w beside a quantized one (a quarter of
    fp32's bytes; the phone apps ship a 16-bit projector, and XNNPACK has no fp16 on most CPUs' paths)."""
    return vision_quant or ("fp32" if quant == "fp32" else "8da8w")


def check_options(quant: str, mode: str, vision_quant: str | None, max_context: int, max_seq_len: int) -> list[str]:
    vision_quant = vision_quant_for(quant, vision_quant)
    if quant not in QUANTS:
        raise ConvertError(f"--quant {quant!r} is not supported for ExecuTorch; choose one of {', '.join(QUANTS)}")
    if vision_quant not in VISION_QUANTS:
        raise ConvertError(f"--vision-quant {vision_quant!r}: choose one of {', '.join(VISION_QUANTS)}")
    if mode not in ("16x", "4x", "both"):
        raise ConvertError(f"--mode {mode!r}: choose 16x, 4x or both")
    if not 16 <= max_context <= 1 << 20:
        raise ConvertError(f"--max-context {max_context}: choose 16..1048576 positions")
    if not 2 <= max_seq_len <= max_context:
        raise ConvertError(f"--max-seq-len {max_seq_len}: choose 2..--max-context ({max_context}) tokens per call")
    return ["16x", "4x"] if mode == "both" else [mode]


def _imports():
    try:
        import executorch  # noqa: F401
        import torchao  # noqa: F401
        from executorch.exir import to_edge_transform_and_lower  # noqa: F401
    except ImportError as e:
        raise ConvertError(f"ExecuTorch export needs the executorch extra (pip install -e '.[executorch]'): {e}") from None


class _Features(nn.Module):
    """The runner passes the encoder's output straight to text_decoder: give it the batch axis."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, pixel_values):
        return self.encoder(pixel_values)[None]


def _programs(hf, spec, modes, max_context: int, max_seq_len: int, log):
    """torch.export of every method (quantized modules already in place)."""
    import torch
    from torch.export import Dim, export

    from ..modules import TokenEmbedding, VisionEncoder, grid_multiple
    from .decoder import CachedTextDecoder, load_custom_ops, vision_sdpa

    load_custom_ops()
    progs = {}
    p = spec.vision.patch_size
    for mode in modes:
        t0 = time.perf_counter()
        m = grid_multiple(mode)
        hd, wd = Dim(f"grid_h_{mode}", min=1, max=MAX_GRID // m), Dim(f"grid_w_{mode}", min=1, max=MAX_GRID // m)
        venc = VisionEncoder(hf, spec, mode, max_grid=MAX_GRID).eval()
        venc._sdpa = vision_sdpa
        enc = _Features(venc)
        x = torch.zeros(1, spec.vision.num_channels, p * m * 2, p * m * 3)
        with torch.no_grad():
            progs["vision_encoder" + ("_4x" if mode == "4x" and len(modes) == 2 else "")] = export(
                enc, (x,), dynamic_shapes=({2: p * m * hd, 3: p * m * wd},), strict=False)
        log(f"  traced vision_encoder ({mode}) in {time.perf_counter() - t0:.1f} s")
    T = Dim("seq_len", min=1, max=max_seq_len)
    with torch.no_grad():
        progs["token_embedding"] = export(TokenEmbedding(hf).eval(), (torch.zeros(1, 3, dtype=torch.long),),
                                          dynamic_shapes=({1: T},), strict=False)
    t0 = time.perf_counter()
    dec = CachedTextDecoder(hf, spec.text, max_context).eval()
    with torch.no_grad():
        progs["text_decoder"] = export(dec, (torch.zeros(1, 3, spec.text.hidden_size), torch.arange(3)),
                                       dynamic_shapes=({1: T}, {0: T}), strict=False)
    log(f"  traced token_embedding and text_decoder in {time.perf_counter() - t0:.1f} s")
    return progs


def constant_methods(ckpt: Checkpoint, max_context: int, max_seq_len: int) -> dict:
    """What ExecuTorch's LLM runners read from the program (extension/llm/runner/constants.h)."""
    text = ckpt.config.get("text_config", {})
    gen = {}
    gp = Path(ckpt.path) / "generation_config.json"
    if gp.is_file():
        gen = json.loads(gp.read_text(encoding="utf-8"))
    eos = gen.get("eos_token_id", text.get("eos_token_id"))
    eos = [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    bos = gen.get("bos_token_id", text.get("bos_token_id"))
    return {"get_max_seq_len": max_seq_len, "get_max_context_len": max_context,
            "get_vocab_size": int(text["vocab_size"]), "get_bos_id": int(bos) if bos is not None else -1,
            "get_eos_ids": eos, "use_kv_cache": True, "enable_dynamic_shape": True}


def delegation_report(edge) -> dict:
    """Per method: operators (by name) that run inside XNNPACK delegates and those left to ExecuTorch's
    portable/optimized kernels, from executorch.devtools' own delegation info."""
    from executorch.devtools.backend_debug import get_delegation_info

    out = {}
    for name in edge.methods:
        info = get_delegation_info(edge.exported_program(name).graph_module)
        df = info.get_operator_delegation_dataframe()
        rows = {str(r["op_type"]): (int(r["occurrences_in_delegated_graphs"]), int(r["occurrences_in_non_delegated_graphs"]))
                for _, r in df.iterrows() if r["op_type"] != "Total"}
        out[name] = {"delegated": {k: d for k, (d, _) in sorted(rows.items()) if d},
                     "portable": {k: n for k, (_, n) in sorted(rows.items()) if n},
                     "n_delegates": int(info.num_delegated_subgraphs),
                     "delegated_nodes": int(info.num_delegated_nodes),
                     "portable_nodes": int(info.num_non_delegated_nodes)}
    return out


def export_executorch(ckpt: Checkpoint, out_dir: str | Path, *, quant: str = "8da4w", mode: str = "16x",
                      vision_quant: str | None = None, max_context: int = DEFAULT_CONTEXT, max_seq_len: int = DEFAULT_SEQ,
                      force: bool = False, quiet: bool = False) -> Path:
    """Write the folder; returns the .pte path."""
    _imports()
    from ..gguf.export import source_info
    from ..hf_quant import check_out_dir, copy_side_files
    from runtimes.reference import load_reference_model

    modes = check_options(quant, mode, vision_quant, max_context, max_seq_len)
    vision_quant = vision_quant_for(quant, vision_quant)
    out_dir = Path(out_dir)
    check_out_dir(ckpt, out_dir, force)

    def log(msg):
        if not quiet:
            print(msg, flush=True)

    hf = load_reference_model(ckpt, quiet=quiet)
    notes = []
    carried = getattr(ckpt, "method", None)
    if carried:  # XNNPACK's 4-bit block weights are symmetric; GPTQ / AWQ integers come with zero points
        notes.append(f"{carried} source: its dequantized weights are re-quantized by torchao ({quant}); its "
                     f"integers are not carried over (they have zero points; XNNPACK's 4-bit blocks are symmetric)")
        log(f"note: {notes[-1]}")
    from runtimes.executorch import quiet_native

    with quiet_native():  # ExecuTorch's C++ logs to fd 2 (and eager custom ops complain per call)
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
        from executorch.exir.passes import MemoryPlanningPass
        from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass

        from .quant import quantize_model

        schemes = quantize_model(hf, quant, vision_quant)
        progs = _programs(hf, ckpt.spec, modes, max_context, max_seq_len, log)
        t0 = time.perf_counter()
        edge = to_edge_transform_and_lower(progs, partitioner=[XnnpackPartitioner()],
                                           compile_config=EdgeCompileConfig(_check_ir_validity=False),
                                           constant_methods=constant_methods(ckpt, max_context, max_seq_len))
        report = delegation_report(edge)
        log(f"  lowered to XNNPACK in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        prog = edge.to_executorch(ExecutorchBackendConfig(
            # the Gated DeltaNet states start as serialized zeros (a few MB); the K/V caches, only ever read
            # below the current position, start as whatever the arena holds
            passes=[InitializedMutableBufferPass(["conv_state_", "recurrent_state_"])],
            do_quant_fusion_and_const_prop=True, extract_delegate_segments=True, emit_mutable_buffer_names=True,
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False, share_mutable_buffers=True)))
        data = prog.buffer
        del prog, edge, progs
    hf = None
    gc.collect()
    log(f"  serialized in {time.perf_counter() - t0:.1f} s")
    name = pte_name(quant, modes[0] if len(modes) == 1 else "16x")
    with staged_folder(out_dir) as tmp:
        (tmp / name).write_bytes(data)
        (tmp / "config.json").write_text(json.dumps(ckpt.config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        copied = [tmp / "config.json"] + copy_side_files(ckpt.path, tmp)
        info = {"quant": quant, "vision_quant": vision_quant, "modes": modes, "max_context": max_context,
                "max_seq_len": max_seq_len, "backend": "xnnpack", "group_size": 32 if quant == "8da4w" else None}
        entries = [manifest.artifact_entry(tmp / name, kind="pte", format="executorch", **info)]
        entries += [manifest.artifact_entry(p, kind="copied") for p in copied]
        src = {**source_info(ckpt), "executorch": {**info, "file": name, "delegation": report,
                                                  "quantized": _summarize(schemes), "notes": notes}}
        manifest.write(tmp, src, entries)
    return out_dir / name


def _summarize(schemes: dict[str, str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in schemes.values():
        out[s] = out.get(s, 0) + 1
    return dict(sorted(out.items()))
