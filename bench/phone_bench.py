"""The emulated phone profiles on one checkpoint, in one run (the README's phone tables).

    python bench/phone_bench.py [--model DIR | --presets tiny,tiny-alt --seeds 1,2] [--profiles a,b]
                                [--types F16,Q8_0,Q4_K_M] [--scenarios quick] [--json FILE]

For each GGUF type (exported here, 16x; `onnx-fp32`, `onnx-int4`, ... for ONNX folders; `pte-8da4w`,
`pte-fp32` for ExecuTorch programs) and each phone profile: `python -m validate --phone PROFILE`
through the harness in this process (the verdict against the references, and the same file's
logits on aarch64 under qemu against x86 with the same settings), its wall time, and as the
anchor, the same validation on x86 alone measured in this run (the ratio says what emulation costs;
the issue's target is the absolute figure: Q4_K_M, quick, android-armv82 within 10 minutes).
Also the set-up time of each profile as found (0 when cached), and per scenario the conversion
figures the tolerances are set from: KL against the fake-quant reference over the types' own cost
(recipes/tolerances.json, conversion.by_type "aarch64-fp16-F16").
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def isa_summary(row: dict) -> dict:
    """Worst case over the scenarios of the aarch64-vs-x86 figures."""
    xs = [sc["x86"] for sc in row["scenarios"] if isinstance(sc.get("x86"), dict) and "metrics" in sc["x86"]]
    if not xs:
        return {}
    cos = [c for x in xs for c in x.get("image_cosine", [])]
    return {"kl_mean_max": max(x["metrics"]["kl_mean"] for x in xs),
            "kl_p99_max": max(x["metrics"]["kl_p99"] for x in xs),
            "max_abs_logit": max(x["metrics"]["max_abs_err"] for x in xs),
            "top1_min": min(x["metrics"]["top1_agreement"] for x in xs),
            "greedy_agreement_min": min(x["greedy_agreement"] for x in xs),
            "image_cosine_min": min(cos) if cos else None}


def conversion_ratios(row: dict) -> list[dict]:
    """Per scenario: KL(fake-quant || artifact) over KL(fp32 || fake-quant), mean and p99."""
    out = []
    for sc in row["scenarios"]:
        m = sc.get("metrics", {})
        if "fake-quant" not in m:
            continue
        fq, yard = m["fake-quant"], m["fake-quant-vs-fp32"]
        out.append({"scenario": sc["scenario"], "kl_fq_mean": fq["kl_mean"], "kl_fq_p99": fq["kl_p99"],
                    "ratio_mean": fq["kl_mean"] / yard["kl_mean"] if yard["kl_mean"] else None,
                    "ratio_p99": fq["kl_p99"] / yard["kl_p99"] if yard["kl_p99"] else None,
                    "decisive_flips": sc.get("verdict", {}).get("conversion", {}).get("decisive_flips"),
                    "failures": sc.get("failures", [])})
    return out


def checkpoints(a, work: Path):
    """(label, Checkpoint): --model, else the presets and drawn checkpoints."""
    if a.model or not (a.presets or a.seeds):
        ck = common.open_checkpoint(a.model)
        yield ck.name, ck
        return
    from convert import Checkpoint
    from convert.synth.build import build_synthetic
    from convert.synth.draw import draw_preset

    jobs = [(p, p, 0) for p in (a.presets or "").split(",") if p]
    jobs += [(f"seed{s}", draw_preset(int(s)), int(s)) for s in (a.seeds or "").split(",") if s]
    for label, preset, seed in jobs:
        d = work / f"ckpt-{label}"
        build_synthetic(preset, d, seed=seed, report=False, quiet=True)
        yield label, Checkpoint(d)


def measure(label: str, ckpt, work: Path, types: list[str], setups: dict, scen, out: dict) -> None:
    """Each type of one checkpoint: x86 alone (the anchor), then under each phone profile."""
    from convert.gguf.export import export_gguf
    from validate.artifacts import discover
    from validate.harness import Profile, run_validation

    for quant in types:
        folder = Path(work) / label / quant
        if quant.startswith("onnx-"):
            from convert.onnx.export import export_onnx
            from validate.onnx_artifact import read_onnx

            export_onnx(ckpt, folder, quant=quant[5:], mode="16x", quiet=True)
            arts = [read_onnx(folder)]
        elif quant.startswith("pte-"):  # an ExecuTorch program (tests' sizes: 1024 positions, 512 per call)
            from convert.executorch.export import export_executorch
            from validate.executorch_artifact import read_executorch

            export_executorch(ckpt, folder, quant=quant[4:], mode="16x", max_context=1024, max_seq_len=512,
                              quiet=True)
            arts = [read_executorch(folder)]
        else:
            export_gguf(ckpt, folder, quant=quant, mode="16x", quiet=True)
            arts = discover(folder)
        t0 = time.monotonic()
        rep = run_validation(ckpt, arts, scen, profile=Profile(threads=4), quiet=True, speed_anchor=False,
                             speed=False)
        x86_wall = time.monotonic() - t0
        for name, s in setups.items():
            t0 = time.monotonic()
            rep = run_validation(ckpt, arts, scen, profile=Profile.for_phone(s), quiet=True, speed_anchor=False,
                                 speed=False)
            wall = time.monotonic() - t0
            row = rep["artifacts"][0]
            r = {"checkpoint": label, "type": quant, "profile": name, "status": row["status"], "wall_s": round(wall, 1),
                 "x86_wall_s": round(x86_wall, 1), "wall_ratio_x86": round(wall / x86_wall, 2),
                 "scenarios": {sc["scenario"]: sc["status"] for sc in row["scenarios"]},
                 "kl_fp32_max": max(sc["metrics"]["fp32"]["kl_mean"] for sc in row["scenarios"] if "metrics" in sc),
                 "aarch64_vs_x86": isa_summary(row), "conversion": conversion_ratios(row),
                 "llama_cpp": row.get("platform", {}).get("llama_cpp")}
            out["runs"].append(r)
            x = r["aarch64_vs_x86"]
            worst = max((c["ratio_mean"] or 0 for c in r["conversion"]), default=0)
            print(f"{label:9s} {quant:7s} {name:15s} fq ratio {worst:5.1f} {r['status']:5s} wall {wall:6.1f}s ({r['wall_ratio_x86']:.1f}x x86) "
                  f"KL x86 {x.get('kl_mean_max', 0):.2e} max|d| {x.get('max_abs_logit', 0):.3g} "
                  f"top1 {x.get('top1_min', 0):.3f} greedy {x.get('greedy_agreement_min', 0):.3f} "
                  f"img cos {x.get('image_cosine_min')}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--presets")
    ap.add_argument("--seeds")
    ap.add_argument("--profiles", default="android-armv82,android-armv86,harmonyos")
    ap.add_argument("--types", default="F16,Q8_0,Q4_K_M")
    ap.add_argument("--scenarios", default="quick")
    ap.add_argument("--json")
    a = ap.parse_args()

    from runtimes.phone.build import ensure
    from runtimes.phone.profiles import get_profile
    from validate.scenarios import load_scenarios

    scen = load_scenarios(a.scenarios)
    out: dict = {"scenarios": a.scenarios, "setup": {}, "runs": []}
    setups = {}
    for name in a.profiles.split(","):
        t0 = time.monotonic()
        setups[name] = ensure(get_profile(name))
        out["setup"][name] = round(time.monotonic() - t0, 1)
    with tempfile.TemporaryDirectory() as work:
        for label, ckpt in checkpoints(a, Path(work)):
            measure(label, ckpt, Path(work), a.types.split(","), setups, scen, out)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
