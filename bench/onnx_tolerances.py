"""Measure what an ONNX (ExecuTorch, Core ML) export's arithmetic costs beyond its weights' types, on checkpoints
of many shapes.

    python bench/onnx_tolerances.py [--format onnx|executorch|coreml] [--seeds 1,2,3] [--presets tiny,tiny-alt]
                                    [--quants fp16,int4 | 8da4w,8da8w] [--scenarios quick] [--json FILE]

For each checkpoint (the presets and drawn checkpoints, convert/synth/draw.py) it exports every
quant with `python -m convert onnx`'s (or `executorch`'s, both modes) code, validates it with `run_validation`, and records per
scenario the conversion KL against the fake-quant reference divided by that reference's own KL from
fp32 (mean and p99), and the worst projector cosine. `recipes/tolerances.json` (conversion.by_type)
takes its limits from these figures; the README says which.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402,F401  (puts the project on sys.path)


def _export(fmt: str, ckpt, out: Path, q: str):
    if fmt == "coreml":  # 16x (one vision package per mode); validated by the proxy off macOS
        import sys as _sys

        from convert.coreml.export import export_coreml
        from validate.coreml_artifact import read_coreml_artifact

        export_coreml(ckpt, out, quant=q, prefill=8, force=True, quiet=True)
        return read_coreml_artifact(out, "coreml" if _sys.platform == "darwin" else "coreml-proxy")
    if fmt == "executorch":
        from convert.executorch.export import export_executorch
        from validate.executorch_artifact import read_executorch

        export_executorch(ckpt, out, quant=q, mode="both", force=True, quiet=True)
        return read_executorch(out)
    from convert.onnx.export import export_onnx
    from validate.onnx_artifact import read_onnx

    export_onnx(ckpt, out, quant=q, mode="both", force=True, quiet=True)
    return read_onnx(out)


def one(ckpt_dir: Path, label: str, quants: list[str], scenarios: str, work: Path, fmt: str = "onnx") -> list[dict]:
    from convert.checkpoint import Checkpoint
    from validate.harness import Profile, run_validation
    from validate.scenarios import load_scenarios

    ckpt = Checkpoint(ckpt_dir)
    rows = []
    for q in quants:
        art = _export(fmt, ckpt, work / f"{label}-{q}", q)
        rep = run_validation(ckpt, [art], load_scenarios(scenarios), profile=Profile(threads=2),
                             quiet=True, speed_anchor=False, speed=False)
        row = rep["artifacts"][0]
        for sc in row["scenarios"]:
            m = sc.get("metrics", {})
            if "fake-quant" not in m and q != "fp32":
                continue
            conv = m.get("fake-quant", m.get("fp32", {}))
            yard = m.get("fake-quant-vs-fp32", {})
            cos = [im["cosine"] for im in sc.get("images", []) if im.get("pixels") == "runtime"]
            rows.append({"checkpoint": label, "quant": q, "scenario": sc["scenario"], "status": sc["status"],
                         "kl_mean": conv.get("kl_mean"), "kl_p99": conv.get("kl_p99"),
                         "ratio_mean": conv.get("kl_mean", 0) / yard["kl_mean"] if yard.get("kl_mean") else None,
                         "ratio_p99": conv.get("kl_p99", 0) / yard["kl_p99"] if yard.get("kl_p99") else None,
                         "kl_fp32": m.get("fp32", {}).get("kl_mean"), "cosine_min": min(cos) if cos else None,
                         "decisive_flips": sc.get("verdict", {}).get("conversion", {}).get("decisive_flips")})
        worst = [r for r in rows if r["quant"] == q and r["ratio_mean"] is not None]
        print(f"{label} {q}: {row['status']}; worst ratio mean "
              f"{max((r['ratio_mean'] for r in worst), default=float('nan')):.2f} p99 "
              f"{max((r['ratio_p99'] for r in worst), default=float('nan')):.2f}", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--presets", default="tiny,tiny-alt")
    ap.add_argument("--format", default="onnx", choices=["onnx", "executorch", "coreml"])
    ap.add_argument("--quants", help="default fp16,int4 (onnx, coreml) or 8da4w,8da8w (executorch)")
    ap.add_argument("--scenarios", default="quick")
    ap.add_argument("--json")
    a = ap.parse_args()
    a.quants = a.quants or ("8da4w,8da8w" if a.format == "executorch" else "fp16,int4")
    from convert.synth.build import build_synthetic
    from convert.synth.draw import draw_preset

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        jobs = [(p, p, 0) for p in a.presets.split(",") if p] + [(f"seed{s}", draw_preset(int(s)), int(s))
                                                                  for s in a.seeds.split(",") if s]
        for label, preset, seed in jobs:
            d = work / label
            build_synthetic(preset, d, seed=seed, report=False, quiet=True)
            rows += one(d, label, a.quants.split(","), a.scenarios, work, a.format)
            if a.json:  # after every checkpoint: a crash later keeps what was measured
                Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")
    for q in a.quants.split(","):
        r = [x for x in rows if x["quant"] == q and x["ratio_mean"] is not None]
        if r:
            print(f"{q}: worst ratio mean {max(x['ratio_mean'] for x in r):.2f}, p99 {max(x['ratio_p99'] for x in r):.2f}; "
                  f"worst cosine {min((x['cosine_min'] for x in r if x['cosine_min'] is not None), default=float('nan')):.5f}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
