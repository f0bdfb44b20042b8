"""Readable outputs of the validation harness: a console summary for CI logs and one self-contained HTML file.

Both read the report dict the harness writes as JSON. Only ``report["status"]``, ``report["artifacts"]``,
each artifact's ``name`` and ``status`` and each scenario's ``scenario`` and ``status`` are required; everything
else may be missing (a crashed artifact has no or only some scenarios, a skipped scenario has no metrics, the
per-position series may be absent) and is then left out or shown as "-".

* :func:`summary_text` - plain text, aligned columns, every line under 120 characters, ending with one
  verdict line (:func:`verdict_line`).
* :func:`render_html` / :func:`write_html` - inline CSS, plots as base64 PNG, no scripts, no external
  resources; the same report always gives the same bytes (PNG metadata carries no software version or date).

Scenario rows: the table has one row per artifact x scenario, over the union of the scenario names of all
artifacts (in order of first appearance). A scenario missing from a crashed or timed-out artifact counts
as a failed row with the artifact's status; missing from any other artifact it is shown as "not-run".

``python -m validate.report REPORT.json [--html OUT.html]`` prints the summary (and writes the HTML).
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import os
import sys
import tempfile
import textwrap
from collections import Counter
from pathlib import Path

from .report_phone import phone_header, phone_html, phone_text

__all__ = ["summary_text", "verdict_line", "render_html", "write_html", "main"]

WIDTH = 119  # every summary line is shorter than 120 characters
FAILED = ("fail", "crashed", "timeout")
# severity order, worst first; used to colour a cell holding several statuses (static checks)
SEVERITY = ("crashed", "timeout", "fail", "not-run", "known-difference", "skipped", "pass")
METRIC_KEYS = ("kl_mean", "kl_p99", "kl_max", "top1_agreement", "rel_err", "max_abs_err", "cosine")
METRIC_LABELS = {"kl_mean": "KL mean", "kl_p99": "KL p99", "kl_max": "KL max", "top1_agreement": "top-1 agree",
                 "rel_err": "rel err", "max_abs_err": "max |err|", "cosine": "cosine"}
REFERENCES = ("fp32", "fake-quant")
SPEED_KEYS = (("prefill_tok_s", "prefill tok/s"), ("decode_tok_s", "decode tok/s"), ("image_encode_s", "image encode s"))


# ----------------------------------------------------------------------------------------------- helpers

def _st(status) -> str:
    """Normalised status: lower case, '-' separated ('Known_Difference' -> 'known-difference')."""
    if status is None or status == "":
        return "unknown"
    return str(status).strip().lower().replace("_", "-").replace(" ", "-")


def _worst(statuses) -> str:
    statuses = [_st(s) for s in statuses]
    for s in SEVERITY:
        if s in statuses:
            return s
    return statuses[0] if statuses else "unknown"


def _f(x) -> float | None:
    if isinstance(x, bool) or x is None:
        return None
    if isinstance(x, (int, float)):
        return float(x)
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _num(x) -> str:
    """Compact number: 0.0031, 3.1e-05, 12.35, 900.0, 12345."""
    v = _f(x)
    if v is None:
        return "-" if x is None else str(x)
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if v == 0:
        return "0"
    a = abs(v)
    if a < 1e-3 or a >= 1e6:
        return f"{v:.1e}"
    if a < 10:
        return f"{v:.4f}"
    if a < 1000:
        return f"{v:.1f}"
    return f"{v:.0f}"


def _pct(x) -> str:
    v = _f(x)
    if v is None:
        return "-" if x is None else str(x)
    if math.isnan(v):
        return "nan"
    if v == 1:
        return "100%"
    return f"{v * 100:.1f}%"


def _cos(x, digits: int = 5) -> str:
    v = _f(x)
    if v is None:
        return "-" if x is None else str(x)
    return f"{v:.{digits}f}"


def _ratio(x) -> str:
    v = _f(x)
    if v is None:
        return "-" if x is None else str(x)
    return f"{v:.2f}x"


def _size(n) -> str:
    v = _f(n)
    if v is None:
        return "-" if n is None else str(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(v) < 1024 or unit == "GiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return f"{v:.1f} GiB"  # pragma: no cover


def _dict(x) -> dict:
    return x if isinstance(x, dict) else {}


def _list(x) -> list:
    return x if isinstance(x, list) else []


def _msgs(x) -> list[str]:
    """A list of messages; a lone string counts as one."""
    if isinstance(x, str):
        return [x] if x else []
    return [str(m) for m in _list(x) if m is not None]


def _shorten(s: str, n: int) -> str:
    """Middle-truncate to n characters (keeps the quant suffix of artifact names visible)."""
    s = str(s)
    if len(s) <= n:
        return s
    if n <= 3:
        return s[:n]
    head = (n - 1) // 2
    return s[:head] + "~" + s[len(s) - (n - 1 - head):]


def _wrap(text: str, first: str = "", rest: str | None = None) -> list[str]:
    rest = " " * len(first) if rest is None else rest
    out = []
    for i, line in enumerate(str(text).splitlines() or [""]):
        out += textwrap.wrap(line, WIDTH, initial_indent=first if i == 0 else rest, subsequent_indent=rest,
                             break_on_hyphens=False) or [first if i == 0 else rest]
    return [o.rstrip() for o in out]


def _table(headers: list[str], rows: list[list[str]], right: set[int], shrink: list[int], min_w: int = 8) -> list[str]:
    """Aligned text table; columns listed in `shrink` are middle-truncated until the table fits WIDTH."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    sep = 2
    while sum(widths) + sep * (len(widths) - 1) > WIDTH:
        cands = [i for i in shrink if widths[i] > min_w]
        if not cands:
            break
        i = max(cands, key=lambda j: widths[j])
        widths[i] -= 1

    def line(cells):
        parts = []
        for i, c in enumerate(cells):
            c = _shorten(c, widths[i])
            parts.append(c.rjust(widths[i]) if i in right else c.ljust(widths[i]))
        return (" " * sep).join(parts).rstrip()

    return [line(headers)] + [line(r) for r in rows]


