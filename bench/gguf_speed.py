"""Benchmark: one-pass Q4_K_M export against llama.cpp's two-step path, and the harness's memory.

    python bench/gguf_speed.py [--model DIR] [--runs 3] [--threads 2] [--validate-runs 1]
                               [--scenarios quick] [--profile] [--json out.json]

Without --model: the full synthetic model in the cache (built once). Every job runs in its own
fresh process, measured from outside (wall time; peak RSS from `os.wait4`'s ru_maxrss), each after
the source files were read once, so every path starts from the same warm page cache:

* (a)  `python -m convert gguf --quant Q4_K_M --no-validate`, T quantizing threads (decoder + F16 projector)
* (b1) `python -m convert gguf --quant f16 --no-validate` (decoder + F16 projector)
* (b2) llama.cpp's `llama_model_quantize` F16 -> Q4_K_M of (b1)'s decoder, T threads
* (b)  b1 + b2: what a llama.cpp user runs (convert_hf_to_gguf, then llama-quantize)
* (c)  the floor: read every safetensors byte and write it once
* (a1), (b1) + (b2 at 1 thread): the same at one thread
* validation: `python -m validate FOLDER --scenarios S` of (a)'s folder, wall time and the peak RSS of
  the harness process itself (its own getrusage at exit; the runtime runs in a child of its own).

Targets (README): (a)/(b) <= 0.6 at T=2, peak RSS of (a) <= 1.5 GB, harness peak <= 6 GB.
--profile adds one in-process run of (a) with the writer's per-type profile (read / check / encode /
write seconds summed over threads), the "where the time goes" table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (puts the project on sys.path)
from export_bench import full_model, run_measured, warm

ROOT = Path(__file__).resolve().parents[1]

_COPY = r"""
import sys
srcs, dst = sys.argv[1:-1], sys.argv[-1]
with open(dst, "wb") as out:
    for s in srcs:
        with open(s, "rb") as f:
            while b := f.read(64 << 20):
                out.write(b)
