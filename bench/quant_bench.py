"""Benchmark: our GPTQ/AWQ (`python -m quantize`) vs GPTQModel, wall time and peak RSS, same model and calibration set.

    python bench/quant_bench.py [--model DIR] [--calib-samples 128] [--seqlen 512] [--methods gptq,awq]
                                [--threads N] [--runs 1] [--gptqmodel-dtype auto] [--feed encoded]
                                [--timeout S] [--workdir DIR] [--keep] [--json out.json]

Without --model: the full synthetic model in the cache (built once, in a child process, if absent).
Every job runs in its own fresh process and is measured from outside: wall time around the process,
peak RSS from its rusage (`os.wait4`, ru_maxrss: the process and the children it waited for; file-backed
pages such as mmapped safetensors count). This process never imports torch, so a child's ru_maxrss
(which includes the pre-exec copy of the parent) is the job's own. The model files are read once
before each job so every job starts from the same page cache.

The jobs, per method:
* ours: `python -m quantize gptq|awq --model M --out TMP --calib-samples N --seqlen L --threads T
  --no-validate --quiet` (defaults: GPTQ sym, damp 0.01, no act-order; AWQ asym with the clip search;
  4-bit g128; the model held in the checkpoint's bfloat16 and computed in float32 part by part).
* GPTQModel: `python bench/gptqmodel_runner.py --method gptq|awq ...` (see that file): the same scheme
  (GPTQ sym, desc_act False, act_group_aware False, damp 0.01; AWQ zero point, GEMM, BACKEND.AWQ_TORCH),
  fed the same encoded calibration inputs (`--feed encoded`: the samples of load_calibration run
  through encode_sample, identical input_ids / pixel_values / target_sizes, batch 1), everything
  else GPTQModel's defaults (bfloat16 on this checkpoint, offload to disk). Both tools encode the
  calibration set inside the measured process and both quantize the same decoder linears
  (in_proj_a / in_proj_b left dense, vision tower, merger and lm_head untouched).
Both get `--threads T` torch threads (default: all cores); note that `python -m quantize` without
--threads runs 1 thread (convert.gguf.imatrix.DEFAULT_THREADS), although its help says all cores.
Run it on an otherwise idle machine: with more torch threads than free cores both tools slow down
many times (tiny model, 2 cores, one held by another job: ours 11 s -> 135 s, GPTQModel's GPTQ 13 s -> 32 s
at 2 threads instead of 1). A job started at a load average above 0.5 gets a warning.

Reported: a Markdown table (method | ours wall s | GPTQModel wall s | ratio | ours peak RSS | theirs |
ratio; medians over --runs) and, with --json, every job's figures. Target: both ratios <= 1.0.
A GPTQModel job stopped before finishing (--timeout, or killed by hand) bounds its figures from
below: the table then shows "> its wall time at the stop" (and the layer it was in) and ratios as
"< ours / that", which decide the target when they are already <= 1.0.
Quality is not measured here. GPTQModel's AWQ folds the scales into Qwen3.5's offset norms
(out = norm(x)*(1+w)) as w/s instead of (1+w)/s - 1 (`quantization/awq/quantize/scale.py::scale_ln_fcs`
special-cases only Gemma norms; still so in 7.7.0; shared/reference/quantization.md section 0), so its
AWQ checkpoint of this model is wrong; that costs no time, so the timing comparison stands.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "bench" / "gptqmodel_runner.py"
OURS_RE = re.compile(r"(\d+) linears from (\d+) samples \((\d+) tokens, (\d+) image tokens\) in ([\d.]+) s")
GPTQMODEL_LAYER_RE = re.compile(r"Quantizing layer (\d+) of (\d+)")
AWQ_NORM_NOTE = ("GPTQModel's AWQ folds scales into Qwen3.5's offset norms wrongly (w/s instead of (1+w)/s - 1; "
                 "quantization.md section 0): its AWQ checkpoint of this model is not usable for quality, "
                 "the time and memory figures still compare")


def default_full_model() -> Path:
    """The full synthetic model in the cache; built in a child process (this one stays torch-free)."""
    sys.path.insert(0, str(ROOT))
    from convert.synth.build import CACHE_DIR, builder_fingerprint  # no torch at import

    model = CACHE_DIR / "synth" / builder_fingerprint() / "MiniCPM-V-4.6-synth-full-seed0"
    if not (model / "config.json").is_file():
        print(f"building the full synthetic model into {model} ...", flush=True)
        code = ("import sys; from pathlib import Path; from convert.synth.build import build_synthetic; "
                "build_synthetic('full', Path(sys.argv[1]), seed=0, report=False)")
        subprocess.run([sys.executable, "-c", code, str(model)], cwd=ROOT, check=True)
    return model


def warm(model: Path) -> None:
    for f in sorted(model.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def run_measured(cmd: list[str], log: Path, env: dict, timeout: float | None, cwd: Path) -> dict:
    """Run one job in a fresh process (its own session); wall seconds, peak RSS bytes, exit code, stdout."""
    t0 = time.perf_counter()
    with open(log, "wb") as out:
        # cwd: GPTQModel writes a logs/ folder into its working directory
        p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = None if timeout is None else t0 + timeout
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.perf_counter() > deadline:
                os.killpg(p.pid, signal.SIGKILL)  # the job's own process group, nothing else
                pid, status, ru = os.wait4(p.pid, 0)
                status = -1
                break
            time.sleep(0.05)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status) if status != -1 else -9
    return {"wall_s": round(wall, 3), "peak_rss_bytes": ru.ru_maxrss * 1024, "returncode": p.returncode,
            "timed_out": status == -1, "cpu_s": round(ru.ru_utime + ru.ru_stime, 2), "log": str(log)}


def _tail(log: Path, n: int = 3000) -> str:
    try:
        return log.read_text(errors="replace").replace("\r", "\n")[-n:]
    except OSError:
        return ""


def parse_ours(log: Path) -> dict:
    m = OURS_RE.search(_tail(log, 20000))
    if not m:
        return {}
    return {"linears": int(m[1]), "samples": int(m[2]), "tokens": int(m[3]), "image_tokens": int(m[4]),
            "seconds_reported": float(m[5])}


def parse_progress(log: Path) -> dict:
    """How far a GPTQModel job got (its progress bar: "Quantizing layer N of M", 0-based N of the last index)."""
    found = GPTQMODEL_LAYER_RE.findall(_tail(log, 2_000_000))
    if not found:
        return {}
    n, last = max((int(a), int(b)) for a, b in found)
    return {"layer_started": n + 1, "layers": last + 1}


def stopped(job: dict) -> bool:
    """Stopped before finishing: by --timeout or killed by a signal (by hand), not failed on its own."""
    return bool(job["timed_out"]) or job["returncode"] < 0


def parse_runner(log: Path) -> dict:
    for line in reversed(_tail(log, 200000).splitlines()):
        if line.startswith("gptqmodel_runner: "):
            return json.loads(line[len("gptqmodel_runner: "):])
    return {}


def gib(b) -> str:
    return "-" if b is None else f"{b / 2**30:.2f} GiB"


def ratio(a, b):
    return None if a is None or not b else a / b


def fmt_ratio(r) -> str:
    return "-" if r is None else f"{r:.2f}x"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="checkpoint folder (default: the full synthetic model, built once)")
    ap.add_argument("--calib", default="default", help="calibration set for both tools (default: default)")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default="gptq,awq", help="comma-separated: gptq, awq")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch threads for both tools (default: all cores)")
    ap.add_argument("--runs", type=int, default=1, help="runs of every job (medians reported)")
    ap.add_argument("--tools", default="ours,gptqmodel", help="comma-separated: ours, gptqmodel (default both)")
    ap.add_argument("--previous", action="append", default=[],
                    help="a --json file of an earlier run whose jobs join this summary (e.g. one tool per session)")
    ap.add_argument("--gptqmodel-dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                    help="dtype GPTQModel loads the model in (default auto: its own choice, bfloat16 here; "
                         "float32 works for GPTQ only, its CPU AWQ packer takes float16/bfloat16)")
    ap.add_argument("--feed", default="encoded", choices=("encoded", "conversations"),
                    help="GPTQModel's calibration input: our encoded inputs (default) or chats it encodes itself")
    ap.add_argument("--no-run", action="store_true", help="run nothing: the summary of the --previous files' jobs")
    ap.add_argument("--timeout", type=float, help="seconds per job (default: none)")
    ap.add_argument("--workdir", help="folder for outputs and logs (default: a temporary one, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the workdir (quantized checkpoints and logs)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or any(m not in ("gptq", "awq") for m in methods):
        ap.error(f"--methods {args.methods}: choose from gptq, awq")
    if args.runs < 1 or args.calib_samples < 1 or args.seqlen < 1:
        ap.error("--runs, --calib-samples and --seqlen must be at least 1")
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    if not tools or any(t not in ("ours", "gptqmodel") for t in tools):
        ap.error(f"--tools {args.tools}: choose from ours, gptqmodel")
    model = Path(args.model).resolve() if args.model else default_full_model()
    if not (model / "config.json").is_file():
        ap.error(f"--model {model}: no config.json")

    env = dict(os.environ)
    env.setdefault("GPTQMODEL_CPU_WORKERS", str(min(12, max(2, ((os.cpu_count() or 1) + 1) // 2))))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    common = ["--model", str(model), "--calib", args.calib, "--calib-samples", str(args.calib_samples),
              "--seqlen", str(args.seqlen), "--seed", str(args.seed), "--threads", str(args.threads)]

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="quant_bench-"))
    work.mkdir(parents=True, exist_ok=True)
    jobs: list[dict] = []
    for prev in args.previous:
        old = json.loads(Path(prev).read_text())
        if (old["model"], old["calib_samples"], old["seqlen"], old["threads"]) != (
                str(model), args.calib_samples, args.seqlen, args.threads):
            ap.error(f"--previous {prev}: another model, budget or thread count")
        jobs += [j for j in old["jobs"] if j["method"] in methods]
    failed = False
    try:
        for run in range(1, 0 if args.no_run else args.runs + 1):
            for method in methods:
                for tool in tools:
                    tag = f"{method}-{tool}-run{run}"
                    out = work / tag
                    shutil.rmtree(out, ignore_errors=True)
                    if tool == "ours":
                        cmd = [sys.executable, "-m", "quantize", method, "--out", str(out), *common,
                               "--no-validate", "--quiet"]
                    else:
                        cmd = [sys.executable, str(RUNNER), "--method", method, "--out", str(out), *common,
                               "--dtype", args.gptqmodel_dtype, "--feed", args.feed]
                    warm(model)
                    load = os.getloadavg()[0]
                    print(f"[{tag}] {' '.join(cmd)}", flush=True)
                    if load > 0.5:
                        print(f"[{tag}] warning: the machine is busy (load average {load:.2f}); the figures are skewed, "
                              "and more torch threads than free cores can slow a job down many times", flush=True)
                    r = run_measured(cmd, work / f"{tag}.log", env, args.timeout, work)
                    r.update(method=method, tool=tool, run=run, cmd=cmd, load_avg_before=round(load, 2))
                    r["details"] = parse_ours(Path(r["log"])) if tool == "ours" else parse_runner(Path(r["log"]))
                    jobs.append(r)
                    if r["returncode"] != 0:
                        failed = True
                        why = ("timed out" if r["timed_out"] else f"killed by signal {-r['returncode']}"
                               if r["returncode"] < 0 else f"exit code {r['returncode']}")
                        print(f"[{tag}] FAILED ({why}) after {r['wall_s']:.1f} s; log {r['log']}:\n"
                              f"{_tail(Path(r['log']))}", flush=True)
                    else:
                        print(f"[{tag}] {r['wall_s']:.1f} s, peak RSS {gib(r['peak_rss_bytes'])}, "
                              f"CPU {r['cpu_s']:.1f} s", flush=True)
                    if not args.keep:
                        shutil.rmtree(out, ignore_errors=True)
    finally:
        if not args.keep and not failed and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    # summary: medians over runs of the successful jobs
    summary = {}
    for method in methods:
        fig = {}
        for tool in ("ours", "gptqmodel"):
            ok = [j for j in jobs if j["method"] == method and j["tool"] == tool and j["returncode"] == 0]
            fig[tool] = {"wall_s": statistics.median(j["wall_s"] for j in ok) if ok else None,
                         "peak_rss_bytes": int(statistics.median(j["peak_rss_bytes"] for j in ok)) if ok else None,
                         "runs_ok": len(ok)}
            cut = [j for j in jobs if j["method"] == method and j["tool"] == tool and stopped(j)]
            if not ok and cut:  # its longest stopped run bounds the figures from below
                j = max(cut, key=lambda j: j["wall_s"])
                fig[tool]["stopped"] = {"wall_s_at_least": j["wall_s"], "peak_rss_bytes_at_least": j["peak_rss_bytes"],
                                        **(parse_progress(Path(j["log"])) if tool == "gptqmodel" else {})}
        o, t = fig["ours"], fig["gptqmodel"]
        tr, rr = ratio(o["wall_s"], t["wall_s"]), ratio(o["peak_rss_bytes"], t["peak_rss_bytes"])
        bound = None
        if tr is None and o["wall_s"] is not None and "stopped" in t:  # GPTQModel stopped: ours / its lower bound
            b = t["stopped"]
            bound = {"time_ratio_at_most": ratio(o["wall_s"], b["wall_s_at_least"]),
                     "rss_ratio_at_most": ratio(o["peak_rss_bytes"], b["peak_rss_bytes_at_least"])}
        # the same inputs: our tokens / image tokens vs what GPTQModel was fed and what its modules saw
        od = next((j["details"] for j in jobs if j["method"] == method and j["tool"] == "ours" and j["details"]), {})
        td = next((j["details"] for j in jobs if j["method"] == method and j["tool"] == "gptqmodel" and j["details"]), {})
        same = None
        if od and td and args.feed == "encoded":
            same = (od.get("tokens") == td.get("tokens") and od.get("image_tokens") == td.get("image_tokens")
                    and od.get("samples") == td.get("samples") and td.get("tokens_per_module") == [str(od.get("tokens"))]
                    and od.get("linears") == td.get("modules_quantized"))
        met = None if tr is None or rr is None else (tr <= 1.0 and rr <= 1.0)
        if bound is not None:
            met = bound["time_ratio_at_most"] <= 1.0 and bound["rss_ratio_at_most"] <= 1.0
        summary[method] = {"ours": o, "gptqmodel": t, "time_ratio": tr, "rss_ratio": rr, "bounds": bound,
                           "target_met": met,
                           "same_inputs": same, "ours_inputs": od,
                           "gptqmodel_inputs": {k: td.get(k) for k in ("samples", "image_samples", "tokens", "image_tokens",
                                                                       "tokens_per_module", "modules_quantized",
                                                                       "dtype", "torch_threads", "cpu_workers", "seconds")}}

    print()
    print(f"model {model}; calibration {args.calib}, {args.calib_samples} samples x {args.seqlen} tokens "
          f"(seed {args.seed}); {args.threads} torch threads each; {args.runs} run(s), medians")
    print()
    print("| method | ours wall s | GPTQModel wall s | ratio | ours peak RSS | GPTQModel peak RSS | ratio |")
    print("|---|---|---|---|---|---|---|")
    for method, s in summary.items():
        o, t, b = s["ours"], s["gptqmodel"], s["bounds"]
        ow = "-" if o["wall_s"] is None else f"{o['wall_s']:.1f}"
        tw, tm, trr, rrr = ("-" if t["wall_s"] is None else f"{t['wall_s']:.1f}", gib(t["peak_rss_bytes"]),
                            fmt_ratio(s["time_ratio"]), fmt_ratio(s["rss_ratio"]))
        if "stopped" in t:
            st = t["stopped"]
            where = f", stopped in layer {st['layer_started']} of {st['layers']}" if "layers" in st else ", stopped"
            tw, tm = f"> {st['wall_s_at_least']:.1f}{where}", f"> {gib(st['peak_rss_bytes_at_least'])}"
            if b is not None:
                trr, rrr = f"< {fmt_ratio(b['time_ratio_at_most'])}", f"< {fmt_ratio(b['rss_ratio_at_most'])}"
        print(f"| {method.upper()} | {ow} | {tw} | {trr} | {gib(o['peak_rss_bytes'])} | {tm} | {rrr} |")
    print()
    for method, s in summary.items():
        od, td = s["ours_inputs"], s["gptqmodel_inputs"]
        if od or td.get("tokens") is not None:
            print(f"{method.upper()} inputs: ours {od.get('samples')} samples, {od.get('tokens')} tokens "
                  f"({od.get('image_tokens')} image), {od.get('linears')} linears; GPTQModel fed {td.get('samples')} "
                  f"samples ({td.get('image_samples')} with an image), {td.get('tokens')} tokens "
                  f"({td.get('image_tokens')} image), tokens per module {td.get('tokens_per_module')}, "
                  f"{td.get('modules_quantized')} linears, {td.get('dtype')}; identical: {s['same_inputs']}")
    print("targets: time ratio <= 1.0 and peak RSS ratio <= 1.0: "
          + ", ".join(f"{m.upper()} {'met' if s['target_met'] else 'not met' if s['target_met'] is False else 'n/a'}"
                      for m, s in summary.items()))
    if "awq" in methods:
        print(f"note: {AWQ_NORM_NOTE}")
    dtypes = sorted({str(j["details"].get("dtype")) for j in jobs if j["tool"] == "gptqmodel" and j["details"]})
    print(f"note: ours holds the model in the checkpoint's dtype and computes in float32, one part at a time; "
          f"GPTQModel ran in {', '.join(dtypes) or '?'} "
          f"(--gptqmodel-dtype {args.gptqmodel_dtype}), with offload_to_disk on (its default)")
    if failed:
        print(f"some jobs failed; logs kept in {work}")

    if args.json:
        res = {"model": str(model), "calib": args.calib, "calib_samples": args.calib_samples, "seqlen": args.seqlen,
               "seed": args.seed, "threads": args.threads, "runs": args.runs, "feed": args.feed,
               "gptqmodel_dtype": args.gptqmodel_dtype, "gptqmodel_cpu_workers": env["GPTQMODEL_CPU_WORKERS"],
               "cpu_count": os.cpu_count(), "summary": summary, "jobs": jobs,
               "parent_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
               "notes": [AWQ_NORM_NOTE] if "awq" in methods else []}
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
