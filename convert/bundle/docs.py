"""The bundle's documents: the Hugging Face model card, the Ollama Modelfile, the llama.cpp command
lines and each platform's app snippet. Every figure comes from the validation runs and the memory
check; every file name from the manifest."""

from __future__ import annotations

import html
import json
from pathlib import Path

import yaml

from ..chat import IM_END, IM_START

# the apps' sampling (apps.md section 3); 4.6 takes no system prompt, its assistant turn opens with an
# empty thinking block
SAMPLING = {"temperature": 0.7, "top_k": 0, "top_p": 1.0, "repeat_penalty": 1.0}
THINK = "<think>\n\n</think>\n\n"
PIPELINE_TAG = "image-text-to-text"


def source_card(src: Path) -> dict:
    """The source checkpoint's model-card front matter (license, base model), if it has one."""
    p = Path(src) / "README.md"
    if not p.is_file():
        return {}
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return {}
    try:
        meta = yaml.safe_load(text.split("---", 2)[1])
    except (yaml.YAMLError, IndexError):
        return {}
    return meta if isinstance(meta, dict) else {}


def hub_id(path: Path) -> str | None:
    """`owner/name` of a checkpoint in the Hugging Face cache (models--owner--name/snapshots/...)."""
    for part in Path(path).resolve().parts:
        if part.startswith("models--") and part.count("--") >= 2:
            return part[len("models--"):].replace("--", "/", 1)
    return None


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 1024:.1f} KB"


def _fmt(x, spec=".2e") -> str:
    return "–" if x is None else format(x, spec)


def fidelity_rows(runs: list[dict]) -> list[dict]:
    """One row per (run, artifact): the figures the validation report holds."""
    rows = []
    for r in runs:
        if "report" not in r:
            continue
        for a in r["report"]["artifacts"]:
            q = (a.get("verdict") or {}).get("quality") or {}
            scs = [s for s in a.get("scenarios", []) if isinstance(s, dict)]
            greedy = [s["greedy"] for s in scs if isinstance(s.get("greedy"), dict) and s["greedy"].get("reference")]
            same = sum(1 for g in greedy if g.get("artifact") == g.get("reference"))
            x86 = [s["x86"]["metrics"]["kl_mean"] for s in scs if isinstance(s.get("x86"), dict)
                   and isinstance(s["x86"].get("metrics"), dict)]
            x86g = [s["x86"]["greedy_agreement"] for s in scs if isinstance(s.get("x86"), dict)
                    and s["x86"].get("greedy_agreement") is not None]
            rows.append({"where": r["where"], "artifact": a["name"], "status": a["status"],
                         "scenarios": len(scs), "kl_mean": q.get("kl_mean"), "top1": q.get("top1_agreement"),
                         "greedy_same": f"{same}/{len(greedy)}" if greedy else None,
                         "kl_vs_x86": sum(x86) / len(x86) if x86 else None,
                         "greedy_vs_x86": sum(x86g) / len(x86g) if x86g else None})
    return rows


def fidelity_table(rows: list[dict]) -> list[str]:
    out = ["| where | artifact | verdict | scenarios | mean KL vs fp32 | top-1 agreement | greedy = reference | "
           "mean KL vs x86 |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['where']} | {r['artifact']} | {r['status']} | {r['scenarios']} | {_fmt(r['kl_mean'])} | "
                   f"{_fmt(r['top1'], '.1%')} | {r['greedy_same'] or '–'} | {_fmt(r['kl_vs_x86'])} |")
    return out


def llama_lines(files: dict, device) -> dict[str, str]:
    dec, mm = files["decoder"], files.get("mmproj")
    mmarg = f" --mmproj {mm}" if mm else ""
    sizes = f"-c {device.n_ctx} -b {device.n_batch} -ub {device.n_ubatch}"
    samp = (f"--temp {SAMPLING['temperature']} --top-k {SAMPLING['top_k']} --top-p {SAMPLING['top_p']} "
            f"--repeat-penalty {SAMPLING['repeat_penalty']}")
    return {"llama-server": f"llama-server -m {dec}{mmarg} {sizes} -t 4 {samp} --port 8080",
            "llama-mtmd-cli": f"llama-mtmd-cli -m {dec}{mmarg} {sizes} -t 4 {samp} --image photo.jpg "
                              f"-p \"What is in this picture?\""}


