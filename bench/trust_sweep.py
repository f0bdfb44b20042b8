"""The trust sweep: does the harness pass every correct artifact and fail every broken one, on
checkpoints its rules were never tuned on?

    python bench/trust_sweep.py [--checkpoints 20] [--first-seed 1] [--out DIR] [--json FILE]
                                [--scenarios quick] [--threads 2] [--no-upstream] [--quiet]
    python bench/trust_sweep.py --summarize FILE.json [FILE.json ...]

For each drawn checkpoint (convert/synth/draw.py: random widths that are and are not multiples of
32 and 256, head ratios, attention intervals, vision depths and insert layers, fp32 / bf16,
sharded or not; every fourth one a bare `save_pretrained` folder without processor_config.json
whose chat template lives only in tokenizer_config.json):

* correct artifacts, which must pass: llama.cpp's own converter (F16, BF16, Q8_0; F16 projector),
  llama-quantize's Q4_K_M of its F16, and this project's F16, Q8_0, Q4_K_M and Q4_K_M with an
  importance matrix;
* planted faults (validate/faults.py), each on one of this project's files, which must fail.

Everything runs through `run_validation`, exactly as `python -m validate` does. Prints a table
and the false-failure / false-pass counts; `--json` keeps every row with the worst figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402,F401  (puts the project on sys.path)

GOOD_OURS = ("F16", "Q8_0", "Q4_K_M", "Q4_K_M+imatrix")
GOOD_UPSTREAM = ("llama.cpp F16", "llama.cpp BF16", "llama.cpp Q8_0", "llama-quantize Q4_K_M")
# faults the decoder's logits must show (the others show in tokens, image layout or embeddings)
DECODER_FAULTS = ("norm", "swap", "rope-dim", "ssm-a-sign", "freq-base")
FAULT_BASE = ("F16", "Q8_0", "Q4_K_M")  # fault k of checkpoint i is planted on FAULT_BASE[(i + k) % 3]


def _log(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, flush=True)


def build_checkpoint(seed: int, folder: Path) -> tuple[Path, str, bool]:
    from convert.synth.build import build_synthetic
    from convert.synth.draw import describe, draw_preset, plain_folder

    p = draw_preset(seed)
    plain = seed % 4 == 0
    if not (folder / "config.json").is_file():
        build_synthetic(p, folder, seed=seed, report=False, quiet=True)
        if plain:
            plain_folder(folder)
    return folder, describe(p) + ("; plain save_pretrained folder" if plain else ""), plain


def _named(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


def our_artifacts(ckpt, work: Path, threads: int) -> dict[str, tuple[Path, Path]]:
    """label -> (decoder, 16x projector) of this project's exports, under distinct file names."""
    from convert.gguf.export import export_gguf
    from convert.gguf.imatrix import collect_imatrix
    from quantize.calibration import load_calibration
    from quantize.imatrix import write_imatrix_gguf

    out = {}
    for q in GOOD_OURS:
        folder = work / f"ours-{q.replace('+', '-')}"
        kw = {}
        if q.endswith("+imatrix"):
            samples, ds = load_calibration("default", tokenizer=ckpt.tokenizer, n=8, seqlen=256, seed=0)
            data = collect_imatrix(ckpt, samples, seqlen=256, datasets=[ds], quiet=True, n_threads=threads)
            kw["imatrix"] = write_imatrix_gguf(work / "imatrix.gguf", data)
        paths = export_gguf(ckpt, folder, quant=q.split("+")[0], mode="16x", quiet=True, **kw)
        # distinct names: the harness keys its rows by the decoder's file name
        out[q] = (paths[0].rename(folder / f"ours-{q.replace('+', '-')}.gguf"), paths[1])
    return out


def upstream_artifacts(model_dir: Path, work: Path) -> dict[str, tuple[Path, Path]]:
    from validate.upstream import upstream_convert_many, upstream_quantize

    d = work / "llamacpp"
    d.mkdir(parents=True, exist_ok=True)
    jobs = [(model_dir, d / f"llamacpp-{t}.gguf", t.lower(), False, "16x") for t in ("F16", "BF16", "Q8_0")]
    jobs.append((model_dir, d / "mmproj-llamacpp-F16.gguf", "f16", True, "16x"))
    upstream_convert_many(jobs)
    mm = d / "mmproj-llamacpp-F16.gguf"
    out = {f"llama.cpp {t}": (d / f"llamacpp-{t}.gguf", mm) for t in ("F16", "BF16", "Q8_0")}
    q4 = upstream_quantize(d / "llamacpp-F16.gguf", d / "llamaquantize-Q4_K_M.gguf", "Q4_K_M", nthread=2)
    out["llama-quantize Q4_K_M"] = (q4, mm)
    return out


