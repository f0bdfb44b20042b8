"""Fuzzing the three CLIs (issue 11): corrupted safetensors and GGUF files, random edits of
config.json, tokenizer_config.json and preprocessor_config.json, random option combinations.

Every run must exit 0, 2, 3 or 4 (1 is the catch-all's "internal error": a bug), print no
traceback, leave no temporary file in or beside its output folder, and on exit 2 add no file at
all. Runs call each CLI's main(argv) in-process (a subprocess costs seconds of imports); a few
real subprocesses check what reaches stderr. Seeded: FUZZ_SEED=N picks other cases, FUZZ_SCALE=K
runs K times as many; the counts of runs and exit codes are printed at the end of the module.
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

SEED = int(os.environ.get("FUZZ_SEED", "11"))
SCALE = float(os.environ.get("FUZZ_SCALE", "1"))
OK_CODES = {0, 2, 3, 4}
TEMP_NAME = re.compile(r"\.partial$|\.tmp|\.old$|^tmp")
# what a failing validation documents writing (exit 3/4): its reports (--json, --report), and the
# files it validated (kept, marked in manifest.json)
REPORTS = {".json", ".html", ".gguf", ".safetensors"}
VALIDATE_FAST = ["--scenarios", "text-chat", "--no-speed-anchor", "--timeout", "120", "--quiet"]
VERBOSE = os.environ.get("FUZZ_VERBOSE") == "1"  # one line per run
COUNTS: dict[str, Counter] = {}
RUN_LIMIT_S = 120  # a run still going after this hangs (on the tiny model the slowest take ~15 s)
ROOT = Path(__file__).resolve().parents[1]


class Hang(BaseException):
    """A run past RUN_LIMIT_S (a BaseException: the CLI's catch-all must not turn it into exit 1)."""


def _hang(signum, frame):
    raise Hang()


def _n(k: int) -> int:
    return max(1, round(k * SCALE))


def _main(cli: str):
    if cli == "convert":
        from convert.cli import main
    elif cli == "validate":
        from validate.cli import main
    else:
        from quantize.cli import main
    return main


def _snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*")} if folder.exists() else {}


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    yield
    total = Counter()
    for c in COUNTS.values():
        total.update(c)
    if not total:
        return
    lines = [f"fuzz (seed {SEED}): {sum(total.values())} runs: " +
             ", ".join(f"{total[k]} exit {k}" for k in sorted(total, key=str))]
    lines += [f"  {fam}: {sum(c.values())} runs: " + ", ".join(f"{c[k]} exit {k}" for k in sorted(c, key=str))
              for fam, c in COUNTS.items()]
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():
        print("\n" + "\n".join(lines))


class Fuzz:
    """Runs cases and checks the contract on each; every broken case is reported at the end."""

    def __init__(self, family: str, capsys, tmpdir: Path):
        self.family, self.capsys, self.tmpdir = family, capsys, tmpdir
        self.failures: list[str] = []
        COUNTS.setdefault(family, Counter())

    def run(self, cli: str, argv: list[str], box: Path, what: str) -> int:
        """`box`: the folder holding the run's outputs (and temporary files) and nothing it may touch."""
        before, tmp_before = _snapshot(box), _snapshot(self.tmpdir)
        self.capsys.readouterr()
        hung = False
        signal.signal(signal.SIGALRM, _hang)
        signal.alarm(RUN_LIMIT_S)
        try:
            code = _main(cli)(argv)
        except SystemExit as e:  # argparse
            code = e.code if isinstance(e.code, int) else 2
        except Hang:
            code, hung = "hang", True
        finally:
            signal.alarm(0)
        err = self.capsys.readouterr().err
        COUNTS[self.family][code] += 1
        after = _snapshot(box)
        new = sorted(set(after) - set(before))
        lines = err.strip().splitlines()
        problems = [
            (hung, f"still running after {RUN_LIMIT_S} s"),
            (code not in OK_CODES and not hung, f"exit {code}"),
            ("Traceback" in err, "a traceback on stderr"),
            (code == 2 and not (lines and (lines[-1].startswith("error: ") or "usage:" in err)), "no error line"),
            (sum(ln.startswith("error: ") for ln in lines) > 1, "several error lines"),
            (any(TEMP_NAME.search(Path(n).name) for n in after), "temporary files left"),
            (code == 2 and bool(new), f"a failed run wrote {new}"),
            (code in (3, 4) and any(Path(n).suffix not in REPORTS for n in new if (box / n).is_file()),
             f"wrote {new}"),
            (bool(set(_snapshot(self.tmpdir)) - set(tmp_before)), "files left in the temp folder"),
        ]
        bad = [msg for cond, msg in problems if cond]
        if VERBOSE:
            with self.capsys.disabled():
                print(f"[{self.family}] exit {code}: {what}: {cli} {' '.join(argv)}\n    {lines[-1][:200] if lines else ''}")
        if bad:
            self.failures.append(f"{'; '.join(bad)} -- {what}: python -m {cli} {' '.join(argv)}\n"
                                 f"    stderr: {err.strip()[-1500:]}")
        return code

    def check(self) -> None:
        assert not self.failures, f"{len(self.failures)} broken case(s):\n" + "\n".join(self.failures)


@pytest.fixture
def fuzz_tmp(tmp_path, monkeypatch):
    """The temp folder the CLIs see (the harness's scratch, error logs): must stay empty."""
    import tempfile

    d = tmp_path / "systmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_dir, tiny_gguf):
    """Inputs shared by the cases: an F16 export folder and an importance matrix of the tiny model."""
    from convert import Checkpoint
    from convert.gguf.export import plan_outputs
    from quantize.imatrix import ImatrixData, ImatrixEntry, write_imatrix_gguf

    import numpy as np

    root = tmp_path_factory.mktemp("fuzz-good")
    dec, mm = tiny_gguf("f16")
    gdir = root / "gguf"
    gdir.mkdir()
    for p in [dec, mm["16x"]]:
        shutil.copy(p, gdir / p.name)
    rng = np.random.default_rng(SEED)
    plans = plan_outputs(Checkpoint(tiny_dir), root / "x", "q4_k_m")[0].plans
    entries = {p.name: ImatrixEntry(rng.random(p.shape[-1]) + 0.5, [8]) for p in plans if len(p.shape) == 2}
    imat = write_imatrix_gguf(root / "imatrix.gguf", ImatrixData(entries, ["fuzz"], chunk_count=8, chunk_size=64))
    return {"gguf": gdir, "imatrix": imat}


# -- corruptions ---------------------------------------------------------------------------------

def _truncate(path: Path, rng: random.Random, head: int) -> str:
    size = path.stat().st_size
    at = rng.randrange(0, head) if rng.random() < 0.5 else rng.randrange(0, size)
    with open(path, "r+b") as f:
        f.truncate(at)
    return f"truncated at {at} of {size}"


def _flip(path: Path, rng: random.Random, lo: int, hi: int, k: int = 1) -> str:
    data = bytearray(path.read_bytes())
    offs = sorted(rng.randrange(lo, hi) for _ in range(k))
    for o in offs:
        data[o] ^= rng.randrange(1, 256)
    path.write_bytes(bytes(data))
    return f"flipped bytes at {offs}"


def _safetensors_header(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def _gguf_regions(path: Path) -> dict[str, tuple[int, int]]:
    """The fixed header (magic, version, counts), the key/values, the tensor-info table, the data."""
    from gguf import GGUFReader

    r = GGUFReader(path)
    ti = r.tensors[0].field.offset
    return {"header": (0, 24), "kv": (24, ti), "tensor infos": (ti, r.data_offset),
            "data": (r.data_offset, path.stat().st_size)}


def _json_paths(obj, prefix=()):
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield (*prefix, k)
        yield from _json_paths(v, (*prefix, k))


def _other_type(v, rng):
    pool = [None, "bogus", "", [], {}, True, -1, 0, 2.5, [1, 2], {"a": 1}, 10**12]
    return rng.choice([x for x in pool if type(x) is not type(v)])


def _wrong_value(v, rng):
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return rng.choice([0, -1, v + 1, v * 2, v // 2, 2**31])
    if isinstance(v, float):
        return rng.choice([0.0, -v, v * 1e6, 1e300])
    if isinstance(v, str):
        return rng.choice(["", "bogus", v + "x", v.upper(), "<|im_end|>", "{{ raise_exception('x') }}"])
    if isinstance(v, list):
        return rng.choice([[], v[:-1], v + v[-1:], list(reversed(v))])
    if isinstance(v, dict):
        return rng.choice([{}, {"bogus": 1}])
    return 1


def mutate_json(path: Path, rng: random.Random, edits: int) -> str:
    obj = json.loads(path.read_text())
    done = []
    for _ in range(edits):
        paths = list(_json_paths(obj))
        if not paths:
            break
        p = rng.choice(paths)
        parent = obj
        for k in p[:-1]:
            parent = parent[k]
        op = rng.choice(["delete", "type", "value", "value"])
        if op == "delete":
            del parent[p[-1]]
        else:
            parent[p[-1]] = (_other_type if op == "type" else _wrong_value)(parent[p[-1]], rng)
        done.append(f"{op} {'.'.join(map(str, p))}")
    path.write_text(json.dumps(obj))
    return f"{path.name}: {'; '.join(done)}"


# -- the commands a corrupted checkpoint goes through -----------------------------------------------

def _model_command(model: Path, out: Path, good: dict, rng: random.Random) -> tuple[str, list[str]]:
    m = ["--model", str(model)]
    return rng.choices([
        ("convert", ["gguf", *m, "--out", str(out / "gguf"), "--no-validate", "--quiet"]),
        ("convert", ["gguf", *m, "--out", str(out / "gguf"), "--dry-run", "--quant", "q4_k_m"]),
        ("convert", ["gguf", *m, "--out", str(out / "gguf"), "--quant", rng.choice(["q8_0", "q4_k_m"]),
                     "--no-validate", "--quiet"]),
        ("quantize", ["imatrix", *m, "--out", str(out / "imatrix.gguf"), "--samples", "1", "--seqlen", "128",
                      "--calib", "text", "--quiet"]),
        ("quantize", ["gptq", *m, "--out", str(out / "gptq"), "--calib-samples", "4", "--seqlen", "160",
                      "--calib", "text", "--group-size", "32", "--no-validate", "--quiet"]),
        ("validate", [str(good["gguf"]), *m, "--json", str(out / "v.json"), "--report", str(out / "v.html"),
                      *VALIDATE_FAST]),
    ], weights=[3, 2, 1, 1, 1, 1])[0]


def _corrupt_checkpoint_cases(family, tmp_path, tiny_dir, good, capsys, fuzz_tmp, n, corrupt):
    fz = Fuzz(family, capsys, fuzz_tmp)
    rng = random.Random(f"{SEED}-{family}")
    for i in range(n):
        box = tmp_path / f"case{i}"
        model = box / "model"
        shutil.copytree(tiny_dir, model)
        what = corrupt(model, rng)
        out = box / "out"
        out.mkdir()
        fz.run(*_model_command(model, out, good, rng), out, what)
        shutil.rmtree(box)
    fz.check()


def test_fuzz_safetensors(tmp_path, tiny_dir, good, capsys, fuzz_tmp):
    def corrupt(model, rng):
        f = model / "model.safetensors"
        head = _safetensors_header(f)
        kind = rng.choice(["truncate", "flip", "flip", "nan"])
        if kind == "truncate":
            return _truncate(f, rng, head)
        if kind == "flip":
            return _flip(f, rng, 0, head, k=rng.choice([1, 1, 3]))
        # a BF16 NaN in the data: refused (exit 2) unless nothing reads that tensor
        at = head + 2 * rng.randrange(0, (f.stat().st_size - head) // 2)
        with open(f, "r+b") as fh:
            fh.seek(at)
            fh.write(b"\xc0\x7f")
        return f"NaN at byte {at}"

    _corrupt_checkpoint_cases("safetensors", tmp_path, tiny_dir, good, capsys, fuzz_tmp, _n(32), corrupt)


def test_fuzz_config_json(tmp_path, tiny_dir, good, capsys, fuzz_tmp):
    _corrupt_checkpoint_cases("config.json", tmp_path, tiny_dir, good, capsys, fuzz_tmp, _n(40),
                              lambda model, rng: mutate_json(model / "config.json", rng, rng.choice([1, 1, 2, 3])))


def test_fuzz_tokenizer_config_json(tmp_path, tiny_dir, good, capsys, fuzz_tmp):
    _corrupt_checkpoint_cases("tokenizer_config.json", tmp_path, tiny_dir, good, capsys, fuzz_tmp, _n(24),
                              lambda model, rng: mutate_json(model / "tokenizer_config.json", rng, rng.choice([1, 2])))


def test_fuzz_preprocessor_config_json(tmp_path, tiny_dir, good, capsys, fuzz_tmp):
    _corrupt_checkpoint_cases("preprocessor_config.json", tmp_path, tiny_dir, good, capsys, fuzz_tmp, _n(10),
                              lambda model, rng: mutate_json(model / "preprocessor_config.json", rng, rng.choice([1, 2])))


def test_fuzz_gguf(tmp_path, tiny_dir, good, capsys, fuzz_tmp):
    """Corrupted decoder, projector and importance-matrix GGUFs through validate and convert."""
    fz = Fuzz("gguf", capsys, fuzz_tmp)
    rng = random.Random(f"{SEED}-gguf")
    for i in range(_n(24)):
        box = tmp_path / f"case{i}"
        arts = box / "arts"
        shutil.copytree(good["gguf"], arts)
        imat = shutil.copy(good["imatrix"], box / "imatrix.gguf")
        out = box / "out"
        out.mkdir()
        target = rng.choice(sorted(arts.glob("*.gguf")) + [Path(imat)])
        regions = _gguf_regions(target)
        kind = rng.choices(["truncate", "header", "tensor infos", "kv", "data"], weights=[4, 2, 2, 1, 1])[0]
        if kind == "truncate":
            what = _truncate(target, rng, regions["data"][0])
        else:
            what = f"{kind}: " + _flip(target, rng, *regions[kind], k=rng.choice([1, 2]))
        what = f"{target.name} {what}"
        if target.name == "imatrix.gguf":
            cli, argv = "convert", ["gguf", "--model", str(tiny_dir), "--quant", "q4_k_m", "--imatrix", str(imat),
                                    "--out", str(out / "gguf"), "--no-validate", "--quiet"]
        else:
            cli, argv = "validate", [str(arts), "--model", str(tiny_dir), "--json", str(out / "v.json"),
                                     "--report", str(out / "v.html"), *VALIDATE_FAST]
        fz.run(cli, argv, out, what)
        shutil.rmtree(box)
    fz.check()


# -- random options --------------------------------------------------------------------------------

def _options_case(rng: random.Random, tiny_dir: Path, good: dict, box: Path) -> tuple[str, list[str]]:
    """A command line: a valid base, then 1-4 options, each a valid value most of the time."""
    out = box / "out"
    out.mkdir()
    junk = box / "junk.txt"
    junk.write_text("not a model\n")

    def v(valid: list, invalid: list = ()) -> str:
        return rng.choice(list(invalid) if invalid and rng.random() < 0.25 else valid)

    model = v([str(tiny_dir)], [str(box / "missing"), str(junk), str(box)])
    cli = rng.choice(["convert", "convert", "validate", "quantize", "quantize"])
    if cli == "convert":
        mixture = ["q4_k_m", "Q8_0", "q2_k", "q5_1", "Q3_K_S", "q6_k"]
        argv = ["gguf", "--model", model, "--out", v([str(out / "g")], [str(junk)]), "--quant", v(mixture, ["f16"]),
                *(["--no-validate"] if rng.random() < 0.9 else ["--threads", "1", *VALIDATE_FAST[:3]]), "--quiet"]
        opts = [["--quant", v(["f16", "F32", "bf16", *mixture], ["iq4_xs", "bogus", "Q4_K_X"])],
                ["--outtype", v(["f16", "q4_k_m"], ["x"])], ["--mmproj-quant", v(["f16", "q8_0", "q4_k_m", "q2_k"], ["x"])],
                ["--pure"], ["--output-tensor-type", v(["q8_0", "f16", "q4_k", "q6_k"], ["zz", "iq2_xxs"])],
                ["--token-embedding-type", v(["q6_k", "f32", "q8_0"], ["q", "tq1_0"])],
                ["--tensor-type", v(["ffn_down=q8_0", r"blk\.0\..*=q2_k", "ssm_out=f16", "attn_qkv=q5_0"],
                                    ["(=q4_k", "=q4_k", "attn.*", "ssm=f32", "ffn_up=q4_k"])],
                ["--mode", v(["16x", "4x", "both"], ["8x"])], ["--name", v(["x"], ["", "a\nb"])], ["--force"],
                ["--allow-nonfinite"], ["--dry-run"],
                ["--imatrix", v([str(good["imatrix"])], [str(box / "none.gguf"), str(junk), str(tiny_dir)])],
                ["--threads", v(["1", "2"], ["0", "-1", "x"])], ["--scenarios", v(["text-chat", "text"], ["bogus"])],
                ["--awq-source", str(box)]]
    elif cli == "validate":
        dec = sorted(good["gguf"].glob("MiniCPM*.gguf"))[0]
        mm = sorted(good["gguf"].glob("mmproj*.gguf"))[0]
        target = v([[str(good["gguf"])], ["--decoder", str(dec), "--mmproj", str(mm)]],
                   [[str(box / "missing")], [str(tiny_dir)], [str(box)], [str(junk)], [], ["--decoder", str(mm)],
                    ["--mmproj", str(mm)], ["--decoder", str(junk)]])
        argv = [*target, "--model", model, "--json", str(out / "v.json"), "--report", str(out / "v.html"), *VALIDATE_FAST]
        opts = [["--threads", v(["1", "2"], ["0", "-2"])], ["--ctx", v(["2048", "4096"], ["0", "-5", "64"])],
                ["--memory-budget", v(["3072", "1e6"], ["0", "-1", "1", "nan"])],
                ["--timeout", v(["60"], ["0", "-1", "0.001", "nan", "inf"])],
                ["--runtime", v(["llama.cpp"], ["bogus", "tests.fake_runtimes:CrashingRuntime", "os:path"])],
                ["--imatrix", v([str(good["imatrix"])], [str(junk), str(dec)])],
                ["--scenarios", v(["text-chat"], ["bogus", "image-448-16x", "text-chat,bogus", ""])], ["--quiet"],
                ["--json", str(junk.with_suffix(".json"))], ["--report", str(out / "nested" / "r.html")]]
    else:
        sub = rng.choice(["imatrix", "gptq", "awq"])
        argv = [sub, "--model", model, "--out", str(out / ("imatrix.gguf" if sub == "imatrix" else "q")), "--quiet"]
        if sub == "imatrix":
            argv += ["--samples", "1", "--seqlen", "128", "--calib", "text"]
            opts = [["--samples", v(["1", "2"], ["0", "-1"])], ["--seqlen", v(["128", "256"], ["0", "16", "x"])],
                    ["--mode", v(["16x", "4x"], ["8x"])], ["--calib", v(["text", "default"], ["bogus", str(junk), str(box)])],
                    ["--threads", v(["1"], ["0", "-1"])], ["--process-output"], ["--seed", v(["0", "7"], ["-3"])],
                    ["--out", v([str(out / "im.gguf")], [str(out), str(box / "none" / "im.gguf")])]]
        else:
            # the tiny model needs 512 calibration tokens (its widest linear's inputs)
            argv += ["--calib-samples", "4", "--seqlen", "160", "--calib", "text", "--group-size", "32", "--no-validate"]
            opts = [["--bits", v(["4", "8"], ["3", "2", "0"])], ["--group-size", v(["32", "64"], ["7", "0", "-1", "100"])],
                    ["--format", v(["gptq", "awq", "compressed-tensors"], ["bogus"])], [rng.choice(["--sym", "--asym"])],
                    ["--act-order"], ["--static-groups"], ["--damp", v(["0.01", "0.1"], ["-1", "0", "2", "nan"])],
                    ["--no-clip"], ["--calib-samples", v(["4"], ["0", "1"])], ["--seqlen", v(["160"], ["0", "8"])],
                    ["--calib", v(["text"], ["bogus", str(junk)])], ["--threads", v(["1"], ["-1"])], ["--force"]]
    # random options after the base: argparse keeps the last value given
    for o in rng.sample(opts, k=rng.choice([1, 2, 3, 4])):
        argv += o
    if rng.random() < 0.05:
        argv.append(rng.choice(["--bogus-flag", "--debug"]))
    return cli, argv


def test_fuzz_options(tmp_path, tiny_dir, good, capsys, fuzz_tmp):
    fz = Fuzz("options", capsys, fuzz_tmp)
    rng = random.Random(f"{SEED}-options")
    for i in range(_n(48)):
        box = tmp_path / f"case{i}"
        box.mkdir()
        cli, argv = _options_case(rng, tiny_dir, good, box)
        fz.run(cli, argv, box, "random options")
        shutil.rmtree(box)
    fz.check()


# -- what a real process prints ----------------------------------------------------------------------

def test_subprocess_stderr_is_one_line(tmp_path, tiny_dir, good):
    """The in-process runs see what the CLI prints; these check nothing else reaches a real stderr
    (import-time warnings, logging) on a corrupted input."""
    model = shutil.copytree(tiny_dir, tmp_path / "model")
    _truncate(model / "model.safetensors", random.Random(SEED), 100)
    arts = shutil.copytree(good["gguf"], tmp_path / "arts")
    dec = sorted(arts.glob("MiniCPM*.gguf"))[0]
    with open(dec, "r+b") as f:
        f.truncate(dec.stat().st_size // 3)
    runs = [["convert", "gguf", "--model", str(model), "--out", str(tmp_path / "o1"), "--no-validate"],
            ["validate", str(arts), "--model", str(tiny_dir)],
            ["quantize", "gptq", "--model", str(model), "--out", str(tmp_path / "o2"), "--no-validate"]]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for argv in runs:
        r = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, cwd=ROOT, env=env)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (argv, r.stderr[-3000:])
        assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_internal_error_is_one_line(tmp_path, tiny_dir, capsys, monkeypatch):
    """A bug the fuzz did not find: one line naming where it was raised, the traceback in a log
    file in the temp folder (named on that line), or on stderr under --debug; exit 1."""
    import tempfile

    import convert.gguf.export as export

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def broken(*a, **k):
        return {}["no such key"]

    monkeypatch.setattr(export, "source_info", broken)
    from convert.cli import main

    argv = ["gguf", "--model", str(tiny_dir), "--out", str(tmp_path / "o"), "--no-validate", "--quiet"]
    assert main(argv) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    m = re.fullmatch(r"error: internal error in (\S+): KeyError: 'no such key'; please report \(traceback: (\S+)\)",
                     lines[0])
    assert m, lines
    assert m.group(1).startswith("convert.gguf.export.export_gguf:")
    log = Path(m.group(2))
    assert log.parent == tmp_path and "Traceback" in log.read_text() and "broken" in log.read_text()
    for argv2 in (["--debug", *argv], [*argv, "--debug"]):
        assert main(argv2) == 1
        err = capsys.readouterr().err
        assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: internal error in "), err


def test_debug_flag_everywhere(tiny_dir, tmp_path, capsys):
    """--debug before or after the subcommand, on all three CLIs."""
    from convert.cli import add_debug_flag, build_parser

    p = build_parser()
    add_debug_flag(p)
    assert p.parse_args(["--debug", "gguf"]).debug and p.parse_args(["gguf", "--debug"]).debug
    assert not p.parse_args(["gguf"]).debug
    m = ["--model", str(tiny_dir)]
    for cli, argv in [("convert", ["--debug", "gguf", *m, "--mode", "8x"]), ("convert", ["gguf", "--debug", *m, "--mode", "8x"]),
                      ("validate", ["--debug", "--decoder", str(tmp_path / "none.gguf"), *m]),
                      ("quantize", ["--debug", "imatrix", *m, "--out", str(tmp_path / "i.gguf"), "--samples", "0"]),
                      ("quantize", ["gptq", "--debug", *m, "--out", str(tmp_path / "q"), "--bits", "0"])]:
        assert _main(cli)(argv) == 2, argv
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "usage" not in lines[0], (argv, lines)
