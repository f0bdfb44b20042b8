"""The two questions the harness answers for every scenario, separately.

Conversion: is the artifact what it claims to be? Compared with the fake-quant reference (the
source rounded to the artifact's own types, ggml's activation rounding emulated), a faithful file
differs only by the runtime's arithmetic (summation order, fused kernels). How far that noise
carries into the logits depends on the weights, and so does how far the types' rounding carries:
both are small perturbations through the same network, so their effects on KL scale together.
The yardstick is therefore the fake-quant reference's own KL from fp32 (what the types cost on
these weights): KL(fake-quant || artifact) must stay below `kl_ratio` times it (one ratio for
the mean, one for the p99), or below `kl_floor` where the yardstick itself is negligible (F32
files, whose conversion reference is fp32 itself).
A wrong transform, a swapped tensor or a wrong key perturbs at the scale of the weights, not of
their rounding, and lands far above. Top-1 disagreements count only where the fake-quant
reference's top-1 margin exceeds `decisive_margin` times the logit error that rounding to these
types causes at that position (the spread over the vocabulary of the fake-quant minus fp32
logits: softmax ignores a common shift), and never less than the artifact's median error: a
near-tie flipped by rounding is no evidence, a confident prediction changed is. The raw rate is
reported beside it. This question decides the exit code.

Quality: how much does the quantization cost? Against fp32: KL mean / p99, top-1 agreement, and
the cost relative to the types' own cost on these weights (KL(fp32 || artifact) over
KL(fp32 || fake-quant): 1 for a faithful file). It fails only against a budget a user or a recipe
sets (`--max-kl`, or `quality_budget` per type in the tolerances); without one it is reported.
"""

from __future__ import annotations

import numpy as np

QUALITY = "quality:"  # how the messages of the quality question start, after the scenario name


def lookup(table: dict, label: str):
    """A per-type entry: the exact type, then its family (Q4_K_M -> Q4_K), then `default`."""
    if label in table:
        return table[label]
    family = label.rsplit("_", 1)[0] if label.endswith(("_S", "_M", "_L", "_XS", "_XL")) else label
    return table.get(family, table.get("default"))


def decisive_flips(series: dict, factor: float) -> tuple[int, float]:
    """(count of top-1 disagreements where the reference's margin exceeds `factor` times the logit
    error rounding can cause there, the smallest such threshold). That error at a position is the
    fake-quant reference's own error from fp32 (`types_logit_err`, what the types' rounding does
    to the logits), and never less than the artifact's median error in the scenario (the
    runtime's arithmetic; the only measure for F32 files)."""
    err = np.asarray(series.get("logit_err", []), dtype=np.float64)
    margin = np.asarray(series.get("margin", []), dtype=np.float64)
    match = np.asarray(series.get("top1_match", []), dtype=bool)
    if not len(err):
        return 0, 0.0
    sigma = np.full(len(err), float(np.median(err)))
    if "types_logit_err" in series:
        sigma = np.maximum(sigma, np.asarray(series["types_logit_err"], dtype=np.float64))
    thr = factor * sigma
    return int(((~match) & (margin > thr)).sum()), float(thr.min())


