"""Build a synthetic MiniCPM-V 4.6 checkpoint: the real architecture, weights from a seed.

The folder is what `save_pretrained` writes for the real model (config, safetensors, tokenizer,
processor files), so every tool that reads a real checkpoint reads this one the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import ConvertError
from ..spec import ModelSpec
from .presets import PRESETS, Preset, preset_config
from .tokenizer import write_processor_files, write_tokenizer

DEFAULT_SEED = 0
# Where the embedded default model is built on first use.
CACHE_DIR = Path(os.environ.get("MINICPMV_EDGE_CACHE", Path.home() / ".cache" / "minicpmv-edge"))


def build_synthetic(preset: "str | Preset", out: Path, *, seed: int = DEFAULT_SEED, report: bool = True,
                    quiet: bool = False) -> dict | None:
    """Write the checkpoint into `out` (atomically) and return the behaviour report. `preset` is a
    name of PRESETS or a Preset (e.g. one from draw.draw_preset)."""
    import torch
    from transformers import MiniCPMV4_6Config, MiniCPMV4_6ForConditionalGeneration

    from .weights import init_weights

    if isinstance(preset, Preset):
        p = preset
    elif preset in PRESETS:
        p = PRESETS[preset]
    else:
        raise ConvertError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        padded = 248094 if p.padded_vocab else None
        special = write_tokenizer(tmp, bpe_vocab_size=p.bpe_vocab_size, padded_vocab_size=padded)
        vocab_size = padded or (max(special.values()) + 1)
        cfg_dict = preset_config(p, special, vocab_size)
        spec = ModelSpec.from_config(cfg_dict)
        write_processor_files(tmp, scale_resolution=448, patch_size=spec.vision.patch_size,
                              downsample_mode=spec.downsample_mode)
        config = MiniCPMV4_6Config(**{k: v for k, v in cfg_dict.items() if k not in ("architectures", "model_type")})
        config.architectures = cfg_dict["architectures"]
        torch.manual_seed(seed)
        with torch.device("cpu"):
            model = MiniCPMV4_6ForConditionalGeneration(config).eval()
        # only ids the tokenizer can produce get trained-like rows (the padded gap of `full` stays small)
        live = sorted(set(range(p.bpe_vocab_size)) | set(special.values()))
        init_weights(model, spec, seed=seed, quiet=quiet, live_tokens=live)
        rep = None
        if report:
            from .behaviour import behaviour_report

            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(tmp)
            rep = behaviour_report(model, tok, spec, quiet=quiet)
        dtype = getattr(torch, p.dtype)
        model.to(dtype)
        kw = {"max_shard_size": p.max_shard_size} if p.max_shard_size else {}
        model.save_pretrained(tmp, **kw)
        _normalise_config(tmp / "config.json", cfg_dict)
        if rep is not None:
            (tmp / "synth_report.json").write_text(json.dumps(rep, indent=1, sort_keys=True) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; a checkpoint folder is not
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        return rep
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _normalise_config(path: Path, cfg: dict) -> None:
    """save_pretrained writes every default; keep what it wrote but pin our ids and dtype."""
    saved = json.loads(path.read_text())
    saved["torch_dtype"] = cfg["torch_dtype"]
    saved.pop("transformers_version", None)  # keep bytes stable across patch releases
    path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


def builder_fingerprint() -> str:
    """A hash of everything that decides a synthetic checkpoint's bytes (this package's files)."""
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for p in sorted(here.iterdir()):
        if p.suffix in (".py", ".txt", ".jinja"):
            h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:12]


def default_model(quiet: bool = False) -> Path:
    """The embedded default (tiny preset, seed 0), built into the cache on first use.

    The folder name carries the builder's fingerprint, so a changed builder never serves a stale model.
    """
    out = CACHE_DIR / "synth" / builder_fingerprint() / f"MiniCPM-V-4.6-synth-tiny-seed{DEFAULT_SEED}"
    if not (out / "config.json").is_file():
        build_synthetic("tiny", out, seed=DEFAULT_SEED, report=False, quiet=True)
    return out
