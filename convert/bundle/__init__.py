"""`python -m convert recipe`: a platform recipe's release bundle, built, validated and documented.

The bundle is staged under a temporary name and swapped in whole (convert/folder.py): an interrupt
or an error leaves the previous bundle as it was. Its manifest is deterministic (no times, no
measured figures): the same source and recipe give the same artifact bytes and the same manifest.
A re-run reuses the files of a part whose build key and hashes match, and does nothing at all when
the whole bundle (parts, checks' inputs) is unchanged and passed.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from .. import manifest
from ..errors import ConvertError
from ..folder import staged_folder
from . import checks, docs
from .parts import Part, export, md5_file, plan_parts, reuse, set_keys, side_files, source_fingerprint

KIND = "release-bundle"
DOC_FILES = ("README.md", "Modelfile", "commands.txt", "validation.json", "validation.html", "app.json")
REPORTS = "reports"


def _read_bundle(out: Path) -> dict | None:
    m = manifest.read(out)
    return m if m and m.get("kind") == KIND else None


def check_out(out: Path, force: bool) -> dict | None:
    """The earlier bundle in `out`, if any; anything else in the way is bad input unless --force."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise ConvertError(f"--out {out}: exists and is not a folder")
    old = _read_bundle(out)
    if old is None and any(out.iterdir()) and not force:
        raise ConvertError(f"--out {out} holds files that are not a release bundle; choose an empty folder or pass "
                           "--force (it is replaced whole)")
    return old