"""

_QUANTIZE = r"""
import sys
from validate.upstream import upstream_quantize
upstream_quantize(sys.argv[1], sys.argv[2], "Q4_K_M", nthread=int(sys.argv[3]))
"""

# the harness in-process, reporting its own peak RSS (not its runtime child's) into a file
_VALIDATE = r"""
import resource, sys
from validate.cli import main
rc = main(sys.argv[2:])
open(sys.argv[1], "w").write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))
sys.exit(rc)
"""


def profile_once(model: Path, out: Path, threads: int) -> dict:
    """(a) in this process with the writer's profile: seconds per phase and per ggml type."""
    from convert.checkpoint import Checkpoint
    from convert.gguf.export import export_gguf
    from convert.gguf.writer import WriteProfile

    prof = WriteProfile()
    t0 = time.perf_counter()
    export_gguf(Checkpoint(model), out, quant="Q4_K_M", force=True, quiet=True, threads=threads, profile=prof)
    d = prof.as_dict()
    d["wall_s"] = time.perf_counter() - t0
    return d


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="checkpoint folder (default: the full synthetic model, built once)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-single-thread", action="store_true", help="skip the 1-thread runs")
    ap.add_argument("--validate-runs", type=int, default=1, help="harness runs (0: skip validation)")
    ap.add_argument("--scenarios", default="quick")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()

    model = Path(args.model) if args.model else full_model()
    sources = sorted(model.glob("*.safetensors"))
    py = sys.executable
    T = args.threads
    res: dict = {"model": str(model), "threads": T, "runs": args.runs, "cpu_count": os.cpu_count(),
                 "source_bytes": sum(f.stat().st_size for f in sources), "jobs": {}}

    def env(threads: int) -> dict:
        return {**os.environ, "MINICPMV_QUANT_THREADS": str(threads)}

    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        tmp = Path(tmp)
        a_dir, b_dir, q_out, raw = tmp / "a", tmp / "b", tmp / "b2.gguf", tmp / "raw.bin"

        def job(name: str, cmd: list[str], e: dict | None = None, before=None):
            for i in range(args.runs):
                if before:
                    before()
                warm(sources)
                t, rss = run_measured(cmd, e, cwd=ROOT)
                res["jobs"].setdefault(name, []).append({"wall_s": round(t, 3), "peak_rss_bytes": rss})
                print(f"{name} run {i + 1}: {t:.2f} s, peak RSS {rss / 1e9:.2f} GB", flush=True)

        gguf_cmd = [py, "-m", "convert", "gguf", "--model", str(model), "--no-validate", "--quiet", "--force"]
        thread_set = [T] if args.no_single_thread or T == 1 else [T, 1]
        for nt in thread_set:
            job(f"a_t{nt}", gguf_cmd + ["--quant", "Q4_K_M", "--out", str(a_dir)], env(nt))
            job(f"b1_t{nt}", gguf_cmd + ["--quant", "f16", "--out", str(b_dir)], env(nt))
            f16 = b_dir / "MiniCPM-V-4.6-F16.gguf"
            job(f"b2_t{nt}", [py, "-c", _QUANTIZE, str(f16), str(q_out), str(nt)],
                before=lambda: q_out.unlink(missing_ok=True))
        job("c", [py, "-c", _COPY, *map(str, sources), str(raw)], before=lambda: raw.unlink(missing_ok=True))
        raw.unlink(missing_ok=True)

        med = {k: statistics.median(r["wall_s"] for r in v) for k, v in res["jobs"].items()}
        rss = {k: max(r["peak_rss_bytes"] for r in v) for k, v in res["jobs"].items()}
        summ = res["summary"] = {"median_s": med, "peak_rss_bytes": rss}
        man = json.loads((a_dir / "manifest.json").read_text())
        summ["quantizer"] = next((e["quantizer"] for e in man["artifacts"] if "quantizer" in e), None)
        for nt in thread_set:
            b = med[f"b1_t{nt}"] + med[f"b2_t{nt}"]
            summ[f"b_t{nt}_s"] = b
            summ[f"a_over_b_t{nt}"] = med[f"a_t{nt}"] / b
        summ["a_over_c"] = med[f"a_t{T}"] / med["c"]

        if args.profile:
            res["profile"] = profile_once(model, tmp / "prof", T)

        for i in range(args.validate_runs):
            rss_file = tmp / "rss.txt"
            warm(sources)
            t, _ = run_measured([py, "-c", _VALIDATE, str(rss_file), "--model", str(model), str(a_dir),
                                 "--scenarios", args.scenarios, "--quiet"], cwd=ROOT)
            rep = json.loads((a_dir / "validation.json").read_text())
            res.setdefault("validation", []).append({
                "wall_s": round(t, 1), "harness_peak_rss_bytes": int(rss_file.read_text()),
                "runtime_peak_rss_mb": max(a.get("peak_rss_mb") or 0 for a in rep["artifacts"]),
                "verdicts": {a["name"]: a["status"] for a in rep["artifacts"]},
                "figures": {a["name"]: [{"scenario": s["scenario"], "status": s["status"], "metrics": s.get("metrics")}
                                        for s in a["scenarios"]] for a in rep["artifacts"]}})
            v = res["validation"][-1]
            print(f"validation run {i + 1}: {t:.1f} s, harness peak RSS {v['harness_peak_rss_bytes'] / 1e9:.2f} GB, "
                  f"verdicts {v['verdicts']}", flush=True)

    print("\n| path | threads | wall (median) | peak RSS |\n|---|---|---|---|")
    names = {"a": "(a) one-pass Q4_K_M", "b1": "(b1) f16 export", "b2": "(b2) llama_model_quantize F16 -> Q4_K_M"}
    for nt in thread_set:
        for k in ("a", "b1", "b2"):
            print(f"| {names[k]} | {nt} | {med[f'{k}_t{nt}']:.1f} s | {rss[f'{k}_t{nt}'] / 1e9:.2f} GB |")
        print(f"| (b) two-step total | {nt} | {summ[f'b_t{nt}_s']:.1f} s | "
              f"{max(rss[f'b1_t{nt}'], rss[f'b2_t{nt}']) / 1e9:.2f} GB |")
    print(f"| (c) read + write the bytes once | – | {med['c']:.1f} s | – |")
    for nt in thread_set:
        print(f"(a)/(b) at {nt} thread(s): {summ[f'a_over_b_t{nt}']:.2f}" + (" (target <= 0.6)" if nt == T else ""))
    print(f"(a)/(c): {summ['a_over_c']:.2f}; quantizer: {summ['quantizer']}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
