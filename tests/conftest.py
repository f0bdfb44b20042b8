"""Shared fixtures: synthetic checkpoints and their GGUF exports, built once per session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _build(tmp_path_factory, preset: str, seed: int = 0) -> Path:
    from convert.synth.build import build_synthetic

    out = tmp_path_factory.mktemp(f"synth-{preset}") / "model"
    build_synthetic(preset, out, seed=seed, report=False, quiet=True)
    return out


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return _build(tmp_path_factory, "tiny")


@pytest.fixture(scope="session")
def tiny_alt_dir(tmp_path_factory) -> Path:
    return _build(tmp_path_factory, "tiny-alt")


@pytest.fixture(scope="session")
def tiny_k_dir(tmp_path_factory) -> Path:
    return _build(tmp_path_factory, "tiny-k")


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_dir):
    from convert import Checkpoint

    return Checkpoint(tiny_dir)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, tiny_ckpt):
    """quant -> (decoder path, {mode: mmproj path}) for the tiny model, exported on demand."""
    from convert.gguf.export import export_gguf

    cache: dict[str, tuple[Path, dict[str, Path]]] = {}
    root = tmp_path_factory.mktemp("gguf")

    def get(quant: str) -> tuple[Path, dict[str, Path]]:
        if quant not in cache:
            paths = export_gguf(tiny_ckpt, root / quant, quant=quant, mode="both", quiet=True)
            dec = paths[0]
            mm = {("4x" if p.name.endswith("-4x.gguf") else "16x"): p for p in paths[1:]}
            cache[quant] = (dec, mm)
        return cache[quant]

    return get


@pytest.fixture(scope="session")
def reference(tiny_ckpt):
    from runtimes.reference import ReferenceRuntime

    return ReferenceRuntime(tiny_ckpt)


@pytest.fixture(scope="session")
def onnx_dirs(tmp_path_factory, tiny_dir):
    """(quant, portable) -> an ONNX folder of the tiny model (both modes), exported on demand."""
    from convert import Checkpoint
    from convert.onnx.export import export_onnx

    cache: dict = {}
    root = tmp_path_factory.mktemp("onnx")

    def get(quant: str = "fp32", portable: bool = False, ckpt_dir: Path | None = None) -> Path:
        key = (quant, portable, ckpt_dir)
        if key not in cache:
            out = root / f"{quant}{'-portable' if portable else ''}-{len(cache)}"
            export_onnx(Checkpoint(ckpt_dir or tiny_dir), out, quant=quant, mode="both", portable=portable, quiet=True)
            cache[key] = out
        return cache[key]

    return get


ET_CONTEXT, ET_SEQ = 1024, 512  # the tiny .pte's K/V positions and tokens per call


@pytest.fixture(scope="session")
def et_dirs(tmp_path_factory, tiny_dir):
    """quant -> an ExecuTorch folder of the tiny model, exported on demand (lowering takes minutes)."""
    from convert import Checkpoint
    from convert.executorch.export import export_executorch

    cache: dict = {}
    root = tmp_path_factory.mktemp("executorch")

    def get(quant: str = "8da4w", mode: str = "16x", ckpt_dir: Path | None = None) -> Path:
        key = (quant, mode, ckpt_dir)
        if key not in cache:
            out = root / f"{quant}-{mode}-{len(cache)}"
            export_executorch(Checkpoint(ckpt_dir or tiny_dir), out, quant=quant, mode=mode, max_context=ET_CONTEXT,
                              max_seq_len=ET_SEQ, quiet=True)
            cache[key] = out
        return cache[key]

    return get


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