def checks_key(recipe, parts: list[Part]) -> str:
    """What the checks depend on besides the files: the recipe's validation, phones and devices, the
    scenario and tolerance tables, the tool's versions."""
    from recipes import HERE as RECIPES

    doc = {"validation": recipe.validation, "phones": recipe.phones, "devices": [d.__dict__ for d in recipe.devices],
           "parts": {p.kind: p.key for p in parts}, "versions": manifest.versions(),
           "tables": {n: hashlib.sha256((RECIPES / n).read_bytes()).hexdigest()
                      for n in ("scenarios.json", "tolerances.json", "phones.toml")}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def _up_to_date(old: dict | None, out: Path, parts: list[Part], key: str) -> bool:
    if not old or old.get("status") != "pass" or old.get("checks_key") != key:
        return False
    if old.get("build_keys") != {p.kind: p.key for p in parts}:
        return False
    if not all((out / f).is_file() for f in DOC_FILES):
        return False
    return all((out / a["file"]).is_file() and (out / a["file"]).stat().st_size == a["size"]
               and manifest.sha256_file(out / a["file"]) == a["sha256"] for a in old.get("artifacts", []))


def _role(part: Part, rel: str) -> str:
    if part.kind == "gguf":
        return "imatrix" if rel == "imatrix.gguf" else "mmproj" if Path(rel).name.startswith("mmproj-") else "decoder"
    return part.kind


def _entries(parts: list[Part], dest: Path, verdicts: dict | None = None) -> list[dict]:
    out = []
    for p in parts:
        for rel in p.files:
            f = dest / rel
            e = {"file": rel, "part": p.kind, "role": _role(p, rel), "size": f.stat().st_size,
                 "sha256": manifest.sha256_file(f), "md5": md5_file(f), "options": p.options}
            if verdicts is not None:
                e["validation"] = verdicts.get(rel, {})
            out.append(e)
    return sorted(out, key=lambda e: e["file"])


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", s.split(" (")[0]).strip("-").lower()


def build_bundle(recipe, ckpt, out: Path, *, quiet: bool = False, force: bool = False) -> int:
    parts = plan_parts(recipe)
    old = check_out(out, force)
    source = source_fingerprint(ckpt)
    set_keys(parts, source)
    key = checks_key(recipe, parts)
    if _up_to_date(old, out, parts, key):
        print(f"{out}: up to date (same source, recipe and tool versions; every file matches its manifest): reused")
        return 0
    with staged_folder(out) as tmp:
        for p in parts:
            if reuse(p, old, out, tmp):
                print(f"{p.kind}: reusing {', '.join(p.files)} (same build key, hashes checked)")
            else:
                print(f"{p.kind}: building {json.dumps(p.options, sort_keys=True)}")
                export(p, ckpt, tmp, quiet=quiet)
        doc = {"tool": manifest.TOOL, "kind": KIND, "recipe": {"platform": recipe.platform, "file": recipe.path.name,
               "sha256": hashlib.sha256(recipe.path.read_bytes()).hexdigest()},
               "source": {k: v for k, v in source.items() if k not in ("path", "files_stamp")}
               | {"name": ckpt.name, "hub_id": docs.hub_id(ckpt.path)},
               "versions": manifest.versions(), "build_keys": {p.kind: p.key for p in parts}, "checks_key": key,
               "part_files": {p.kind: side_files(p, tmp) for p in parts}, "status": "pending",
               "artifacts": _entries(parts, tmp)}
        manifest.write_doc(tmp, doc)  # the harness checks each file's sha256 against it
        runs = checks.run_validation_runs(recipe, ckpt, parts, tmp, quiet=quiet)
        gguf = next(p for p in parts if p.kind == "gguf")
        memory = checks.memory_check(recipe, ckpt, gguf, tmp, quiet=quiet)
        verdicts = checks.file_verdicts(parts, runs, tmp)
        doc["artifacts"] = _entries(parts, tmp, verdicts)
        codes = [r["report"]["exit_code"] for r in runs if "report" in r]
        codes += [0 if r["coreml"]["status"] == "pass" else 3 for r in runs if "coreml" in r]
        code = 4 if 4 in codes else 3 if any(codes) else 0
        mem_fail = [m for m in memory if m["status"] != "pass"]
        if mem_fail and code == 0:
            code = 3
        doc["status"] = "pass" if code == 0 else "fail"
        # the verdict per device only: the estimate's compute part is measured (validation.json has it)
        doc["memory"] = [{k: m[k] for k in ("device", "budget_mb", "n_ctx", "n_batch", "n_ubatch", "status")}
                         for m in memory]
        _write_docs(recipe, tmp, doc, runs, memory, ckpt)
        manifest.write_doc(tmp, doc)
    print(f"wrote the {recipe.platform} bundle to {out}: {len(doc['artifacts'])} files, status {doc['status']}")
    for m in memory:
        print(f"  memory {m['status']}: {m['message']}")
    if code:
        why = "; ".join(m["message"] for m in mem_fail) or "a validation run failed (validation.html says which)"
        print(f"bundle FAILED: {why}; the files are kept, marked failed in {out / 'manifest.json'}")
    return code


def _write_docs(recipe, dest: Path, doc: dict, runs: list[dict], memory: list[dict], ckpt) -> None:
    from validate.report import write_html

    gguf = {e["role"]: e["file"] for e in doc["artifacts"] if e["part"] == "gguf" and e["role"] != "imatrix"
            and not (e["role"] == "mmproj" and e["file"].endswith("-4x.gguf"))}
    links = {}
    for r in runs:
        if "report" in r:
            name = f"{REPORTS}/{_slug(r['where'])}.html"
            write_html(r["report"], dest / name)
            links[r["where"]] = name
    cfg = docs.app_config(recipe, doc["artifacts"], memory)
    snippet_name, snippet = docs.app_snippet(cfg)
    dev = recipe.devices[0]
    lines = docs.llama_lines(gguf, dev)
    report = {"tool": manifest.TOOL, "kind": KIND, "platform": recipe.platform, "status": doc["status"],
              "runs": runs, "memory": memory, "files": {a["file"]: a.get("validation", {}) for a in doc["artifacts"]}}
    texts = {"README.md": docs.model_card(recipe, doc, runs, memory, docs.source_card(ckpt.path), gguf, snippet_name),
             "Modelfile": docs.modelfile(gguf, dev),
             "commands.txt": "\n".join(f"# {k}\n{v}" for k, v in lines.items()) + "\n",
             "validation.json": json.dumps(report, indent=1, sort_keys=True, default=str) + "\n",
             "validation.html": docs.bundle_html(recipe, doc, runs, memory, links),
             "app.json": json.dumps(cfg, indent=2) + "\n", snippet_name: snippet}
    for name, text in texts.items():
        manifest.write_text_atomic(dest / name, text)