def modelfile(files: dict, device) -> str:
    """Ollama: the decoder and the projector as two FROM lines, the ChatML template of 4.6."""
    lines = ["# Ollama Modelfile: ollama create minicpm-v4.6 -f Modelfile",
             "# Untested here (no Ollama on this machine): it needs an Ollama whose llama.cpp knows the qwen35",
             "# architecture and the minicpmv4_6 projector (older ones fail to load 4.6, MiniCPM-V #1103).",
             f"FROM ./{files['decoder']}"]
    if files.get("mmproj"):
        lines.append(f"FROM ./{files['mmproj']}")
    tmpl = ("{{- range .Messages }}" + IM_START + "{{ .Role }}\n{{ .Content }}" + IM_END + "\n{{ end }}" + IM_START
            + "assistant\n" + THINK)
    lines += [f'TEMPLATE """{tmpl}"""', f"PARAMETER num_ctx {device.n_ctx}", f"PARAMETER num_batch {device.n_batch}",
              f"PARAMETER temperature {SAMPLING['temperature']}", f"PARAMETER top_k {SAMPLING['top_k']}",
              f"PARAMETER top_p {SAMPLING['top_p']}", f"PARAMETER repeat_penalty {SAMPLING['repeat_penalty']}",
              f'PARAMETER stop "{IM_END}"']
    return "\n".join(lines) + "\n"


def app_config(recipe, entries: list[dict], memory: list[dict]) -> dict:
    """What an app pins and how it sizes its context: the data every platform snippet is made from."""
    gguf = [e for e in entries if e["part"] == "gguf" and e.get("role") in ("decoder", "mmproj")]
    return {"platform": recipe.platform,
            "files": [{"name": e["file"], "role": e["role"], "size": e["size"], "md5": e["md5"], "sha256": e["sha256"]}
                      for e in gguf],
            "tiers": [{"device": m["device"], "memory_budget_mb": m["budget_mb"], "n_ctx": m["n_ctx"],
                       "n_batch": m["n_batch"], "n_ubatch": m["n_ubatch"], "estimate_mb": m["estimate"]["total_mb"]}
                      for m in memory],
            "threads": 4, "sampling": SAMPLING}


# each app's language: the file, its declarations, how a file entry and a constant are written
SNIPPETS = {
    "android": {"file": "ModelFiles.kt", "app": "Android", "decl": "data class ModelFile(val name: String, val size: "
                "Long, val md5: String)", "open": "val MODEL_FILES = listOf(", "close": ")",
                "item": '    ModelFile("{name}", {size}L, "{md5}"),', "const": "const val {k} = {v}"},
    "harmonyos": {"file": "ModelFiles.ets", "app": "HarmonyOS", "decl": "export interface ModelFile { name: string; "
                  "size: number; md5: string }", "open": "export const MODEL_FILES: ModelFile[] = [", "close": "];",
                  "item": '  {{ name: "{name}", size: {size}, md5: "{md5}" }},', "const": "export const {k} = {v};"},
    "ios": {"file": "ModelFiles.swift", "app": "iOS", "decl": "struct ModelFile { let name: String; let size: Int64; "
            "let md5: String }", "open": "let modelFiles: [ModelFile] = [", "close": "]",
            "item": '    ModelFile(name: "{name}", size: {size}, md5: "{md5}"),', "const": "let {k} = {v}"},
}