def fault_artifacts(ours: dict, work: Path, index: int) -> dict[str, tuple[Path, Path] | str]:
    from validate.faults import FAULTS, plant

    out = {}
    for k, name in enumerate(FAULTS):
        base = FAULT_BASE[(index + k) % len(FAULT_BASE)]
        dec, mm = ours[base]
        folder = work / f"fault-{name}"
        got = plant(name, dec, mm, folder)
        if isinstance(got, str):
            out[f"fault {name} ({base})"] = got
            continue
        fdec, fmm = got
        # distinct names: the harness keys its rows by the decoder's file name
        fdec = fdec if fdec.parent == folder else _named(fdec, folder / "dec.gguf")
        out[f"fault {name} ({base})"] = (fdec.rename(folder / f"fault-{name}-{base}.gguf"), fmm)
    return out


def _artifact(dec: Path, mm: Path):
    from validate.artifacts import Artifact, read_gguf

    # every decoder gets its own file name (rows are keyed by it); keep the folder for manifests
    return Artifact(read_gguf(dec), {"16x": read_gguf(mm)}, dec.parent)


def _caught_by(row: dict) -> list[str]:
    by = [c["check"] for c in row["checks"] if c["status"] == "fail"]
    if any(s["status"] == "fail" for s in row["scenarios"]):
        by.append("scenarios")
    if row["status"] in ("crashed", "timeout"):
        by.append(f"runtime {row['status']}")
    return by


def sweep_one(seed: int, index: int, root: Path, *, scenarios: str, threads: int, upstream: bool,
              quiet: bool) -> dict:
    from convert.checkpoint import Checkpoint
    from validate.harness import Profile, run_validation
    from validate.scenarios import load_scenarios

    t0 = time.monotonic()
    model_dir, about, plain = build_checkpoint(seed, root / f"checkpoint-{seed}")
    _log(quiet, f"checkpoint {seed}: {about}")
    ckpt = Checkpoint(model_dir)
    work = root / f"artifacts-{seed}"
    shutil.rmtree(work, ignore_errors=True)  # an interrupted earlier run's files
    ours = our_artifacts(ckpt, work, threads)
    good = {f"ours {k}": v for k, v in ours.items()}
    if upstream:
        good.update(upstream_artifacts(model_dir, work))
    faults = fault_artifacts(ours, work, index)
    # artifacts of the same types next to each other: the harness then builds their shared
    # fake-quant reference once
    todo = list(good.items()) + [(k, v) for k, v in faults.items() if not isinstance(v, str)]
    rank = {q: i for i, q in enumerate(FAULT_BASE)}
    todo.sort(key=lambda kv: rank.get(kv[0].split("(")[-1].rstrip(")") if kv[0].startswith("fault")
                                      else kv[0].removeprefix("ours "), len(rank)))
    arts, labels = [], {}
    for label, v in todo:
        a = _artifact(*v)
        arts.append(a)
        labels[a.name] = label
    rep = run_validation(ckpt, arts, load_scenarios(scenarios), scenario_set=scenarios, quiet=True,
                         speed_anchor=False, speed=False, profile=Profile(threads=threads))
    rows = []
    for r in rep["artifacts"]:
        label = labels[r["name"]]
        expect = "fail" if label.startswith("fault") else "pass"
        got = "pass" if r["status"] == "pass" else "fail"
        conv = [s["verdict"]["conversion"] for s in r["scenarios"] if "verdict" in s]
        rows.append({
            "checkpoint": seed, "artifact": label, "quant": r["quant"], "expected": expect, "status": r["status"],
            "correct": got == expect, "caught_by": _caught_by(r) if expect == "fail" else [],
            "messages": [c["message"] for c in r["checks"] if c["status"] == "fail"]
                        + [f for s in r["scenarios"] for f in s.get("failures", [])],
            "conversion_kl_over_limit": max((c["kl_mean"] / c["kl_mean_limit"] for c in conv), default=None),
            "conversion_p99_over_limit": max((c["kl_p99"] / c["kl_p99_limit"] for c in conv), default=None),
            "quality": r.get("verdict", {}).get("quality", {}),
        })
        mark = "ok " if rows[-1]["correct"] else "WRONG"
        extra = f" caught by {', '.join(rows[-1]['caught_by'])}" if expect == "fail" else ""
        if expect == "pass" and not rows[-1]["correct"]:
            extra = f" {rows[-1]['messages'][:2]}"
        _log(quiet, f"  {mark} {label:32s} {r['status']:8s}{extra}")
    for label, why in faults.items():
        if isinstance(why, str):
            rows.append({"checkpoint": seed, "artifact": label, "expected": "fail", "status": "not-applicable",
                         "correct": True, "reason": why})
            _log(quiet, f"  --  {label:32s} not applicable: {why}")
    shutil.rmtree(work, ignore_errors=True)
    return {"seed": seed, "about": about, "plain": plain, "wall_s": round(time.monotonic() - t0, 1), "rows": rows}


