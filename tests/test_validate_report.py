"""validate.report: console summary and self-contained HTML from a hand-built harness report."""

from __future__ import annotations

import copy
import json
import math
import re

import pytest

from validate.report import render_html, summary_text, verdict_line, write_html

PASS_ART = "MiniCPM-V-4.6-synth-tiny-Q4_K_M"
CRASH_ART = "MiniCPM-V-4.6-synth-tiny-Q2_K"
INJECT = "<script>alert('x')</script> & \"quoted\""


def _series(n: int, seed: float, mismatch_every: int = 0) -> dict:
    kl = [abs(math.sin(seed + i)) * 10 ** -(2 + (i % 3)) for i in range(n)]
    kl[0] = 0.0  # exact match at the first position must survive the log axis
    margin = [1.5 + math.cos(seed * i) for i in range(n)]
    match = [0 if mismatch_every and i % mismatch_every == 0 else 1 for i in range(n)]
    return {"kl": kl, "margin": margin, "top1_match": match}


def _report() -> dict:
    metrics = {"kl_mean": 0.0031, "kl_p99": 0.021, "kl_max": 0.05, "top1_agreement": 0.99, "rel_err": 0.04,
               "max_abs_err": 0.7, "cosine": 0.9991}
    return {
        "tool": "minicpmv-edge", "version": "0.1.0",
        "model": {"path": "/models/synth-tiny", "name": "MiniCPM-V-4.6-synth-tiny"},
        "scenario_set": "default",
        "profile": {"threads": 2, "n_ctx": 4096, "memory_budget_mb": 3072, "timeout_s": 600},
        "status": "fail", "exit_code": 3, "wall_s": 42.1,
        "artifacts": [
            {
                "name": PASS_ART, "runtime": "llama.cpp",
                "files": {"decoder": "out/model-Q4_K_M.gguf", "mmproj": {"16x": "out/mmproj-16x.gguf", "4x": "out/mmproj-4x.gguf"}},
                "quant": "Q4_K_M", "size_bytes": 12_345_678, "size_ratio_f16": 0.31, "status": "pass", "error": None,
                "peak_rss_mb": 512.3, "wall_s": 12.0,
                "speed": {"prefill_tok_s": 900.0, "decode_tok_s": 80.0, "image_encode_s": 0.2,
                          "ratio_f16": {"prefill_tok_s": 1.4, "decode_tok_s": 1.9, "image_encode_s": 0.8}},
                "checks": [
                    {"check": "manifest", "status": "pass", "message": "ok"},
                    {"check": "tensors", "status": "pass", "message": "412 tensors"},
                    {"check": "metadata", "status": "known-difference", "message": "general.name differs " + INJECT,
                     "details": ["general.name: a vs b"]},
                ],
                "scenarios": [
                    {"scenario": "text-chat", "kind": "text", "status": "pass", "positions": 40,
                     "metrics": {"fp32": metrics, "fake-quant": {**metrics, "kl_mean": 0.0004}},
                     "greedy": {"steps": 8, "reference": [1, 2, 3, 4, 5, 6, 7, 8], "artifact": [1, 2, 3, 4, 5, 6, 7, 8],
                                "first_divergence": None, "reference_text": "hello <b>world</b>", "artifact_text": "hello"},
                     "speed": {"prefill_tok_s": 910.0, "decode_tok_s": 81.0},
                     "series": _series(40, 0.3)},
                    {"scenario": "image-single", "kind": "image", "status": "known-difference",
                     "reason": "llama.cpp resizes with bicubic " + INJECT, "positions": 30,
                     "metrics": {"fp32": {**metrics, "kl_mean": 0.02, "top1_agreement": 0.95}},
                     "greedy": {"steps": 8, "reference": [1, 2, 3, 4, 5, 6, 7, 8], "artifact": [1, 2, 3, 9, 9, 9, 9, 9],
                                "first_divergence": 3},
                     "images": [{"image": 0, "chunk": 0, "role": "overview", "tokens_reference": 64, "tokens_artifact": 64,
                                 "cosine": 0.9998, "rel_err": 0.012, "pixels": "runtime"},
                                {"image": 0, "chunk": 1, "role": "slice", "tokens_reference": 64, "tokens_artifact": 16,
                                 "cosine": 0.991, "rel_err": 0.05, "pixels": "reference"}],
                     "layout": {"reference": {"grid": [3, 2], "tokens": [64, 64]}, "artifact": {"grid": [2, 2], "tokens": [64, 16]}},
                     "series": {"kl": _series(30, 1.1)["kl"], "top1_match": _series(30, 1.1, 7)["top1_match"]}},
                    {"scenario": "video", "kind": "video", "status": "skipped", "reason": "runtime has no video input"},
                ],
            },
            {
                "name": CRASH_ART, "runtime": "llama.cpp", "quant": "Q2_K", "status": "crashed",
                "error": "llama_decode returned -3 " + INJECT, "peak_rss_mb": 4000.0,
                "checks": [{"check": "tensors", "status": "fail", "message": "blk.0.ffn_down: type Q2_K expected Q3_K",
                            "details": ["blk.0.ffn_down.weight"]}],
                "scenarios": [
                    {"scenario": "text-chat", "kind": "text", "status": "fail", "positions": 20,
                     "failures": ["text-chat: kl_mean 0.91 > 0.05 (fp32) for " + CRASH_ART],
                     "metrics": {"fp32": {"kl_mean": 0.91, "top1_agreement": 0.62}},
                     "series": _series(20, 2.0, 3)},
                ],
            },
        ],
    }


@pytest.fixture(scope="module")
def report():
    return _report()