def app_snippet(cfg: dict) -> tuple[str, str]:
    """(file name, text) in the platform app's language: the files to download and check by MD5, and
    the llama.cpp context settings (per memory tier on iOS, whose app picks them by free memory)."""
    lang = SNIPPETS[cfg["platform"]]
    tiers = cfg["tiers"]
    body = [f"// Generated by minicpmv-edge: the files this bundle's {lang['app']} app downloads, pinned by MD5,",
            "// and the llama.cpp settings they were validated and sized with.", lang["decl"], "", lang["open"],
            *(lang["item"].format(**f) for f in cfg["files"]), lang["close"], ""]
    if cfg["platform"] == "ios":  # the app's tiers by os_proc_available_memory(), n_batch 2048
        body += [lang["const"].format(k="N_BATCH", v=tiers[0]["n_batch"]),
                 "func contextSettings(availableMB: Int) -> (nCtx: Int32, nUbatch: Int32) {"]
        body += [f"    if availableMB < {t['memory_budget_mb']} {{ return ({t['n_ctx']}, {t['n_ubatch']}) }}"
                 for t in tiers[:-1]]
        body += [f"    return ({tiers[-1]['n_ctx']}, {tiers[-1]['n_ubatch']})", "}"]
    else:
        t = tiers[0]
        body += [lang["const"].format(k=k.upper(), v=t[k]) for k in ("n_ctx", "n_batch", "n_ubatch")]
    body.append(lang["const"].format(k="N_THREADS", v=cfg["threads"]))
    return lang["file"], "\n".join(body) + "\n"


