"""The bundle's checks: every artifact through the validation harness on this machine and under each
of the recipe's phone profiles, and the memory estimate per device class against its budget.

Where a format has no runtime on a target (Core ML under the emulated Android CPU, the GPU of an
iPhone), the run says so and skips it: the bundle's report lists what was not checked, and why."""

from __future__ import annotations

import platform
import time
from pathlib import Path

from ..errors import ConvertError
from ..memory import MIB, estimate
from .parts import Part

HOST = f"{platform.machine()} (this machine)"
NO_PHONE = {"ios": "the iOS app runs llama.cpp on Metal, which cannot be emulated here: validated on this "
                   "machine's CPU only"}


def harness_artifacts(parts: list[Part], dest: Path) -> list[tuple[Part, object]]:
    """Each built part as the harness's artifact (a Core ML vision-only package has its own checks)."""
    import sys

    out = []
    for p in parts:
        if p.kind == "gguf":
            from validate.artifacts import Artifact, read_gguf

            infos = [read_gguf(dest / f) for f in p.files if f.endswith(".gguf") and f != "imatrix.gguf"]
            dec = [i for i in infos if i.kind == "decoder"][0]
            out.append((p, Artifact(dec, {i.mode: i for i in infos if i.kind == "mmproj"}, dest)))
        elif p.kind == "onnx":
            from validate.onnx_artifact import read_onnx

            out.append((p, read_onnx(dest / p.subdir)))
        elif p.kind == "executorch":
            from validate.executorch_artifact import read_executorch

            out.append((p, read_executorch(dest / p.subdir)))
        elif p.kind == "coreml" and "decoder" in p.options["parts"]:
            from validate.coreml_artifact import PROXY, read_coreml_artifact

            out.append((p, read_coreml_artifact(dest / p.subdir, "coreml" if sys.platform == "darwin" else PROXY)))
    return out


def run_validation_runs(recipe, ckpt, parts: list[Part], dest: Path, *, quiet: bool) -> list[dict]:
    """One harness run on this machine (the recipe's scenarios), one per phone profile (its phone
    scenarios); a run's artifact rows keep the harness's report whole."""
    from validate.harness import PHONE_RUNTIMES, Profile, run_validation
    from validate.report import summary_text
    from validate.scenarios import load_scenarios

    arts = harness_artifacts(parts, dest)
    v = recipe.validation
    imat = dest / "imatrix.gguf"  # the GGUF tensors are checked exactly against what it weighted
    imatrix = imat if imat.is_file() else None
    runs = []
    if arts:
        print(f"validating {', '.join(a.name for _, a in arts)} on this machine (scenarios: {v['scenarios']})")
        rep = run_validation(ckpt, [a for _, a in arts], load_scenarios(v["scenarios"]), profile=Profile(),
                             scenario_set=v["scenarios"], quiet=quiet, speed_anchor=False, max_kl=v.get("max_kl"),
                             imatrix=imatrix)
        print(summary_text(rep))
        runs.append({"where": HOST, "target": "host", "report": rep, "parts": [p.kind for p, _ in arts]})
    for p in parts:
        if p.kind == "coreml" and "decoder" not in p.options["parts"]:
            from validate.coreml_artifact import validate_coreml

            rep = validate_coreml(ckpt, dest / p.subdir, quiet=quiet)
            runs.append({"where": f"{HOST}: Core ML package checks", "target": "host", "coreml": rep,
                         "parts": ["coreml"]})
    if not recipe.phones:
        runs.append({"where": "phone", "target": "phone", "skipped": NO_PHONE.get(recipe.platform, "no phone profile "
                     "in the recipe"), "parts": [p.kind for p in parts]})
    for name in recipe.phones:
        from runtimes.phone.build import ensure
        from runtimes.phone.profiles import get_profile

        on_phone = [(p, a) for p, a in arts if (a.runtime or "llama.cpp") in PHONE_RUNTIMES]
        off = [p.kind for p in parts if p.kind not in {q.kind for q, _ in on_phone}]  # Core ML: an Apple format
        if off:
            runs.append({"where": name, "target": "phone", "parts": off,
                         "skipped": f"{', '.join(off)}: no aarch64 runtime for this format yet (the phone profiles "
                                    f"run {', '.join(PHONE_RUNTIMES)})"})
        if not on_phone:
            continue
        setup = ensure(get_profile(name), quiet=quiet)
        print(f"validating {', '.join(a.name for _, a in on_phone)} under the emulated phone {name} "
              f"(scenarios: {v['phone_scenarios']}; emulated ISA and numerics, not phone speed)")
        rep = run_validation(ckpt, [a for _, a in on_phone], load_scenarios(v["phone_scenarios"]),
                             profile=Profile.for_phone(setup), scenario_set=v["phone_scenarios"], quiet=quiet,
                             speed_anchor=False, max_kl=v.get("max_kl"), imatrix=imatrix)
        print(summary_text(rep))
        runs.append({"where": name, "target": "phone", "report": rep, "parts": [p.kind for p, _ in on_phone]})
    return runs