# ------------------------------------------------------------------------------------------ report model

def _artifacts(report: dict) -> list[dict]:
    return [a for a in _list(_dict(report).get("artifacts")) if isinstance(a, dict)]


def _scenarios(artifact: dict) -> list[dict]:
    return [s for s in _list(artifact.get("scenarios")) if isinstance(s, dict)]


def _scenario_names(report: dict) -> list[str]:
    names: list[str] = []
    for a in _artifacts(report):
        for s in _scenarios(a):
            n = str(s.get("scenario", "?"))
            if n not in names:
                names.append(n)
    return names


def _rows(report: dict) -> list[tuple[int, dict, str, dict | None, str]]:
    """(artifact index, artifact, scenario name, scenario dict or None when missing, effective status)."""
    names = _scenario_names(report)
    rows = []
    for ai, a in enumerate(_artifacts(report)):
        a_st = _st(a.get("status"))
        by_name = {}
        for s in _scenarios(a):
            by_name.setdefault(str(s.get("scenario", "?")), s)
        missing_st = a_st if a_st in ("crashed", "timeout") else "not-run"
        for n in names or ["-"]:
            s = by_name.get(n)
            rows.append((ai, a, n, s, _st(s.get("status")) if s is not None else missing_st))
    return rows


def _metrics(sc: dict | None) -> dict[str, dict]:
    """References in display order: fp32, fake-quant, then any others."""
    m = _dict(_dict(sc).get("metrics"))
    order = [r for r in REFERENCES if isinstance(m.get(r), dict)] + \
            [r for r in m if r not in REFERENCES and isinstance(m.get(r), dict)]
    return {r: m[r] for r in order}


def _primary(sc: dict | None) -> dict:
    m = _metrics(sc)
    return m.get("fp32") or next(iter(m.values()), {})


def _images(sc: dict | None) -> list[dict]:
    return [i for i in _list(_dict(sc).get("images")) if isinstance(i, dict)]


def _min_cos(sc: dict | None) -> float | None:
    vals = [v for v in (_f(i.get("cosine")) for i in _images(sc)) if v is not None]
    return min(vals) if vals else None


def _first_divergence(g: dict) -> int | None:
    if "first_divergence" in g:
        v = g.get("first_divergence")
        return int(v) if _f(v) is not None else None
    ref, art = _list(g.get("reference")), _list(g.get("artifact"))
    for i, (r, a) in enumerate(zip(ref, art)):
        if r != a:
            return i
    return None if len(ref) == len(art) else min(len(ref), len(art))


def _greedy_short(sc: dict | None) -> str:
    g = _dict(_dict(sc).get("greedy"))
    if not g:
        return "-"
    steps = _f(g.get("steps"))
    steps = int(steps) if steps is not None else max(len(_list(g.get("reference"))), len(_list(g.get("artifact"))))
    fd = _first_divergence(g)
    return f"{steps if fd is None else fd}/{steps}"


def _key_figure(sc: dict | None) -> str:
    """The figure shown in a summary cell, e.g. 'KL 0.0031 / top1 99.4% / cos 0.99990'."""
    m = _primary(sc)
    parts = []
    if m.get("kl_mean") is not None:
        parts.append(f"KL {_num(m['kl_mean'])}")
    if m.get("top1_agreement") is not None:
        parts.append(f"top1 {_pct(m['top1_agreement'])}")
    if not parts and m.get("cosine") is not None:
        parts.append(f"cos {_cos(m['cosine'])}")
    c = _min_cos(sc)
    if c is not None:
        parts.append(f"img cos {_cos(c, 4)}")
    if not parts and _dict(_dict(sc).get("greedy")):
        parts.append(f"greedy {_greedy_short(sc)}")
    return " / ".join(parts)


def _budget(report: dict) -> float | None:
    return _f(_dict(_dict(report).get("profile")).get("memory_budget_mb"))


def _error(a: dict) -> str | None:
    """The artifact's error message without a leading 'artifact-name: ' (the harness adds one)."""
    err = a.get("error")
    if err is None or err == "":
        return None
    err, prefix = str(err), f"{a.get('name')}: "
    return err[len(prefix):] if err.startswith(prefix) and len(err) > len(prefix) else err


def _failed_checks(a: dict) -> list[dict]:
    return [c for c in _list(a.get("checks")) if isinstance(c, dict) and _st(c.get("status")) in FAILED]


# ------------------------------------------------------------------------------------------------ text