@pytest.fixture(scope="module")
def html_text(report, tmp_path_factory):
    path = write_html(report, tmp_path_factory.mktemp("rep") / "sub" / "report.html")
    return path.read_bytes()


def test_summary_text(report):
    text = summary_text(report)
    lines = text.splitlines()
    assert all(len(line) < 120 for line in lines), max(lines, key=len)
    verdict = lines[-1]
    assert verdict == verdict_line(report)
    assert verdict.startswith("validation FAILED (exit 3): 3 of 6 scenario rows and 1 static check failed (")
    assert verdict.endswith("(*-Q2_K: crashed, text-chat, check tensors)")  # shared name prefix globbed away
    assert "text-chat: kl_mean 0.91 > 0.05" in text
    assert "llama_decode returned -3" in text
    assert "runtime has no video input" in text
    # one row per artifact x scenario, each carrying its artifact name
    for art in (PASS_ART, CRASH_ART):
        for sc in ("text-chat", "image-single", "video"):
            assert any(art in line and sc in line for line in lines), (art, sc)
    row = next(line for line in lines if PASS_ART in line and "text-chat" in line and "pass" in line)
    assert "0.0031" in row and "99.0%" in row and "8/8" in row
    assert "4000/3072!" in text  # over the memory budget


def test_verdict_passed_and_minimal_report():
    ok = {"status": "pass", "artifacts": [{"name": "a", "status": "pass",
                                           "scenarios": [{"scenario": "s", "status": "pass"},
                                                         {"scenario": "t", "status": "skipped"}]}]}
    assert verdict_line(ok) == "validation passed: 2 scenario rows across 1 artifact (1 pass, 1 skipped)"
    # only the required keys, no scenarios at all, nothing plottable
    bare = {"status": "fail", "artifacts": [{"name": "x", "status": "timeout"}]}
    assert summary_text(bare).splitlines()[-1] == "validation FAILED: 1 of 1 scenario row failed (x: timeout)"
    doc = render_html(bare)
    assert "timeout" in doc and "data:image/png" not in doc


def test_verdict_truncates_long_lists():
    rep = {"status": "fail", "artifacts": [
        {"name": f"very-long-artifact-name-number-{i:02d}-Q4_K_M", "status": "fail",
         "scenarios": [{"scenario": f"scenario-{j}", "status": "fail"} for j in range(5)]} for i in range(6)]}
    v = verdict_line(rep)
    assert len(v) < 120 and v.startswith("validation FAILED: 30 of 30 scenario rows failed (") and v.endswith("more)")


def test_html_self_contained_and_complete(report, html_text):
    doc = html_text.decode("utf-8")
    assert doc.startswith("<!DOCTYPE html>")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", doc, re.I)
    assert "http://" not in doc and "https://" not in doc
    assert "<script" not in doc.lower() and "<link" not in doc.lower()
    assert doc.count("data:image/png;base64,") == 2  # one figure per artifact with series
    for name in (PASS_ART, CRASH_ART, "text-chat", "image-single", "video"):
        assert name in doc
    assert "text-chat: kl_mean 0.91 &gt; 0.05 (fp32) for " + CRASH_ART in doc
    assert "blk.0.ffn_down: type Q2_K expected Q3_K" in doc
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &quot;quoted&quot;" in doc
    assert "hello &lt;b&gt;world&lt;/b&gt;" in doc
    for cls in ("st-pass", "st-fail", "st-known-difference", "st-skipped", "st-crashed"):
        assert f'class="cell {cls}"' in doc, cls
    assert "KL 0.0031 / top1 99.0%" in doc
    assert "first divergence at step 3" in doc
    assert "not reached" in doc  # image-single / video never ran on the crashed artifact
    assert "not reached before the crash: image-single, video" in doc
    assert doc.count('class="tok div"') == 10  # from the divergence on, both sides


def test_html_deterministic_and_atomic(report, html_text, tmp_path):
    again = write_html(copy.deepcopy(report), tmp_path / "r.html")
    assert again.read_bytes() == html_text  # PNGs included: no timestamps or versions in them
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]  # no temp file left behind
    # the JSON round trip (what the harness writes) renders the same
    assert render_html(json.loads(json.dumps(report))).encode() == html_text


def test_malformed_pieces_do_not_break_rendering():
    weird = {"status": "fail", "profile": {"memory_budget_mb": 0}, "artifacts": [
        {"name": "a", "status": "PASS", "files": "x.gguf", "size_bytes": "big", "speed": {"ratio_f16": None},
         "checks": [None, {"status": "FAIL"}],
         "scenarios": [
             {"scenario": "s1", "status": "known_difference",
              "metrics": {"fp32": None, "other": {"kl_mean": "n/a", "extra": [1]}},
              "series": {"kl": [None, float("nan"), 0, -1, float("inf")], "margin": [], "top1_match": [1, None, 0]},
              "greedy": {"reference": [1, 2], "artifact": [1]}, "images": [{"cosine": None}],
              "layout": {"reference": {"grid": "3x2"}}},
             {"scenario": "s2", "status": "fail", "failures": "a lone string message"},
             "junk"]},
        {"name": "b", "status": "timeout", "scenarios": None},
        "junk"]}
    text = summary_text(weird)
    assert "a / s2: a lone string message" in text
    assert text.splitlines()[-1] == "validation FAILED: 3 of 4 scenario rows and 1 static check failed (a: s2, check ?; b: timeout)"
    doc = render_html(weird)
    assert doc.count("data:image/png;base64,") == 1 and "not reached before the timeout: s1, s2" in doc
    assert verdict_line({"status": "fail", "artifacts": []}) == "validation FAILED: the report lists no artifacts"
    assert render_html({}).endswith("</html>\n")
