"""llama.cpp's own converter, as a second opinion on this project's GGUF files.

The exact llama.cpp this project validates against is vendored in the llama-cpp-python 0.3.36
source package. `upstream_convert` fetches that package from PyPI once (into the cache folder),
and runs its `convert_hf_to_gguf.py` on a checkpoint in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from convert.errors import ConvertError

VERSION = "0.3.36"
CACHE = Path(os.environ.get("MINICPMV_EDGE_CACHE", Path.home() / ".cache" / "minicpmv-edge"))

# Synthetic tokenizers don't match the hash llama.cpp keys MiniCPM-V 4.6's pre-tokenizer by, so the
# runner names it directly: the regex is the same (Qwen3.5's), which the tokenizer tests check.
# Several conversions run in one process (separated by "--next") to pay torch's import once.
_RUNNER = r"""
import runpy, sys
root, args = sys.argv[1], sys.argv[2:]
sys.path[:0] = [root + "/gguf-py", root]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen35"
jobs, cur = [], []
for a in args:
    if a == "--next":
        jobs.append(cur); cur = []
    else:
        cur.append(a)
jobs.append(cur)
for job in jobs:
    sys.argv = ["convert_hf_to_gguf.py"] + job
    runpy.run_path(root + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def llamacpp_tree() -> Path:
    """The vendored llama.cpp of llama-cpp-python VERSION, downloaded and unpacked on first use."""
    root = CACHE / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    if (root / "convert_hf_to_gguf.py").is_file():
        return root
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                            f"llama-cpp-python=={VERSION}", "-d", tmp], capture_output=True, text=True)
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if r.returncode != 0 or not sdists:
            raise ConvertError(f"cannot download the llama-cpp-python {VERSION} source package: {r.stderr.strip()[-200:]}")
        with tarfile.open(sdists[0]) as tf:
            tf.extractall(tmp, filter="data")
        os.replace(Path(tmp) / f"llama_cpp_python-{VERSION}", CACHE / f"llama_cpp_python-{VERSION}")
    return root


def upstream_convert(model_dir: Path, out_file: Path, outtype: str = "f16", *, mmproj: bool = False,
                     mode: str = "16x") -> Path:
    """Run llama.cpp's convert_hf_to_gguf.py (`--no-mtp`, or `--mmproj`) on `model_dir`.

    The projector's mode comes from the checkpoint's preprocessor config, as upstream reads it;
    for 4x a copy of the folder with `downsample_mode: 4x` is converted.
    """
    return upstream_convert_many([(model_dir, out_file, outtype, mmproj, mode)])[0]


def upstream_convert_many(jobs: list[tuple[Path, Path, str, bool, str]]) -> list[Path]:
    """Several (model_dir, out_file, outtype, mmproj, mode) conversions in one subprocess."""
    root = llamacpp_tree()
    with tempfile.TemporaryDirectory() as tmp:
        argv: list[str] = []
        for i, (model_dir, out_file, outtype, mmproj, mode) in enumerate(jobs):
            if mmproj and mode == "4x":
                model_dir = _with_mode(Path(model_dir), Path(tmp) / str(i) / Path(model_dir).name, mode)
            argv += (["--next"] if argv else []) + [str(model_dir), "--outtype", outtype, "--outfile", str(out_file)]
            argv += ["--mmproj"] if mmproj else ["--no-mtp"]
        r = subprocess.run([sys.executable, "-c", _RUNNER, str(root), *argv], capture_output=True, text=True)
    outs = [Path(j[1]) for j in jobs]
    if r.returncode != 0 or not all(p.is_file() for p in outs):
        last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit code {r.returncode}"
        raise ConvertError(f"llama.cpp's converter failed: {last}")
    return outs


def _with_mode(src: Path, dst: Path, mode: str) -> Path:
    import json

    dst.mkdir(parents=True)
    for p in src.iterdir():
        (dst / p.name).symlink_to(p.resolve())
    for name in ("preprocessor_config.json", "processor_config.json"):
        p = src / name
        if p.is_file():
            cfg = json.loads(p.read_text())
            target = cfg["image_processor"] if isinstance(cfg.get("image_processor"), dict) else cfg
            target["downsample_mode"] = mode
            (dst / name).unlink()
            (dst / name).write_text(json.dumps(cfg))
    return dst


def upstream_quantize(src: Path, dst: Path, mixture: str, *, pure: bool = False, output_type=None,
                      token_embedding_type=None, tensor_types: list[tuple[str, object]] = (),
                      imatrix: dict | None = None, nthread: int = 1) -> Path:
    """llama.cpp's own llama_model_quantize (through llama-cpp-python) on a GGUF file: the reference
    for this project's one-pass k-quant export. Types are gguf.GGMLQuantizationType values."""
    import ctypes

    import gguf
    import llama_cpp
    import numpy as np

    p = llama_cpp.llama_model_quantize_default_params()
    p.nthread = nthread
    p.ftype = int(getattr(gguf.LlamaFileType, "MOSTLY_" + mixture.upper()))
    p.pure = pure
    if output_type is not None:
        p.output_tensor_type = int(output_type)
    if token_embedding_type is not None:
        p.token_embedding_type = int(token_embedding_type)
    keep = []  # ctypes buffers must outlive the call
    if tensor_types:
        arr = (llama_cpp.llama_model_tensor_override * (len(tensor_types) + 1))()
        for i, (pat, t) in enumerate(tensor_types):
            b = pat.encode()
            keep.append(b)
            arr[i].pattern, arr[i].type = b, int(t)
        p.tt_overrides = ctypes.cast(arr, type(p.tt_overrides))
        keep.append(arr)
    if imatrix:
        arr = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, v) in enumerate(sorted(imatrix.items())):
            v = np.ascontiguousarray(v, dtype=np.float32)
            keep += [name.encode(), v]
            arr[i].name = keep[-2]
            arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = v.size
        p.imatrix = ctypes.cast(arr, type(p.imatrix))
        keep.append(arr)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))
    if rc != 0:
        raise ConvertError(f"llama_model_quantize failed ({rc}) on {src}")
    return Path(dst)