def table(results: list[dict]) -> str:
    good = [lab for lab in [f"ours {q}" for q in GOOD_OURS] + list(GOOD_UPSTREAM)]
    from validate.faults import FAULTS

    lines = ["| checkpoint | " + " | ".join(good) + " | faults failed |", "|---" * (len(good) + 2) + "|"]
    for res in results:
        by = {r["artifact"]: r for r in res["rows"]}
        cells = [("pass" if by[g]["status"] == "pass" else f"**{by[g]['status']}**") if g in by else "-" for g in good]
        fr = [r for r in res["rows"] if r["artifact"].startswith("fault") and r["status"] != "not-applicable"]
        n_ok = sum(r["correct"] for r in fr)
        cells.append(f"{n_ok} / {len(fr)}" + (f" ({len(FAULTS) - len(fr)} n/a)" if len(fr) < len(FAULTS) else ""))
        lines.append(f"| {res['seed']}: {res['about']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def counts(results: list[dict]) -> dict:
    rows = [r for res in results for r in res["rows"] if r["status"] != "not-applicable"]
    good = [r for r in rows if r["expected"] == "pass"]
    bad = [r for r in rows if r["expected"] == "fail"]
    return {"checkpoints": len(results), "correct_artifacts": len(good), "false_failures": sum(not r["correct"] for r in good),
            "faults": len(bad), "false_passes": sum(not r["correct"] for r in bad),
            "faults_caught_by_scenarios": sum("scenarios" in r["caught_by"] or any(c.startswith("runtime") for c in r["caught_by"])
                                              for r in bad),
            # how close to the conversion limits the correct files came, and how far past them the faults went
            "good_worst_kl_mean_over_limit": max((r["conversion_kl_over_limit"] or 0) for r in good) if good else None,
            "good_worst_kl_p99_over_limit": max((r["conversion_p99_over_limit"] or 0) for r in good) if good else None,
            "faults_least_kl_mean_over_limit": min((r["conversion_kl_over_limit"] for r in bad
                                                    if r["artifact"].split()[1] in DECODER_FAULTS), default=None)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoints", type=int, default=20)
    ap.add_argument("--first-seed", type=int, default=1)
    ap.add_argument("--out", help="work folder (default: a temporary one, removed)")
    ap.add_argument("--json", help="write every row here")
    ap.add_argument("--scenarios", default="quick")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-upstream", action="store_true", help="skip llama.cpp's converter and quantizer")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--summarize", nargs="+", metavar="JSON", help="print the table of earlier --json files (runs nothing; "
                    "a checkpoint in several files: the last one counts)")
    args = ap.parse_args(argv)
    results = []
    if args.summarize:
        by_seed = {r["seed"]: r for f in args.summarize for r in json.loads(Path(f).read_text())["results"]}
        results = [by_seed[k] for k in sorted(by_seed)]
    else:
        root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="trust-sweep-"))
        try:
            for i in range(args.checkpoints):
                results.append(sweep_one(args.first_seed + i, i, root, scenarios=args.scenarios, threads=args.threads,
                                         upstream=not args.no_upstream, quiet=args.quiet))
                if args.json:
                    Path(args.json).write_text(json.dumps({"counts": counts(results), "results": results}, indent=1)
                                               + "\n")
        finally:
            if not args.out:
                shutil.rmtree(root, ignore_errors=True)
    print(table(results))
    c = counts(results)
    print(f"\n{c['checkpoints']} checkpoints: {c['false_failures']} false failures of {c['correct_artifacts']} correct "
          f"artifacts, {c['false_passes']} false passes of {c['faults']} planted faults "
          f"({c['faults_caught_by_scenarios']} also caught by the scenarios, not only the static checks)")
    print(f"correct files came within {c['good_worst_kl_mean_over_limit']:.3g} (mean) and "
          f"{c['good_worst_kl_p99_over_limit']:.3g} (p99) of the conversion limits; the decoder faults "
          f"({', '.join(DECODER_FAULTS)}) reached at least {c['faults_least_kl_mean_over_limit'] or 0:.3g} times the mean limit")
    return 0 if c["false_failures"] == 0 and c["false_passes"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
