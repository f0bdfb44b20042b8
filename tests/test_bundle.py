"""`python -m convert recipe`: the release bundle each platform's app pipeline gets, end to end on the
tiny model: files against their manifest's sha256 and MD5, the model card's YAML and figures against
the validation report, the Modelfile's and command lines' files, the memory check, reuse, bad input."""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from convert.cli import main

DOCS = ("README.md", "Modelfile", "commands.txt", "validation.json", "validation.html", "app.json", "manifest.json")
SNIPPETS = {"android": "ModelFiles.kt", "ios": "ModelFiles.swift", "harmonyos": "ModelFiles.ets"}


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _front_matter(readme: Path) -> dict:
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def _check_bundle(out: Path, platform: str) -> dict:
    """Every promise a bundle makes, checked from its own files."""
    for name in DOCS + (SNIPPETS[platform],):
        assert (out / name).is_file(), name
    assert not list(out.parent.glob(f".{out.name}.*")), "a staging folder was left behind"
    man = json.loads((out / "manifest.json").read_text())
    assert man["kind"] == "release-bundle" and man["recipe"]["platform"] == platform and man["status"] == "pass"
    for a in man["artifacts"]:
        data = (out / a["file"]).read_bytes()
        assert len(data) == a["size"]
        assert hashlib.sha256(data).hexdigest() == a["sha256"], a["file"]
        assert hashlib.md5(data).hexdigest() == a["md5"], a["file"]
        assert a["validation"] and set(a["validation"].values()) == {"pass"}, a
    roles = {a["role"]: a["file"] for a in man["artifacts"]}
    assert roles["decoder"] == "MiniCPM-V-4.6-Q4_K_M.gguf" and roles["mmproj"] == "mmproj-MiniCPM-V-4.6-F16.gguf"

    # the model card: Hugging Face front matter, and the fidelity table's figures are the report's
    meta = _front_matter(out / "README.md")
    assert meta["pipeline_tag"] == "image-text-to-text" and meta["license"] and meta["base_model"]
    assert "gguf" in meta["tags"] and platform in meta["tags"]
    card = (out / "README.md").read_text()
    rep = json.loads((out / "validation.json").read_text())
    host = next(r for r in rep["runs"] if r["target"] == "host")
    row = host["report"]["artifacts"][0]
    kl = row["verdict"]["quality"]["kl_mean"]
    line = next(ln for ln in card.splitlines() if ln.startswith(f"| {host['where']} | {row['name']} |"))
    assert f"{kl:.2e}" in line and f"{row['verdict']['quality']['top1_agreement']:.1%}" in line
    for a in man["artifacts"]:
        assert f"`{a['md5']}`" in card and a["md5"] in (out / SNIPPETS[platform]).read_text()

    # the Modelfile and the command lines name the bundle's real files
    froms = re.findall(r"^FROM \./(\S+)$", (out / "Modelfile").read_text(), re.M)
    assert froms == [roles["decoder"], roles["mmproj"]]
    for cmd in (ln for ln in (out / "commands.txt").read_text().splitlines() if not ln.startswith("#")):
        argv = shlex.split(cmd)
        assert (out / argv[argv.index("-m") + 1]).is_file() and (out / argv[argv.index("--mmproj") + 1]).is_file()
        assert argv[argv.index("-c") + 1] == str(man["memory"][0]["n_ctx"])

    # memory: one row per device class of the recipe, every part of the estimate accounted for
    assert man["memory"] and all(m["status"] == "pass" for m in man["memory"])
    for m in rep["memory"]:
        e = m["estimate"]
        parts = e["weights_mb"] + e["kv_cache_mb"] + e["recurrent_state_mb"] + e["compute_buffers_mb"]
        assert abs(parts - e["total_mb"]) < 0.3 and e["compute_buffers_mb"] > 0 and m["measured"]["peak_rss_mb"] > 0
        assert e["kv_bytes_per_token"] * m["n_ctx"] / 2**20 == pytest.approx(e["kv_cache_mb"], abs=0.05)
    return man