def verdict_line(report: dict) -> str:
    """One line, e.g. 'validation FAILED (exit 3): 2 of 14 scenario rows failed (A: image; B: crashed)'."""
    rows = _rows(report)
    arts = _artifacts(report)
    failed = [r for r in rows if r[4] in FAILED]
    ok = _st(_dict(report).get("status")) == "pass"
    code = _dict(report).get("exit_code")
    if ok:
        counts = Counter(r[4] for r in rows)
        order = [s for s in SEVERITY[::-1] if s in counts] + sorted(s for s in counts if s not in SEVERITY)
        line = (f"validation passed: {len(rows)} scenario row{'s' * (len(rows) != 1)} across {len(arts)} "
                f"artifact{'s' * (len(arts) != 1)} (" + ", ".join(f"{counts[s]} {s}" for s in order) + ")")
        n_chk = sum(len(_failed_checks(a)) for a in arts)
        if failed or n_chk:
            line += f" [but the report lists {len(failed)} failed rows, {n_chk} failed checks]"
        return _shorten(line, WIDTH) if len(line) > WIDTH else line

    head = "validation FAILED" + (f" (exit {code})" if code is not None else "")
    if not arts:
        return f"{head}: the report lists no artifacts"
    n_chk = sum(len(_failed_checks(a)) for a in arts)
    if n_chk and failed:
        body = f"{len(failed)} of {len(rows)} scenario rows and {n_chk} static check{'s' * (n_chk != 1)} failed"
    else:
        body = f"{len(failed)} of {len(rows)} scenario row{'s' * (len(rows) != 1)} failed"
        if n_chk:
            body += f", {n_chk} static check{'s' * (n_chk != 1)} failed"
    items = []
    for ai, a in enumerate(arts):
        a_st = _st(a.get("status"))
        what = [r[2] for r in failed if r[0] == ai and r[3] is not None]
        what += [f"check {c.get('check', '?')}" for c in _failed_checks(a)]
        # a crash or timeout accounts for the rows it never reached; say it once, first
        if a_st in ("crashed", "timeout") or (a_st in FAILED and not what):
            what.insert(0, a_st)
        if what:
            items.append((str(a.get("name", f"artifact {ai}")), what))
    prefix = f"{head}: {body}"
    if not items:
        return prefix

    def fit(names: list[str]) -> str:
        out = prefix + " ("
        for i, (name, (_, what)) in enumerate(zip(names, items)):
            more = len(items) - i - 1
            tail = ")" if not more else f"; +{more} more)"
            sep = "; " if i else ""
            t = f"{name}: {', '.join(what)}"
            if len(out + sep + t + tail) > WIDTH:
                if i:
                    return out + sep + f"+{len(items) - i} more)"
                for k in range(len(what) - 1, 0, -1):  # first item: drop its last entries
                    t = f"{name}: {', '.join(what[:k])}, +{len(what) - k}"
                    if len(out + t + tail) <= WIDTH:
                        break
                if len(out + t + tail) > WIDTH:
                    t = _shorten(t, max(8, WIDTH - len(out) - len(tail)))
            out += sep + t
        return out + ")"

    names = [n for n, _ in items]
    line = fit(names)
    if len(line) > WIDTH or "more)" in line or "~" in line or ", +" in line:
        # artifacts usually share the model's name: show them as glob patterns over their distinct tails
        all_names = [str(a.get("name", "")) for a in arts]
        common = os.path.commonprefix(all_names) if len(all_names) > 1 else ""
        cut = max(common.rfind(c) for c in "-_. ") if common else -1
        if cut > 3 and all(len(n) > cut + 1 for n in all_names):
            short = fit(["*" + n[cut:] for n in names])
            if len(short) <= WIDTH:
                line = short
    return line


def _verdict_text(v: dict) -> str:
    """'conversion pass; quality: KL 0.057 vs fp32 (1.02x what its types cost), top-1 87.4%, not judged (no budget)'."""
    q = _dict(v.get("quality"))
    out = f"conversion {_st(v.get('conversion'))}"
    if q:
        out += f"; quality: KL {_num(q.get('kl_mean'))} vs fp32"
        if _f(q.get("excess")) is not None:
            out += f" ({float(q['excess']):.2f}x what its types cost)"
        out += f", top-1 {_pct(q.get('top1_agreement'))}, {q.get('status', '-')}"
        if _f(q.get("budget_kl_mean")) is not None:
            out += f" {_num(q['budget_kl_mean'])}"
    return out