def judge(scenario: str, artifact: str, label: str, metrics: dict, series_fq: dict | None, rules: dict,
          budget: float | None = None) -> tuple[list[str], dict]:
    """(failure messages, verdict dict) for one scenario. `metrics` holds "fp32" (artifact vs the
    fp32 reference), and unless the artifact is F32 "fake-quant" (artifact vs fake-quant) and
    "fake-quant-vs-fp32" (the yardstick); `series_fq` the per-position series against the
    conversion reference."""
    conv_rules = dict(rules["conversion"])
    own = lookup(conv_rules.get("by_type", {}), label) if conv_rules.get("by_type") else None
    if own:  # a format whose arithmetic rounds more than its weights' types (an fp16 graph's activations)
        conv_rules["kl_ratio"] = {**conv_rules["kl_ratio"], **own.get("kl_ratio", {})}
        conv_rules.update({k: own[k] for k in ("decisive_margin", "decisive_max") if k in own})
    fails: list[str] = []
    has_fq = "fake-quant" in metrics
    conv = metrics["fake-quant"] if has_fq else metrics["fp32"]
    ref_name = "fake-quant" if has_fq else "fp32"
    yard = metrics.get("fake-quant-vs-fp32", {}) if has_fq else {}
    verdict: dict = {"conversion": {"reference": ref_name}, "quality": {}}
    cv = verdict["conversion"]
    for k in ("kl_mean", "kl_p99"):
        ratio = float(conv_rules["kl_ratio"][k])
        floor = float(conv_rules["kl_floor"][k])
        limit = max(floor, ratio * float(yard.get(k, 0.0)))
        cv[k], cv[f"{k}_limit"] = conv[k], limit
        if conv[k] > limit:
            how = (f"{ratio:g} x the types' own cost {yard.get(k, 0.0):.3g}" if limit > floor
                   else f"the floor {floor:g}")
            fails.append(f"{scenario}: {k} vs {ref_name} reference = {conv[k]:.4g} (above {limit:.3g}: {how}) "
                         f"for {artifact}")
    n, thr = decisive_flips(series_fq or {}, float(conv_rules["decisive_margin"]))
    cv.update(top1_agreement=conv["top1_agreement"], decisive_flips=n, decisive_margin=thr)
    if n > int(conv_rules.get("decisive_max", 0)):
        fails.append(f"{scenario}: top1 vs {ref_name} reference changed at {n} confident position(s) (margin above "
                     f"{conv_rules['decisive_margin']:g} x the logit error rounding causes there; raw agreement "
                     f"{conv['top1_agreement']:.4g}) for {artifact}")
    q = metrics["fp32"]
    qv = verdict["quality"]
    qv.update(kl_mean=q["kl_mean"], kl_p99=q["kl_p99"], top1_agreement=q["top1_agreement"])
    if has_fq:
        qv["types_kl_mean"] = yard.get("kl_mean")
        qv["excess"] = q["kl_mean"] / yard["kl_mean"] if yard.get("kl_mean") else None
    if budget is not None:
        qv["budget_kl_mean"] = budget
        if q["kl_mean"] > budget:
            fails.append(f"{scenario}: {QUALITY} kl_mean vs fp32 reference = {q['kl_mean']:.4g} (above the budget "
                         f"{budget:g}) for {artifact}")
    return fails, verdict


def summarize(row: dict) -> dict:
    """An artifact's two answers over its scenarios: conversion pass / fail (static checks and
    every non-quality failure) and the quality figures (worst scenario) with the budget's verdict."""
    scen = [sc for sc in row.get("scenarios", []) if isinstance(sc, dict)]
    conv_fail = any(c.get("status") == "fail" for c in row.get("checks", []) if c.get("check") != "memory")
    conv_fail |= any(not f.split(": ", 1)[-1].startswith(QUALITY) for sc in scen for f in sc.get("failures", []))
    conversion = row["status"] if row.get("status") in ("crashed", "timeout") else "fail" if conv_fail else "pass"
    qs = [sc["verdict"]["quality"] for sc in scen if "verdict" in sc]
    quality: dict = {}
    if qs:
        quality = {"kl_mean": max(q["kl_mean"] for q in qs), "kl_p99": max(q["kl_p99"] for q in qs),
                   "top1_agreement": min(q["top1_agreement"] for q in qs)}
        ex = [q["excess"] for q in qs if q.get("excess") is not None]
        if ex:
            quality["excess"] = max(ex)
        budget = next((q["budget_kl_mean"] for q in qs if "budget_kl_mean" in q), None)
        quality["budget_kl_mean"] = budget
        quality["status"] = ("not judged (no budget)" if budget is None else
                             "over budget" if quality["kl_mean"] > budget else "within budget")
    return {"conversion": conversion, "quality": quality}