def file_verdicts(parts: list[Part], runs: list[dict], dest: Path) -> dict[str, dict[str, str]]:
    """Per bundle file: its status in every run that checked it."""
    arts = dict((p.kind, a) for p, a in harness_artifacts(parts, dest))
    out: dict[str, dict[str, str]] = {}
    for p in parts:
        for f in p.files:
            st = out.setdefault(f, {})
            for r in runs:
                if p.kind not in r["parts"] or "skipped" in r:
                    continue
                if "coreml" in r:
                    st[r["where"]] = r["coreml"]["status"]
                    continue
                a = arts.get(p.kind)
                row = next((x for x in r["report"]["artifacts"] if a is not None and x["name"] == a.name), None)
                if row is not None:
                    st[r["where"]] = row["status"]
    return out


FILL = "Describe everything you can see in the picture, every object, colour and person, in detail. "


def probe_memory(decoder: Path, mmproj: Path | None, device, image: Path, timeout_s: float = 900.0) -> dict:
    """Load the files in llama.cpp at the device's context and batch sizes with its default context
    settings, as the apps create theirs (K/V in float16, flash attention on auto); then encode one image
    and prefill one full micro-batch of text asking for the last token's logits only, as an app does.

    llama.cpp reserves its compute buffer for a micro-batch that returns every token's logits
    (n_ubatch x n_vocab floats: 1.9 GiB for the real vocabulary at n_ubatch 2048); an app never
    touches most of it. What the work really adds is the peak RSS after it over the RSS after loading:
    the compute memory the estimate counts, beside the reservation llama.cpp logs."""
    import os
    import tempfile

    from validate.process import RuntimeFailure, RuntimeProcess

    kw = {"decoder": str(decoder), "mmproj": str(mmproj) if mmproj else None, "n_ctx": device.n_ctx,
          "n_batch": device.n_batch, "n_ubatch": device.n_ubatch, "n_threads": 4, "kv_f32": False,
          "flash_attn": None}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            with RuntimeProcess("llama.cpp", kw, deadline=time.monotonic() + timeout_s) as proc:
                loaded = proc.peak_rss_mb
                ids = proc.request("tokenize", texts=[FILL])["ids"][0]
                if mmproj:
                    proc.request("run", turns=[[{"image": str(image)}, ids[:8]]], teacher=[],
                                 out=os.path.join(tmp, "logits.npy"))
                fill = (ids * (device.n_ubatch // max(1, len(ids)) + 1))[:min(device.n_ubatch, device.n_ctx - 1)]
                proc.request("greedy", tokens=fill, n=1)
                info = proc.request("info")
                return {"buffers_mib": info["platform"].get("buffers_mib", {}), "rss_after_load_mb": round(loaded, 1),
                        "peak_rss_mb": round(proc.peak_rss_mb, 1)}
        except RuntimeFailure as e:
            raise ConvertError(f"memory probe at n_ctx {device.n_ctx}: {e}", exit_code=4) from None


def memory_check(recipe, ckpt, gguf: Part, dest: Path, *, quiet: bool) -> list[dict]:
    """Per device class: weights (the files the app loads, whole: the projector is read into memory, the
    decoder mapped and its Q4_K tensors repacked on ARM) + K/V at its context + the Gated DeltaNet
    state + the compute memory a full micro-batch touches at its batch sizes, against its budget."""
    from recipes import HERE as RECIPES

    files = [dest / f for f in gguf.files if f.endswith(".gguf") and f != "imatrix.gguf"]
    dec = next(f for f in files if not f.name.startswith("mmproj-"))
    mms = sorted((f for f in files if f.name.startswith("mmproj-")), key=lambda f: f.stem.endswith("-4x"))
    mmproj = mms[0] if mms else None  # the 16x projector when there are both: the apps' mode
    weights = sum(f.stat().st_size for f in files)
    image = sorted((RECIPES / "images").glob("*.jpg"))[0]
    rows, probes = [], {}
    for d in recipe.devices:
        key = (d.n_ctx, d.n_batch, d.n_ubatch)
        if key not in probes:
            if not quiet:
                print(f"measuring llama.cpp's buffers at n_ctx {d.n_ctx}, n_batch {d.n_batch}, n_ubatch {d.n_ubatch}")
            probes[key] = probe_memory(dec, mmproj, d, image)
        pr = probes[key]
        reserved = sum(v for k, v in pr["buffers_mib"].items() if k.endswith(" compute"))
        compute = max(0.0, pr["peak_rss_mb"] - pr["rss_after_load_mb"])  # touched by the work (MB as measured)
        est = estimate(ckpt.spec, weights, d.n_ctx, compute_bytes=int(round(compute * MIB)))
        total = est.total_bytes / MIB
        ok = total <= d.memory_budget_mb
        rows.append({"device": d.name, "budget_mb": d.memory_budget_mb, "n_ctx": d.n_ctx, "n_batch": d.n_batch,
                     "n_ubatch": d.n_ubatch, "estimate": est.as_dict(), "status": "pass" if ok else "fail",
                     "measured": {**pr, "compute_reserved_mb": round(reserved, 1)},
                     "message": f"{d.name}: estimate {total:.0f} MB (weights {est.weights_bytes / MIB:.0f} + K/V "
                                f"{est.kv_bytes / MIB:.0f} at n_ctx {d.n_ctx} + state {est.state_bytes / MIB:.0f} + "
                                f"compute {compute:.0f}; measured peak RSS {pr['peak_rss_mb']:.0f}) "
                                f"{'within' if ok else 'over'} the budget of {d.memory_budget_mb} MB"})
    return rows