def summary_text(report: dict) -> str:
    """Console summary for CI logs: header, artifact table, scenario table, failures, notes, verdict line."""
    report = _dict(report)
    lines: list[str] = []
    model = _dict(report.get("model"))
    prof = _dict(report.get("profile"))
    title = " ".join(str(x) for x in (report.get("tool", "minicpmv-edge"), report.get("version")) if x) + " validation"
    if model:
        title += f": {model.get('name') or model.get('path')}"
        if model.get("name") and model.get("path"):
            title += f" ({model['path']})"
    lines += _wrap(title)
    facts = []
    if report.get("scenario_set"):
        facts.append(f"scenario set {report['scenario_set']}")
    for key, label, unit in (("threads", "threads", ""), ("n_ctx", "n_ctx", ""), ("memory_budget_mb", "memory budget", " MB"),
                             ("timeout_s", "timeout", " s")):
        if prof.get(key) is not None:
            facts.append(f"{label} {prof[key]}{unit}")
    if report.get("wall_s") is not None:
        facts.append(f"wall {float(report['wall_s']):.1f} s")
    if facts:
        lines += _wrap(" | ".join(facts))
    for ln in phone_header(report):
        lines += _wrap(ln)

    arts = _artifacts(report)
    budget = _budget(report)
    if arts:
        rows = []
        for a in arts:
            rss = _f(a.get("peak_rss_mb"))
            rss_s = "-" if rss is None else f"{rss:.0f}" + (f"/{budget:.0f}" if budget else "")
            if rss is not None and budget and rss > budget:
                rss_s += "!"
            r16 = _dict(_dict(a.get("speed")).get("ratio_f16"))
            rows.append([str(a.get("name", "?")), _st(a.get("status")), str(a.get("quant") or "-"),
                         _size(a.get("size_bytes")), _ratio(a.get("size_ratio_f16")), rss_s,
                         _ratio(r16.get("prefill_tok_s")), _ratio(r16.get("decode_tok_s")),
                         _ratio(r16.get("image_encode_s")),
                         "-" if a.get("wall_s") is None else f"{float(a['wall_s']):.1f}s"])
        lines.append("")
        lines += _table(["artifact", "status", "quant", "size", "/F16", "RSS MB", "prefill", "decode", "img enc", "wall"],
                        rows, right={3, 4, 5, 6, 7, 8, 9}, shrink=[0])
        lines.append("  (ratios are artifact / F16: size; prefill, decode tok/s (>1 faster); img enc s (<1 faster);"
                     " RSS: peak/budget)")
        verdicts = [(a, _dict(a.get("verdict"))) for a in arts if _dict(a.get("verdict"))]
        if verdicts:
            lines.append("")
            for a, v in verdicts:
                lines += _wrap(f"{a.get('name', '?')}: {_verdict_text(v)}", "  ", "      ")

    srows = []
    for ai, a, name, sc, st in _rows(report):
        m = _metrics(sc)
        fp, fq = m.get("fp32", {}), m.get("fake-quant", {})
        c = _min_cos(sc)
        srows.append([str(a.get("name", "?")), name, st, _num(fp.get("kl_mean")), _num(fp.get("kl_p99")),
                      _num(fq.get("kl_mean")), _pct(fp.get("top1_agreement")), _greedy_short(sc),
                      "-" if c is None else _cos(c)])
    if srows:
        lines.append("")
        lines += _table(["artifact", "scenario", "status", "KL fp32", "p99 fp32", "KL fq", "top1", "greedy", "img cos"],
                        srows, right={3, 4, 5, 6, 7, 8}, shrink=[0, 1])
        lines.append("  (KL: mean per-position KL vs the fp32 / fake-quant (fq) reference; top1: agreement with fp32;"
                     " greedy: same prefix)")
    lines += phone_text(report, _table, _wrap)

    failures: list[str] = []
    notes: list[str] = []
    for ai, a in enumerate(arts):
        name = str(a.get("name", f"artifact {ai}"))
        a_st = _st(a.get("status"))
        if _error(a) or a_st in ("crashed", "timeout"):
            failures += _wrap(f"{name}: {a_st}: {_error(a) or '(no message)'}", "  - ", "      ")
        for c in _list(a.get("checks")):
            if not isinstance(c, dict):
                continue
            c_st = _st(c.get("status"))
            msg = f"{name}: check {c.get('check', '?')} {c_st}" + (f": {c['message']}" if c.get("message") else "")
            if c_st in FAILED:
                failures += _wrap(msg, "  - ", "      ")
                details = _msgs(c.get("details"))
                for d in details[:8]:
                    failures += _wrap(d, "      * ", "        ")
                if len(details) > 8:
                    failures.append(f"      * ... {len(details) - 8} more")
            elif c_st not in ("pass",):
                notes += _wrap(msg, "  - ", "      ")
        for sc in _scenarios(a):
            s_name, s_st = str(sc.get("scenario", "?")), _st(sc.get("status"))
            msgs = _msgs(sc.get("failures"))
            if s_st in FAILED and not msgs:
                msgs = [f"{s_st} (no message)"]
            for f in msgs:
                failures += _wrap(f"{name} / {s_name}: {f}", "  - ", "      ")
            if s_st not in FAILED and s_st != "pass":
                notes += _wrap(f"{name} / {s_name}: {s_st}" + (f": {sc['reason']}" if sc.get("reason") else ""),
                               "  - ", "      ")
    if failures:
        lines += ["", "failures:"] + failures
    if notes:
        lines += ["", "notes:"] + notes
    lines += ["", verdict_line(report)]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ plots

def _series(v) -> "list[float] | None":
    if not isinstance(v, list) or not v:
        return None
    out = []
    for x in v:
        f = _f(x)
        out.append(float("nan") if f is None else f)
    return out


