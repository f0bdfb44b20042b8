"""The CI workflow files app pipelines copy: valid YAML (yamllint), valid GitHub Actions workflows (the
GitHub workflow JSON schema check-jsonschema ships), and consistent with the recipes they run. They
cannot run here (no GitHub runner); these checks are what can be had."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from convert.recipe import PLATFORMS, load_recipe

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
YAMLLINT = "{extends: default, rules: {line-length: {max: 120}, document-start: disable, truthy: {check-keys: false}}}"


def _schema_check(*paths: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows",
                           *map(str, paths)], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_lints_and_fits_the_github_schema(path):
    lint = subprocess.run([sys.executable, "-m", "yamllint", "-d", YAMLLINT, str(path)], capture_output=True,
                          text=True, timeout=120)
    assert lint.returncode == 0, lint.stdout
    res = _schema_check(path)
    assert res.returncode == 0, res.stdout + res.stderr


def test_schema_check_catches_a_broken_workflow(tmp_path):
    """The schema check is not a formality: a misspelt key fails it."""
    doc = yaml.safe_load((ROOT / ".github/workflows/export.yml").read_text())
    doc["jobs"]["bundle"]["runs-onn"] = doc["jobs"]["bundle"].pop("runs-on")
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump(doc))
    assert _schema_check(bad).returncode != 0


def test_export_workflow_matches_the_recipes():
    """A matrix over every platform, each with its recipe's phone profiles built and cached; the job runs
    the recipe command, fails on its exit code and uploads the bundle whatever happened."""
    wf = yaml.safe_load((ROOT / ".github/workflows/export.yml").read_text())
    job = wf["jobs"]["bundle"]
    matrix = job["strategy"]["matrix"]
    assert sorted(matrix["platform"]) == sorted(PLATFORMS) and job["strategy"]["fail-fast"] is False
    for inc in matrix["include"]:
        assert inc["phones"].split() == list(load_recipe(inc["platform"]).phones), inc
    steps = job["steps"]
    runs = "\n".join(s.get("run", "") for s in steps)
    assert "python -m convert recipe ${{ matrix.platform }}" in runs
    assert "python -m runtimes.phone setup ${{ matrix.phones }}" in runs
    build = next(s for s in steps if "convert recipe" in s.get("run", ""))
    assert "continue-on-error" not in build and "|| true" not in build["run"]  # a failed check fails the job
    upload = next(s for s in steps if str(s.get("uses", "")).startswith("actions/upload-artifact"))
    assert upload["if"] == "always()" and "bundle/${{ matrix.platform }}" in upload["with"]["path"]
    cached = [s["with"]["path"] for s in steps if str(s.get("uses", "")).startswith("actions/cache")]
    assert any("phone" in p for p in cached)  # the phone profiles' builds
    setup_py = next(s for s in steps if str(s.get("uses", "")).startswith("actions/setup-python"))
    assert setup_py["with"]["cache"] == "pip"  # pip's wheels, the llama-cpp-python build among them
    assert wf["jobs"]["coreml-vision"]["runs-on"].startswith("macos")