def test_android_bundle_complete_and_reused(capsys, tmp_path):
    """Built, validated on x86 and both Android phone profiles, documented; a re-run reuses it."""
    out = tmp_path / "android"
    rc, stdout, err = _run(capsys, "recipe", "android", "--out", str(out), "--quiet")
    assert rc == 0, err
    man = _check_bundle(out, "android")
    wheres = set(man["artifacts"][0]["validation"])
    assert {"android-armv82", "android-armv86"} <= wheres and any(w.startswith("x86_64") for w in wheres)
    rep = json.loads((out / "validation.json").read_text())
    phone = [r for r in rep["runs"] if r["target"] == "phone"]
    for r in phone:  # the ARM kernels ran: the runtime saw aarch64
        assert r["report"]["artifacts"][0]["platform"]["machine"] == "aarch64"
        assert (out / "reports" / f"{r['where']}.html").is_file()
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    rc, stdout, _ = _run(capsys, "recipe", "android", "--out", str(out), "--quiet")
    assert rc == 0 and "up to date" in stdout
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("platform", ["ios", pytest.param("harmonyos", marks=pytest.mark.slow)])  # 73 s: qemu
def test_other_platform_bundles(platform, capsys, tmp_path):
    out = tmp_path / platform
    rc, _, err = _run(capsys, "recipe", platform, "--out", str(out), "--quiet")
    assert rc == 0, err
    man = _check_bundle(out, platform)
    rep = json.loads((out / "validation.json").read_text())
    if platform == "ios":  # Metal cannot be emulated: said, not hidden; four memory tiers
        assert any("skipped" in r and "Metal" in r["skipped"] for r in rep["runs"])
        assert [m["n_ubatch"] for m in man["memory"]] == [128, 256, 512, 1024]
        assert "func contextSettings" in (out / "ModelFiles.swift").read_text()
    else:
        assert "harmonyos" in man["artifacts"][0]["validation"]
        assert man["memory"][0]["budget_mb"] == 1536


def _quick_recipe(tmp_path: Path, budget: int = 3072, name: str = "r.toml") -> Path:
    p = tmp_path / name
    p.write_text(f"""platform = "android"
description = "test recipe"
phones = []
[gguf]
decoder = "Q4_K_M"
projector = "F16"
modes = ["16x"]
[validation]
scenarios = "quick"
phone_scenarios = "quick"
[[devices]]
name = "small phone"
memory_budget_mb = {budget}
n_ctx = 4096
n_batch = 512
n_ubatch = 512
""")
    return p


def test_same_inputs_same_bytes_and_manifest(capsys, tmp_path):
    """Two independent runs: identical artifact bytes and an identical manifest."""
    recipe = _quick_recipe(tmp_path)
    for d in ("a", "b"):
        rc, _, err = _run(capsys, "recipe", str(recipe), "--out", str(tmp_path / d), "--quiet")
        assert rc == 0, err
    a, b = tmp_path / "a", tmp_path / "b"
    assert (a / "manifest.json").read_bytes() == (b / "manifest.json").read_bytes()
    for f in json.loads((a / "manifest.json").read_text())["artifacts"]:
        assert (a / f["file"]).read_bytes() == (b / f["file"]).read_bytes()


def test_budget_too_small_fails_with_the_numbers(capsys, tmp_path):
    recipe = _quick_recipe(tmp_path, budget=2)
    out = tmp_path / "small"
    rc, stdout, _ = _run(capsys, "recipe", str(recipe), "--out", str(out), "--quiet")
    assert rc == 3
    line = next(ln for ln in stdout.splitlines() if ln.startswith("bundle FAILED"))
    assert re.search(r"small phone: estimate \d+ MB \(weights \d+ \+ K/V \d+ at n_ctx 4096 .*over the budget of 2 MB",
                     line), line
    man = json.loads((out / "manifest.json").read_text())
    assert man["status"] == "fail" and man["memory"][0]["status"] == "fail"
    # a failed bundle is rebuilt on the next run, not reported up to date
    rc, stdout, _ = _run(capsys, "recipe", str(recipe), "--out", str(out), "--quiet")
    assert rc == 3 and "up to date" not in stdout and "reusing" in stdout