def _figure_png(artifact: dict) -> tuple[bytes | None, list[str]]:
    """Two stacked panels over all scenarios' positions; returns (PNG bytes or None, scenarios without series)."""
    segs, without = [], []
    for sc in _scenarios(artifact):
        s = _dict(sc.get("series"))
        kl, margin, match = _series(s.get("kl")), _series(s.get("margin")), _series(s.get("top1_match"))
        n = max(len(kl or []), len(margin or []), len(match or []))
        name = str(sc.get("scenario", "?"))
        if n == 0:
            if _st(sc.get("status")) != "skipped":
                without.append(name)
            continue
        segs.append((name, _st(sc.get("status")), kl, margin, match, n))
    if not segs:
        return None, without

    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 5.6), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    shade = {"pass": "#2e7d32", "fail": "#c62828", "known-difference": "#ef8f00", "skipped": "#9e9e9e"}
    have_margin = any(sg[3] is not None for sg in segs)
    any_kl = False
    pos = [v for sg in segs if sg[2] is not None for v in sg[2] if v > 0 and math.isfinite(v)]
    floor = max(min(pos) / 10, 1e-12) if pos else 1e-9  # zeros (exact agreement) are drawn at the axis floor
    mism_label = "artifact's top-1 differs"
    x0, centers, names = 0, [], []
    for i, (name, st, kl, margin, match, n) in enumerate(segs):
        color = shade.get(st, "#b71c1c")
        for ax in (ax1, ax2):
            ax.axvspan(x0 - 0.5, x0 + n - 0.5, color=color, alpha=0.07, lw=0)
            if i:
                ax.axvline(x0 - 0.5, color="#555555", lw=0.8, ls="--")
        if kl is not None:
            y = np.asarray(kl, dtype=np.float64)
            y = np.where(np.isfinite(y), np.clip(y, floor, None), np.nan)
            ax1.plot(np.arange(len(y)) + x0, y, color="#1f4e9a", lw=0.8)
            any_kl = any_kl or bool(np.isfinite(y).any())
        mm = np.asarray(match, dtype=np.float64) if match is not None else None
        if margin is not None:
            y = np.asarray(margin, dtype=np.float64)
            ax2.plot(np.arange(len(y)) + x0, y, color="#2e7d32", lw=0.8)
            if mm is not None:
                k = min(len(mm), len(y))
                idx = np.nonzero(mm[:k] == 0)[0]
                if len(idx):
                    ax2.scatter(idx + x0, y[idx], marker="x", color="#c62828", s=14, lw=0.9, zorder=3, label=mism_label)
                    mism_label = None
        elif mm is not None:
            if have_margin:  # other scenarios have margins: mark mismatches on the zero line
                idx = np.nonzero(mm == 0)[0]
                if len(idx):
                    ax2.scatter(idx + x0, np.zeros(len(idx)), marker="x", color="#c62828", s=14, lw=0.9, zorder=3,
                                label=mism_label)
                    mism_label = None
            else:
                ax2.step(np.arange(len(mm)) + x0, mm, where="mid", color="#2e7d32", lw=0.8)
        centers.append(x0 + (n - 1) / 2)
        names.append(f"{name}\n({st})")
        x0 += n
    ax1.set_title(str(artifact.get("name", "?")) + ": per-position agreement with the fp32 reference", fontsize=10,
                  parse_math=False)
    if any_kl:
        ax1.set_yscale("log")
        ax1.set_ylabel("KL(fp32 || artifact), nats", fontsize=9)
    else:
        ax1.set_ylabel("KL (no series)", fontsize=9)
    if have_margin:
        ax2.axhline(0, color="#999999", lw=0.6)
        ax2.set_ylabel("fp32 top-1 margin (logits)", fontsize=9)
    else:
        ax2.set_ylim(-0.1, 1.1)
        ax2.set_ylabel("top-1 match (1 = same)", fontsize=9)
    if mism_label is None:
        ax2.legend(loc="upper right", fontsize=8, framealpha=0.8)
    rotate = len(segs) > 3 or max(len(sg[0]) for sg in segs) > 16
    ax2.set_xticks(centers, names, rotation=25 if rotate else 0, ha="right" if rotate else "center", fontsize=8,
                   parse_math=False)
    ax2.set_xlim(-0.5, x0 - 0.5)
    for ax in (ax1, ax2):
        ax.tick_params(labelsize=8)
        ax.grid(True, axis="y", alpha=0.3, lw=0.5)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue(), without