def model_card(recipe, doc: dict, runs: list[dict], memory: list[dict], src_meta: dict, files: dict,
               snippet_name: str) -> str:
    """A Hugging Face model-repo README: YAML front matter, then the files, their fidelity, memory and use."""
    src = doc["source"]
    front = {"license": src_meta.get("license", "other"), "base_model": src.get("hub_id") or src.get("name"),
             "base_model_relation": "quantized", "pipeline_tag": PIPELINE_TAG,
             "library_name": "gguf",
             "tags": ["minicpm-v", "gguf", "llama.cpp", "multimodal", "on-device", recipe.platform, "minicpmv-edge"]}
    for k in ("license_name", "license_link"):
        if k in src_meta:
            front[k] = src_meta[k]
    if front["license"] == "other" and "license_name" not in front:
        front["license_name"] = "see-base-model"
    out = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
           f"# {src.get('name')}: {recipe.description}", "",
           f"Built and validated by minicpmv-edge {doc['versions'].get('minicpmv-edge', '?')} from the recipe "
           f"`{recipe.path.name}` (platform {recipe.platform}). Status: **{doc['status']}**.", "",
           "## Files", "", "| file | role | size | MD5 | validation |", "|---|---|---:|---|---|"]
    for e in doc["artifacts"]:
        v = ", ".join(f"{k}: {s}" for k, s in sorted(e.get("validation", {}).items())) or "–"
        out.append(f"| `{e['file']}` | {e.get('role', e['part'])} | {_mb(e['size'])} | `{e['md5']}` | {v} |")
    out += ["", "sha256 of every file: `manifest.json`.", "", "## Fidelity against the PyTorch reference", "",
            "Logits of every scenario against the fp32 transformers reference, in the runtime that loads each "
            "file; the emulated phone runs the app's llama.cpp build for aarch64 under qemu (emulated ISA and "
            "numerics, not phone speed). Full reports: `validation.html`, `validation.json`.", ""]
    out += fidelity_table(fidelity_rows(runs))
    skipped = [r for r in runs if "skipped" in r]
    if skipped:
        out += ["", "Not checked: " + "; ".join(f"{r['where']}: {r['skipped']}" for r in skipped) + "."]
    out += ["", "## Memory per device class", "",
            "Estimate = the files + K/V cache (float16) at the context + Gated DeltaNet state + the compute "
            "memory touched by encoding one image and prefilling a full micro-batch (peak RSS over the RSS "
            "after loading, llama.cpp's CPU backend on this machine). llama.cpp reserves more (`reserved`: "
            "room for every token's logits in a micro-batch, which an app asking for the last token's never "
            "touches). Peak RSS is the whole measuring process, Python included.", "",
            "| device | n_ctx | n_ubatch | weights | K/V | state | compute | reserved | estimate | budget | "
            "peak RSS | |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for m in memory:
        e = m["estimate"]
        out.append(f"| {m['device']} | {m['n_ctx']} | {m['n_ubatch']} | {e['weights_mb']} MB | {e['kv_cache_mb']} MB | "
                   f"{e['recurrent_state_mb']} MB | {e['compute_buffers_mb']} MB | "
                   f"{m['measured']['compute_reserved_mb']} MB | {e['total_mb']} MB | "
                   f"{m['budget_mb']} MB | {m['measured']['peak_rss_mb']} MB | {m['status']} |")
    dev = recipe.devices[0]
    lines = llama_lines(files, dev)
    out += ["", "## Use", "", "llama.cpp (a build that knows the `qwen35` architecture and the `minicpmv4_6` "
            "projector):", "", "```sh", lines["llama-mtmd-cli"], lines["llama-server"], "```", "",
            f"Ollama: `ollama create minicpm-v4.6 -f Modelfile` (untested here). App: `{snippet_name}` lists the "
            "files with their sizes and MD5s and the context settings above.", ""]
    return "\n".join(out)


def bundle_html(recipe, doc: dict, runs: list[dict], memory: list[dict], links: dict[str, str]) -> str:
    """validation.html: the bundle's verdicts, fidelity and memory, linking each run's full report."""
    e = html.escape
    rows = fidelity_rows(runs)
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{e(recipe.platform)} bundle validation</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}td:first-child,th:first-child"
             "{text-align:left}.fail{color:#b00}.pass{color:#070}</style></head><body>",
             f"<h1>{e(doc['source'].get('name', ''))} for {e(recipe.platform)}: "
             f"<span class=\"{e(doc['status'])}\">{e(doc['status'])}</span></h1>",
             "<h2>Runs</h2><ul>"]
    for r in runs:
        if "skipped" in r:
            parts.append(f"<li>{e(r['where'])}: skipped ({e(r['skipped'])})</li>")
        elif "coreml" in r:
            parts.append(f"<li>{e(r['where'])}: {e(r['coreml']['status'])}</li>")
        else:
            link = links.get(r["where"])
            parts.append(f"<li>{e(r['where'])}: {e(r['report']['status'])}"
                         + (f' (<a href="{e(link)}">full report</a>)' if link else "") + "</li>")
    parts.append("</ul><h2>Fidelity</h2><table><tr><th>where</th><th>artifact</th><th>verdict</th>"
                 "<th>mean KL vs fp32</th><th>top-1</th><th>greedy = reference</th><th>mean KL vs x86</th></tr>")
    for r in rows:
        parts.append(f"<tr><td>{e(r['where'])}</td><td>{e(r['artifact'])}</td><td class=\"{e(r['status'])}\">"
                     f"{e(r['status'])}</td><td>{_fmt(r['kl_mean'])}</td><td>{_fmt(r['top1'], '.1%')}</td>"
                     f"<td>{e(r['greedy_same'] or '–')}</td><td>{_fmt(r['kl_vs_x86'])}</td></tr>")
    parts.append("</table><h2>Memory</h2><table><tr><th>device</th><th>estimate MB</th><th>budget MB</th>"
                 "<th>peak RSS MB</th><th>verdict</th></tr>")
    for m in memory:
        parts.append(f"<tr><td>{e(m['device'])}</td><td>{m['estimate']['total_mb']}</td><td>{m['budget_mb']}</td>"
                     f"<td>{m['measured']['peak_rss_mb']}</td><td class=\"{m['status']}\">{m['status']}</td></tr>")
    parts.append("</table><h2>Files</h2><pre>" + e(json.dumps(doc["artifacts"], indent=1)) + "</pre></body></html>")
    return "\n".join(parts) + "\n"