@pytest.mark.parametrize("body,needle", [
    ("platform = 'android'\nfoo = 1\n", "unknown key 'foo'"),
    ("platform = 'android'\ndescription = 1\n", "description must be a str"),
    ("[mnn]\nenabled = true\n", "[mnn] artifacts are not built by this toolchain yet"),
])
def test_bad_recipe_one_line_exit_2_nothing_written(body, needle, capsys, tmp_path):
    good = _quick_recipe(tmp_path).read_text()
    bad = tmp_path / "bad.toml"
    lines = [ln for ln in good.splitlines() if not ln.startswith(("platform", "description"))]
    head = body if body.startswith("platform") else "platform = 'android'\ndescription = 'x'\n" + body
    if "description" not in head:
        head += "description = 'x'\n"
    bad.write_text(head + "\n".join(lines) + "\n")
    out = tmp_path / "out"
    rc, stdout, err = _run(capsys, "recipe", str(bad), "--out", str(out))
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert not out.exists()


def test_unknown_platform_and_foreign_out(capsys, tmp_path):
    rc, _, err = _run(capsys, "recipe", "windows-phone", "--out", str(tmp_path / "o"))
    assert rc == 2 and err.startswith("error: unknown platform 'windows-phone'") and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()
    foreign = tmp_path / "f"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    rc, _, err = _run(capsys, "recipe", str(_quick_recipe(tmp_path)), "--out", str(foreign))
    assert rc == 2 and "not a release bundle" in err and (foreign / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_bundle_with_every_format(capsys, tmp_path):
    """A recipe with ONNX (int4, .ort), the .pte and the Core ML vision encoder beside the GGUFs: every
    part built in its own layout and validated on x86; under the phone, ONNX and the .pte run in their
    aarch64 runtimes and Core ML, which has none there, is listed as not checked, with why."""
    recipe = tmp_path / "all.toml"
    recipe.write_text(_quick_recipe(tmp_path).read_text().replace('phones = []', 'phones = ["android-armv82"]')
                      .replace('modes = ["16x"]', 'modes = ["16x"]\nimatrix = true')
                      + '[onnx]\nenabled = true\nquant = "int4"\nort = true\n'
                      + '[executorch]\nenabled = true\nquant = "8da4w"\n'
                      + '[coreml]\nenabled = true\nparts = ["vision"]\n')
    out = tmp_path / "all"
    rc, _, err = _run(capsys, "recipe", str(recipe), "--out", str(out), "--quiet")
    assert rc == 0, err
    man = json.loads((out / "manifest.json").read_text())
    parts = {a["part"] for a in man["artifacts"]}
    assert parts == {"gguf", "onnx", "executorch", "coreml"}
    assert any(a["role"] == "imatrix" and a["file"] == "imatrix.gguf" for a in man["artifacts"])
    dec = next(a for a in man["artifacts"] if a["role"] == "decoder")
    from gguf import GGUFReader

    assert "quantize.imatrix.file" in GGUFReader(out / dec["file"]).fields  # quantized with it
    for a in man["artifacts"]:
        data = (out / a["file"]).read_bytes()
        assert hashlib.md5(data).hexdigest() == a["md5"] and hashlib.sha256(data).hexdigest() == a["sha256"]
    onnx = next(a for a in man["artifacts"] if a["part"] == "onnx" and a["file"].endswith(".onnx"))
    assert "android-armv82" in onnx["validation"]
    pte = next(a for a in man["artifacts"] if a["part"] == "executorch" and a["file"].endswith(".pte"))
    assert pte["validation"]["android-armv82"] == "pass"
    cm = next(a for a in man["artifacts"] if a["part"] == "coreml")
    assert "android-armv82" not in cm["validation"] and cm["validation"]
    rep = json.loads((out / "validation.json").read_text())
    assert any(r.get("skipped", "").startswith("coreml: no aarch64 runtime") for r in rep["runs"])
    assert "Not checked: android-armv82: coreml" in (out / "README.md").read_text()


def test_model_card_takes_license_and_base_model_from_the_source(tmp_path):
    """The source's own card names the license; a checkpoint in the Hugging Face cache names its hub id."""
    from convert.bundle.docs import hub_id, source_card

    (tmp_path / "README.md").write_text("---\nlicense: apache-2.0\nlibrary_name: transformers\n---\n# card\n")
    assert source_card(tmp_path)["license"] == "apache-2.0"
    (tmp_path / "README.md").write_text("# no front matter\n")
    assert source_card(tmp_path) == {}
    snap = tmp_path / "hub" / "models--openbmb--MiniCPM-V-4.6" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    assert hub_id(snap) == "openbmb/MiniCPM-V-4.6" and hub_id(tmp_path) is None