# ------------------------------------------------------------------------------------------------- HTML

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5em 2em;color:#1d1d1d}
h1{font-size:1.5em;margin:.2em 0}h2{font-size:1.25em;margin:1.8em 0 .4em;border-bottom:2px solid #ddd}
h3{font-size:1.05em;margin:1.2em 0 .3em}h4{font-size:1em;margin:1.2em 0 .3em}
table{border-collapse:collapse;margin:.4em 0 .8em}td,th{border:1px solid #ccc;padding:3px 7px;vertical-align:top}
th{background:#f2f2f2;text-align:left;font-weight:600}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
code,.mono,pre{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.92em}
pre{white-space:pre-wrap;word-break:break-word;margin:.2em 0;background:#f7f7f7;padding:4px 6px}
a{color:inherit}.muted{color:#666}.small{font-size:.85em}
.badge{display:inline-block;padding:0 .5em;border-radius:3px;font-weight:600;font-size:.85em;vertical-align:middle}
.st-pass{background:#d7f0db;color:#14532d}.st-fail{background:#f9d0d3;color:#8b0012}
.st-known-difference{background:#ffe3a8;color:#6b4500}.st-skipped,.st-not-run,.st-unknown{background:#e6e6e6;color:#4a4a4a}
.st-crashed,.st-timeout{background:#6d0a17;color:#fff}
td.cell{min-width:9em}td.cell a{text-decoration:none;display:block}td.cell .fig{font-size:.85em;font-weight:400}
.verdict{font-size:1.1em;font-weight:600;padding:.5em .8em;margin:.8em 0;border-radius:4px}
ul.fail{color:#8b0012;margin:.2em 0}ul.fail li{margin:.1em 0}
.tok{display:inline-block;min-width:2.2em;padding:0 2px;margin:1px;border:1px solid #ddd;text-align:right}
.tok.div{background:#f9d0d3;border-color:#c62828}.bad{background:#f9d0d3}
img.plot{max-width:100%;border:1px solid #ddd}
""".strip()


def _e(x) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _badge(status) -> str:
    s = _st(status)
    return f'<span class="badge st-{_e(s)}">{_e(s)}</span>'


def _kv_table(pairs: list[tuple[str, str]]) -> str:
    """pairs of (escaped label, already-escaped HTML value)."""
    if not pairs:
        return ""
    return '<table class="kv">' + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in pairs) + "</table>"


def _files_html(files) -> str:
    if files is None:
        return ""
    if not isinstance(files, dict):
        return f"<code>{_e(files)}</code>"
    items = []

    def walk(prefix, v):
        if isinstance(v, dict):
            for k, sub in v.items():
                walk(f"{prefix} {k}".strip(), sub)
        elif isinstance(v, list):
            for i, sub in enumerate(v):
                walk(f"{prefix} [{i}]", sub)
        else:
            items.append(f"<li>{_e(prefix)}: <code>{_e(v)}</code></li>")

    walk("", files)
    return "<ul style='margin:0;padding-left:1.2em'>" + "".join(items) + "</ul>" if items else ""


def _metric_cell(key: str, v) -> str:
    if key == "top1_agreement":
        return _pct(v)
    if key == "cosine":
        return _cos(v, 6)
    return _num(v)


def _scenario_html(ai: int, si: int, sc: dict) -> str:
    out = [f'<div class="scenario" id="a{ai}-s{si}">',
           f"<h4>{_e(sc.get('scenario', '?'))} {_badge(sc.get('status'))}"]
    meta = []
    if sc.get("kind"):
        meta.append(f"kind {_e(sc['kind'])}")
    if sc.get("positions") is not None:
        meta.append(f"{_e(sc['positions'])} positions")
    if meta:
        out.append(f' <span class="muted small">{", ".join(meta)}</span>')
    out.append("</h4>")
    if sc.get("reason"):
        out.append(f"<p><b>reason:</b> {_e(sc['reason'])}</p>")
    fails = _msgs(sc.get("failures"))
    if fails:
        out.append('<ul class="fail">' + "".join(f"<li>{_e(f)}</li>" for f in fails) + "</ul>")

    m = _metrics(sc)
    if m:
        keys = [k for k in METRIC_KEYS if any(k in v for v in m.values())]
        keys += [k for v in m.values() for k in v if k not in METRIC_KEYS]
        keys = list(dict.fromkeys(keys))
        out.append("<table><tr><th>reference</th>" +
                   "".join(f'<th class="num">{_e(METRIC_LABELS.get(k, k))}</th>' for k in keys) + "</tr>")
        for ref, vals in m.items():
            out.append(f"<tr><th>{_e(ref)}</th>" +
                       "".join(f'<td class="num">{_e(_metric_cell(k, vals.get(k)))}</td>' for k in keys) + "</tr>")
        out.append("</table>")

    g = _dict(sc.get("greedy"))
    if g:
        fd = _first_divergence(g)
        steps = g.get("steps")
        desc = f"greedy decoding, {_e(steps)} steps: " if steps is not None else "greedy decoding: "
        desc += "identical tokens" if fd is None else f"first divergence at step {_e(fd)}"
        out.append(f"<p>{desc}</p><table>")
        for side in ("reference", "artifact"):
            toks = _list(g.get(side))
            spans = "".join(f'<span class="tok{" div" if fd is not None and i >= fd else ""}">{_e(t)}</span>'
                            for i, t in enumerate(toks))
            text = g.get(f"{side}_text")
            out.append(f"<tr><th>{side}</th><td class='mono'>{spans or '-'}"
                       + (f"<pre>{_e(text)}</pre>" if text is not None else "") + "</td></tr>")
        out.append("</table>")

    imgs = _images(sc)
    if imgs:
        cols = [("image", "image"), ("chunk", "chunk"), ("role", "role"), ("tokens_reference", "tokens ref"),
                ("tokens_artifact", "tokens art"), ("cosine", "cosine"), ("rel_err", "rel err"), ("pixels", "pixels")]
        extra = list(dict.fromkeys(k for i in imgs for k in i if k not in dict(cols)))
        out.append("<table><tr>" + "".join(f"<th>{_e(lbl)}</th>" for _, lbl in cols) +
                   "".join(f"<th>{_e(k)}</th>" for k in extra) + "</tr>")
        for im in imgs:
            mismatch = im.get("tokens_reference") is not None and im.get("tokens_artifact") is not None and \
                im.get("tokens_reference") != im.get("tokens_artifact")
            cells = []
            for k, _ in cols:
                v = im.get(k)
                txt = _cos(v, 6) if k == "cosine" else _num(v) if k == "rel_err" else ("-" if v is None else str(v))
                cls = ("" if k in ("role", "pixels") else "num") + (" bad" if mismatch and k.startswith("tokens_") else "")
                cells.append(f'<td class="{cls.strip()}">{_e(txt)}</td>' if cls.strip() else f"<td>{_e(txt)}</td>")
            cells += [f"<td>{_e(im.get(k, '-'))}</td>" for k in extra]
            out.append("<tr>" + "".join(cells) + "</tr>")
        out.append("</table>")

    lay = _dict(sc.get("layout"))
    if lay:
        ref, art = _dict(lay.get("reference")), _dict(lay.get("artifact"))
        out.append("<table><tr><th>slice layout</th><th>grid</th><th>tokens per chunk</th></tr>")
        for side in [k for k in ("reference", "artifact") if k in lay] + [k for k in lay if k not in ("reference", "artifact")]:
            d = _dict(lay.get(side))
            other = art if side == "reference" else ref
            bad = ' class="bad"' if ref and art and (ref.get("grid") != art.get("grid") or ref.get("tokens") != art.get("tokens")) \
                and d is not other else ""
            grid = d.get("grid")
            grid_s = "x".join(str(v) for v in grid) if isinstance(grid, list) else ("-" if grid is None else str(grid))
            toks = d.get("tokens")
            toks_s = ", ".join(str(v) for v in toks) if isinstance(toks, list) else ("-" if toks is None else str(toks))
            out.append(f"<tr{bad}><th>{_e(side)}</th><td class='mono'>{_e(grid_s)}</td><td class='mono'>{_e(toks_s)}</td></tr>")
        out.append("</table>")

    sp = _dict(sc.get("speed"))
    if sp:
        parts = [f"{_e(lbl)} {_e(_num(sp[k]))}" for k, lbl in SPEED_KEYS if sp.get(k) is not None]
        parts += [f"{_e(k)} {_e(_num(v))}" for k, v in sp.items() if k not in dict(SPEED_KEYS) and not isinstance(v, dict)]
        if parts:
            out.append(f"<p class='small'>speed: {', '.join(parts)}</p>")
    out.append("</div>")
    return "\n".join(out)


def _artifact_html(report: dict, ai: int, a: dict, names: list[str]) -> str:
    out = [f'<section class="artifact" id="a{ai}">', f"<h2>{_e(a.get('name', '?'))} {_badge(a.get('status'))}</h2>"]
    if _error(a):
        out.append(f"<p><b>error:</b></p><pre class='st-fail'>{_e(_error(a))}</pre>")
    pairs = []
    if a.get("runtime"):
        pairs.append(("runtime", _e(a["runtime"])))
    if a.get("files") is not None:
        pairs.append(("files", _files_html(a["files"])))
    if a.get("quant"):
        pairs.append(("quant", _e(a["quant"])))
    if _dict(a.get("verdict")):
        pairs.append(("verdict", _e(_verdict_text(_dict(a["verdict"])))))
    if a.get("size_bytes") is not None or a.get("size_ratio_f16") is not None:
        s = _e(_size(a.get("size_bytes")))
        if _f(a.get("size_bytes")) is not None:
            s += f' <span class="muted">({_e(int(_f(a["size_bytes"])))} bytes)</span>'
        if a.get("size_ratio_f16") is not None:
            s += f"; {_e(_ratio(a['size_ratio_f16']))} of F16"
        pairs.append(("size", s))
    budget = _budget(report)
    rss = _f(a.get("peak_rss_mb"))
    if rss is not None:
        s = f"{rss:.1f} MB"
        if budget:
            over = rss > budget
            s = f"{s} of {budget:.0f} MB budget ({rss / budget * 100:.0f}%{', over budget' if over else ''})"
            s = f'<span class="badge st-fail">{_e(s)}</span>' if over else _e(s)
        else:
            s = _e(s)
        pairs.append(("peak RSS", s))
    if a.get("wall_s") is not None:
        pairs.append(("wall time", f"{_e(_num(a['wall_s']))} s"))
    sp = _dict(a.get("speed"))
    if sp:
        r16 = _dict(sp.get("ratio_f16"))
        keys = [k for k, _ in SPEED_KEYS if k in sp or k in r16] + \
               [k for k in sp if k not in dict(SPEED_KEYS) and k != "ratio_f16"]
        rows = "".join(f"<tr><th>{_e(dict(SPEED_KEYS).get(k, k))}</th><td class='num'>{_e(_num(sp.get(k)))}</td>"
                       f"<td class='num'>{_e(_ratio(r16.get(k)))}</td></tr>" for k in keys)
        pairs.append(("speed", "<table style='margin:0'><tr><th></th><th class='num'>value</th>"
                               f"<th class='num'>vs F16</th></tr>{rows}</table><span class='small muted'>ratios are "
                               "artifact / F16: for tok/s above 1 is faster, for seconds below 1 is faster</span>"))
    out.append(_kv_table(pairs))
    out.append(phone_html(report, a))

    checks = [c for c in _list(a.get("checks")) if isinstance(c, dict)]
    if checks:
        out.append("<h3>Static checks</h3><table><tr><th>check</th><th>status</th><th>message</th></tr>")
        for c in checks:
            det = _msgs(c.get("details"))
            det_html = ("<ul class='small mono' style='margin:.2em 0'>" + "".join(f"<li>{_e(d)}</li>" for d in det) + "</ul>"
                        if det else "")
            out.append(f"<tr><th>{_e(c.get('check', '?'))}</th><td>{_badge(c.get('status'))}</td>"
                       f"<td>{_e(c.get('message', ''))}{det_html}</td></tr>")
        out.append("</table>")

    png, without = _figure_png(a)
    if png is not None:
        out.append("<h3>Per-position agreement</h3>")
        out.append(f'<img class="plot" alt="{_e("per-position KL and top-1 margin for " + str(a.get("name", "?")))}" '
                   f'src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">')
        out.append("<p class='small muted'>Top: KL divergence of the artifact from the fp32 reference at each position "
                   "(log scale; exact zeros are drawn at the bottom of the axis). Bottom: the fp32 reference's top-1 margin (its top logit minus "
                   "the second); red crosses mark positions where the artifact's top-1 token differs. Scenarios follow "
                   "one another along x, shaded by status.</p>")
    if without:
        out.append(f"<p class='small muted'>no per-position series for: {_e(', '.join(without))}</p>")

    scs = _scenarios(a)
    a_st = _st(a.get("status"))
    have = {str(sc.get("scenario", "?")) for sc in scs}
    missing = [n for n in names if n not in have]
    if scs or missing:
        out.append("<h3>Scenarios</h3>")
    for si, sc in enumerate(scs):
        out.append(_scenario_html(ai, si, sc))
    if missing:
        why = f"not reached before the {'crash' if a_st == 'crashed' else a_st}" if a_st in ("crashed", "timeout") \
            else "not run"
        out.append(f"<p class='muted'>{_e(why)}: {_e(', '.join(missing))}</p>")
    elif not scs and a_st in ("crashed", "timeout"):
        out.append("<p class='muted'>no scenario ran to completion</p>")
    out.append("</section>")
    return "\n".join(out)


def _summary_table(report: dict) -> str:
    names = _scenario_names(report)
    arts = _artifacts(report)
    if not arts:
        return "<p class='muted'>no artifacts in the report</p>"
    rows = _rows(report)
    head = "<tr><th>artifact</th><th>static checks</th>" + "".join(f"<th>{_e(n)}</th>" for n in names) + "</tr>"
    body = []
    for ai, a in enumerate(arts):
        cells = [f"<th><a href='#a{ai}'>{_e(a.get('name', '?'))}</a><br>{_badge(a.get('status'))}"
                 + (f" <span class='small muted'>{_e(a['quant'])}</span>" if a.get("quant") else "") + "</th>"]
        checks = [c for c in _list(a.get("checks")) if isinstance(c, dict)]
        if checks:
            worst = _worst([c.get("status") for c in checks])
            bad = [f"{c.get('check', '?')}: {_st(c.get('status'))}" for c in checks if _st(c.get("status")) != "pass"]
            txt = "; ".join(bad) if bad else f"all {len(checks)} pass"
            cells.append(f'<td class="cell st-{_e(worst)}"><b>{_e(worst)}</b><br><span class="fig">{_e(txt)}</span></td>')
        else:
            cells.append('<td class="cell st-unknown"><span class="fig">-</span></td>')
        if names:
            by_name = {}
            for si, sc in enumerate(_scenarios(a)):
                by_name.setdefault(str(sc.get("scenario", "?")), si)
            for _, _, n, sc, st in [r for r in rows if r[0] == ai]:
                if sc is None:
                    fig = "not reached" if st in ("crashed", "timeout") else "not run"
                    cells.append(f'<td class="cell st-{_e(st)}"><a href="#a{ai}"><b>{_e(st)}</b><br>'
                                 f'<span class="fig">{_e(fig)}</span></a></td>')
                    continue
                fig = _key_figure(sc)
                tip = "; ".join([str(sc.get("reason"))] * bool(sc.get("reason")) + _msgs(sc.get("failures")))
                if not fig and sc.get("reason"):
                    fig = _shorten(str(sc["reason"]), 40)
                title = f' title="{_e(tip)}"' if tip else ""
                cells.append(f'<td class="cell st-{_e(st)}"{title}><a href="#a{ai}-s{by_name[n]}"><b>{_e(st)}</b><br>'
                             f'<span class="fig">{_e(fig or "-")}</span></a></td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return "<table class='summary'>" + head + "".join(body) + "</table>"


def render_html(report: dict) -> str:
    """The whole report as one HTML document (string)."""
    report = _dict(report)
    model = _dict(report.get("model"))
    prof = _dict(report.get("profile"))
    tool = " ".join(str(x) for x in (report.get("tool", "minicpmv-edge"), report.get("version")) if x)
    name = model.get("name") or model.get("path") or ""
    title = f"{tool} validation" + (f": {name}" if name else "")
    ok = _st(report.get("status")) == "pass"
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width,initial-scale=1">',
           f"<title>{_e(title)}</title><style>{CSS}</style></head><body>", f"<h1>{_e(title)}</h1>"]
    pairs = []
    if model.get("path"):
        pairs.append(("model", f"<code>{_e(model['path'])}</code>"))
    if report.get("scenario_set"):
        pairs.append(("scenario set", _e(report["scenario_set"])))
    if prof:
        pairs.append(("profile", _e(", ".join(f"{k} {v}" for k, v in prof.items()))))
    if report.get("wall_s") is not None:
        pairs.append(("wall time", f"{_e(_num(report['wall_s']))} s"))
    if report.get("exit_code") is not None:
        pairs.append(("exit code", _e(report["exit_code"])))
    out.append(_kv_table(pairs))
    out.append(f'<div class="verdict st-{"pass" if ok else "fail"}">{_e(verdict_line(report))}</div>')
    out.append("<h2>Summary</h2>")
    out.append(_summary_table(report))
    out.append("<p class='small muted'>Cells: status, then KL mean and top-1 agreement against the fp32 reference "
               "(image scenarios: lowest image-embedding cosine). Hover a cell for its reason or failures.</p>")

    fails = []
    for ai, a in enumerate(_artifacts(report)):
        nm = str(a.get("name", f"artifact {ai}"))
        if _error(a):
            fails.append(f"{nm}: {_st(a.get('status'))}: {_error(a)}")
        for c in _failed_checks(a):
            fails.append(f"{nm}: check {c.get('check', '?')}: {c.get('message', '')}")
        for sc in _scenarios(a):
            fails += [f"{nm} / {sc.get('scenario', '?')}: {f}" for f in _msgs(sc.get("failures"))]
    if fails:
        out.append("<h3>Failures</h3><ul class='fail'>" + "".join(f"<li>{_e(f)}</li>" for f in fails) + "</ul>")

    names = _scenario_names(report)
    for ai, a in enumerate(_artifacts(report)):
        out.append(_artifact_html(report, ai, a, names))
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_html(report: dict, path) -> Path:
    """Write render_html(report) to `path` atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = render_html(report).encode("utf-8")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m validate.report", description="Render a validation report JSON")
    ap.add_argument("report", type=Path, help="report JSON written by the validation harness")
    ap.add_argument("--html", type=Path, help="also write the HTML report here")
    args = ap.parse_args(argv)
    report = json.loads(args.report.read_text(encoding="utf-8"))
    sys.stdout.write(summary_text(report))
    if args.html:
        print(f"HTML report: {write_html(report, args.html)}")
    return 0 if _st(report.get("status")) == "pass" else 1


if __name__ == "__main__":
    raise SystemExit(main())
