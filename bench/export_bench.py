"""Benchmark: GGUF F16 export of the full-size synthetic model vs copying the same bytes raw.

    python bench/export_bench.py [--model DIR] [--runs 3] [--json out.json]

Without --model the full synthetic checkpoint is built (once) into the cache. Each run starts
from the same page-cache state (the source files read once just before), runs in its own
process, and records wall time and peak RSS (ru_maxrss, which counts file-backed pages too).
The anchor is a plain copy: read every source byte and write as many bytes as the export wrote.
Reported: medians, and the export/anchor time ratio (target <= 2) and peak RSS (target <= 1.5 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_COPY = r"""
import sys
srcs, dst, n_out = sys.argv[1:-2], sys.argv[-2], int(sys.argv[-1])
CH = 64 << 20
written = 0
with open(dst, "wb") as out:
    while written < n_out:
        for s in srcs:
            with open(s, "rb") as f:
                while (b := f.read(CH)) and written < n_out:
                    b = b[: n_out - written]
                    out.write(b)
                    written += len(b)
"""


def run_measured(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> tuple[float, int]:
    """Wall seconds and peak RSS in bytes of one child process; a failure ends the benchmark with its stderr."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    err = p.stderr.read().decode(errors="replace") if p.stderr else ""
    if p.returncode != 0:
        raise SystemExit(f"command failed ({p.returncode}): {' '.join(cmd)}\n{err[-2000:]}")
    return dt, ru.ru_maxrss * 1024


def full_model() -> Path:
    """The full-size synthetic checkpoint in the cache, built once."""
    sys.path.insert(0, str(ROOT))
    from convert.synth.build import CACHE_DIR, build_synthetic, builder_fingerprint

    model = CACHE_DIR / "synth" / builder_fingerprint() / "MiniCPM-V-4.6-synth-full-seed0"
    if not (model / "config.json").is_file():
        print(f"building the full synthetic model into {model} ...", flush=True)
        build_synthetic("full", model, seed=0, report=False)
    return model


def warm(files: list[Path]) -> None:
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="checkpoint folder (default: the full synthetic model, built once)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quant", default="f16")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT))
    model = Path(args.model) if args.model else full_model()
    sources = sorted(model.glob("*.safetensors"))
    src_bytes = sum(f.stat().st_size for f in sources)

    export_t, export_rss, copy_t = [], [], []
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        out = Path(tmp) / "out"
        for i in range(args.runs):
            shutil.rmtree(out, ignore_errors=True)
            warm(sources)
            t, rss = run_measured([sys.executable, "-m", "convert", "gguf", "--model", str(model), "--quant", args.quant,
                                   "--out", str(out), "--quiet"])
            out_bytes = sum(f.stat().st_size for f in out.glob("*.gguf"))
            export_t.append(t)
            export_rss.append(rss)
            raw = Path(tmp) / "raw.bin"
            raw.unlink(missing_ok=True)
            warm(sources)
            t2, _ = run_measured([sys.executable, "-c", _COPY, *map(str, sources), str(raw), str(out_bytes)])
            copy_t.append(t2)
            raw.unlink()
            print(f"run {i + 1}: export {t:.2f} s, peak RSS {rss / 2**30:.2f} GiB; raw copy {t2:.2f} s", flush=True)

    res = {
        "model": str(model), "quant": args.quant, "runs": args.runs, "source_bytes": src_bytes, "output_bytes": out_bytes,
        "export_s_median": statistics.median(export_t), "raw_copy_s_median": statistics.median(copy_t),
        "time_ratio": statistics.median(export_t) / statistics.median(copy_t),
        "peak_rss_bytes_median": int(statistics.median(export_rss)), "peak_rss_bytes_max": max(export_rss),
    }
    print(f"export / raw copy time: {res['time_ratio']:.2f}x (target <= 2x); "
          f"peak RSS {res['peak_rss_bytes_median'] / 1e9:.2f} GB (target <= 1.5 GB)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
