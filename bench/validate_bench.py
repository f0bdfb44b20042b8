"""Benchmark: the default validation of the tiny model's artifacts, wall time per export.

    python bench/validate_bench.py [--quants F16,Q8_0,Q4_K_M] [--scenarios default] [--json out.json]

Each quant is exported into its own folder (decoder + 16x and 4x projectors, as
`python -m convert gguf --quant Q --mode both --no-validate` writes them), then
`python -m validate FOLDER` runs in a fresh process, exactly as a CI job would call it; the
figure is that process's wall time (model loading, static checks, both references, the runtime
in its child process, reports) and its exit code. Target: under 2 minutes per export on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quants", default="F16,Q8_0,Q4_K_M")
    ap.add_argument("--scenarios", default="default")
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for q in args.quants.split(","):
            out = Path(tmp) / q
            subprocess.run([sys.executable, "-m", "convert", "gguf", "--quant", q, "--mode", "both", "--out", str(out),
                            "--no-validate", "--quiet"], check=True, cwd=ROOT, capture_output=True)
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "validate", str(out), "--scenarios", args.scenarios, "--quiet"],
                               cwd=ROOT, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            rep = json.loads((out / "validation.json").read_text())
            rows.append({"quant": q, "wall_s": round(wall, 1), "exit_code": r.returncode,
                         "scenarios": sum(len(a["scenarios"]) for a in rep["artifacts"]),
                         "peak_rss_mb": max(a["peak_rss_mb"] for a in rep["artifacts"])})
            print(f"{q}: {wall:.1f} s, exit {r.returncode}, {rows[-1]['scenarios']} scenario rows", flush=True)
    print("\n| export | scenarios | wall time | exit code | runtime peak RSS |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['quant']} | {r['scenarios']} | {r['wall_s']} s | {r['exit_code']} | {r['peak_rss_mb']:.0f} MB |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
