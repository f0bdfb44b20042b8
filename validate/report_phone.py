"""The phone profile's part of the reports: the emulated CPU and build, what the runtime saw from
inside its process, and the third comparison (the same file on aarch64 against x86)."""

from __future__ import annotations

import html

HONEST = ("emulated ISA and numerics (qemu-user), not a phone's speed or memory: timings are not measured and "
          "the RSS is qemu's")


def _fmt(x, spec: str = ".2e") -> str:
    return "-" if x is None else format(float(x), spec)


def phone_header(report: dict) -> list[str]:
    ph = (report.get("profile") or {}).get("phone")
    if not isinstance(ph, dict):
        return []
    flags = " ".join(f"{k}={v}" for k, v in sorted((ph.get("llama_cpp_flags") or {}).items()))
    return [f"phone profile {ph.get('profile')}: aarch64 under {ph.get('emulator', 'qemu')}, -cpu {ph.get('qemu_cpu')} "
            f"({' '.join(ph.get('cpu_features') or [])}); llama.cpp built with {flags}; {HONEST}"]


def platform_line(a: dict) -> str | None:
    p = a.get("platform")
    if not isinstance(p, dict) or not p:
        return None
    s = f"{p.get('machine', '?')}"
    if p.get("cpu"):
        s += f", {p['cpu']}"
    if p.get("hwcaps"):
        s += f", HWCAP {' '.join(p['hwcaps'])}"
    if p.get("llama_cpp"):
        s += f"; llama.cpp: {p['llama_cpp']}"
    if p.get("executorch"):
        s += f"; {p['executorch']}"
    return s


def isa_rows(a: dict) -> list[list[str]]:
    """[scenario, KL x86->aarch64, p99, max |dlogit|, top-1, greedy agreement, image cosine] per scenario."""
    rows = []
    for sc in a.get("scenarios") or []:
        x = sc.get("x86") if isinstance(sc, dict) else None
        if not isinstance(x, dict):
            continue
        m = x.get("metrics") or {}
        cos = x.get("image_cosine") or []
        rows.append([str(sc.get("scenario", "?")), _fmt(m.get("kl_mean")), _fmt(m.get("kl_p99")),
                     _fmt(m.get("max_abs_err"), ".3g"),
                     "-" if m.get("top1_agreement") is None else f"{100 * m['top1_agreement']:.1f}%",
                     "-" if x.get("greedy_agreement") is None else f"{100 * x['greedy_agreement']:.0f}%",
                     _fmt(min(cos), ".6f") if cos else "-"])
    return rows


ISA_HEADERS = ["scenario", "KL x86", "p99", "max |dlogit|", "top1", "greedy", "img cos"]
ISA_NOTE = ("  (the same file's logits on aarch64 (phone) against this machine's x86 run with the same settings; "
            "greedy: teacher-forced argmax agreement)")


def phone_text(report: dict, table, wrap) -> list[str]:
    """Console lines: per artifact the platform seen and the aarch64-vs-x86 table."""
    if not (report.get("profile") or {}).get("phone"):
        return []
    out: list[str] = []
    for a in report.get("artifacts") or []:
        line = platform_line(a)
        rows = isa_rows(a)
        if not line and not rows:
            continue
        out += [""] + wrap(f"{a.get('name', '?')} on the phone: {line or '-'}", "", "  ")
        if rows:
            out += table(ISA_HEADERS, rows, right={1, 2, 3, 4, 5, 6}, shrink=[0])
            out += wrap(ISA_NOTE.strip(), "  ", "  ")
    return out


def phone_html(report: dict, a: dict) -> str:
    ph = (report.get("profile") or {}).get("phone")
    if not ph:
        return ""
    e = html.escape
    parts = ["<h3>Phone profile: aarch64 against x86</h3>",
             f"<p class='small'>{e(' '.join(phone_header(report)))}</p>"]
    for label, key in (("seen by the runtime (aarch64)", "platform"), ("this machine (x86)", "host_platform")):
        line = platform_line({"platform": a.get(key)})
        if line:
            parts.append(f"<p class='small mono'>{e(label)}: {e(line)}</p>")
    rows = isa_rows(a)
    if rows:
        parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in ISA_HEADERS) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows]
        parts.append(f"</table><p class='small muted'>{e(ISA_NOTE.strip())}</p>")
    return "\n".join(parts)
