"""The emulated phone runtime: llama.cpp cross-compiled for aarch64 with the apps' flags, run under
qemu-user by the harness, against the references and against x86.

The aarch64 builds come from `python -m runtimes.phone setup` (the README's test set-up; cached per
machine). Here they are asked for through ensure(), which builds whatever is missing.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from runtimes.phone.build import ensure
from runtimes.phone.profiles import get_profile, load_profiles
from validate.artifacts import discover
from validate.harness import EXIT_CRASHED, EXIT_FAILED, EXIT_OK, Profile, run_validation
from validate.scenarios import load_scenarios

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def phone():
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            cache[name] = ensure(get_profile(name), quiet=True)
        return cache[name]

    return get


def _guest(setup, code: str) -> str:
    p = subprocess.run(setup.command(["python", "-c", code]), capture_output=True, text=True, timeout=300,
                       env={"PATH": "/usr/bin:/bin", **setup.env(str(ROOT))})
    assert p.returncode == 0, p.stderr
    return p.stdout


# -- profiles as data ----------------------------------------------------------------------------


def test_profiles_are_the_apps_builds():
    ps = load_profiles()
    assert {"android-armv82", "android-armv86", "harmonyos"} <= set(ps)
    a82, a86, hm = ps["android-armv82"], ps["android-armv86"], ps["harmonyos"]
    assert a82.arm_arch == hm.arm_arch == "armv8.2-a+dotprod+fp16"
    assert a86.arm_arch == "armv8.6-a+dotprod+i8mm+fp16+bf16"
    assert a82.llama_cpp["GGML_OPENMP"] == "ON" and hm.llama_cpp["GGML_OPENMP"] == "OFF"
    assert all(p.threads == 4 and p.n_ctx == 8192 and p.llama_cpp["GGML_CPU_KLEIDIAI"] == "OFF" for p in ps.values())
    assert hm.memory_budget_mb < a82.memory_budget_mb


@pytest.mark.parametrize("body, message", [
    ('[p]\nqemu_cpu = "cortex-a76"\n', "missing key"),
    ('[p]\nbogus = 1\n', "unknown key 'bogus'"),
])
def test_bad_profile_file_is_one_line(tmp_path, body, message):
    from convert.errors import ConvertError

    f = tmp_path / "phones.toml"
    f.write_text(body)
    with pytest.raises(ConvertError, match=message):
        load_profiles(f)


def test_unknown_profile_is_a_clean_error(tmp_path, tiny_gguf):
    dec, _ = tiny_gguf("Q4_K_M")
    for argv in (["-m", "validate", str(dec.parent), "--phone", "iphone"],
                 ["-m", "runtimes.phone", "setup", "iphone"]):
        p = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT)
        assert p.returncode == 2 and p.stderr.strip().count("\n") == 0, p.stderr
        assert "unknown phone profile 'iphone'" in p.stderr and "android-armv82" in p.stderr
    p = subprocess.run([sys.executable, "-m", "convert", "coreml", "--phone", "android-armv82", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and "no aarch64 build" in p.stderr and not (tmp_path / "o").exists(), p.stderr


# -- the guest -----------------------------------------------------------------------------------


def test_guest_sees_the_emulated_cpu(phone):
    """The guest is aarch64, reads the profile's /proc/cpuinfo (not the host's x86 one), and its
    HWCAPs are the emulated CPU's: dotprod and fp16 on the A76, i8mm and bf16 only on the other."""
    for name, has, lacks in (("android-armv82", {"asimddp", "fphp", "asimdhp"}, {"i8mm", "bf16", "sve"}),
                             ("android-armv86", {"asimddp", "i8mm", "bf16"}, {"sve"})):
        s = phone(name)
        out = _guest(s, "import platform; from runtimes.phone.cpu import cpu_seen; import json; "
                        "print(json.dumps(cpu_seen())); print(open('/proc/cpuinfo').read())")
        import json

        seen = json.loads(out.splitlines()[0])
        assert seen["machine"] == "aarch64" and seen["cpu"] == f"CPU part {s.profile.cpu_part}"
        assert has <= set(seen["hwcaps"]) and not lacks & set(seen["hwcaps"])
        feats = next(ln for ln in out.splitlines() if ln.startswith("Features")).split(":", 1)[1].split()
        assert feats == seen["hwcaps"]  # the fake file says what the CPU gives


# -- validation under the phone profile ------------------------------------------------------------


def _validate(ckpt, folder, setup, scenarios="quick"):
    return run_validation(ckpt, discover(folder), load_scenarios(scenarios), profile=Profile.for_phone(setup),
                          quiet=True, speed_anchor=False, speed=False)


def test_q4_k_m_passes_on_the_android_baseline(phone, tiny_ckpt, tiny_gguf):
    """Every quick scenario passes in the aarch64 build under a Cortex-A76; the runtime reports the
    ARM kernels it has (dotprod, fp16 arithmetic, no i8mm); the x86 twin agrees closely."""
    dec, _ = tiny_gguf("Q4_K_M")
    rep = _validate(tiny_ckpt, dec.parent, phone("android-armv82"))
    row = rep["artifacts"][0]
    assert rep["exit_code"] == EXIT_OK, [s.get("failures") for s in row["scenarios"]]
    assert [s["status"] for s in row["scenarios"]] == ["pass"] * 3
    plat, host = row["platform"], row["host_platform"]
    assert plat["machine"] == "aarch64" and host["machine"] == "x86_64"
    assert "DOTPROD = 1" in plat["llama_cpp"] and "FP16_VA = 1" in plat["llama_cpp"]
    assert "MATMUL_INT8" not in plat["llama_cpp"] and "AVX" not in plat["llama_cpp"]
    assert rep["profile"]["phone"]["llama_cpp_flags"]["GGML_CPU_ARM_ARCH"] == "armv8.2-a+dotprod+fp16"
    for sc in row["scenarios"]:
        x = sc["x86"]
        # measured on tiny seed 0: KL 2e-5..1.3e-3, top-1 >= 99.4% (README, phone table)
        assert x["metrics"]["kl_mean"] < 1e-2 and x["metrics"]["top1_agreement"] > 0.95, (sc["scenario"], x)
        assert x["metrics"]["kl_mean"] > 0  # different kernels: not the same numbers
    assert min(sc["x86"]["image_cosine"][0] for sc in row["scenarios"] if sc["kind"] == "image") > 0.999


def test_convert_gguf_validates_on_the_phone(phone, tiny_dir, tmp_path):
    """`python -m convert gguf --phone PROFILE`: the export's own validation runs under the profile
    and its report says so (console and validation.json)."""
    import json

    phone("android-armv82")
    out = tmp_path / "q4"
    p = subprocess.run([sys.executable, "-m", "convert", "gguf", "--model", str(tiny_dir), "--quant", "Q4_K_M",
                        "--out", str(out), "--scenarios", "text-chat", "--phone", "android-armv82", "--quiet"],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    rep = json.loads((out / "validation.json").read_text())
    assert rep["profile"]["phone"]["profile"] == "android-armv82" and rep["profile"]["n_ctx"] == 8192
    assert rep["artifacts"][0]["platform"]["machine"] == "aarch64"
    assert "phone profile android-armv82: aarch64 under qemu" in p.stdout and "KL x86" in p.stdout


def test_i8mm_build_crashes_on_a_cpu_without_i8mm(phone, tiny_ckpt, tiny_gguf):
    """The apps' second library (armv8.6-a+i8mm+bf16) on a Cortex-A76 dies of SIGILL: the harness
    reports a crashed row. Proof that the i8mm path exists in that build and that the baseline
    profile's CPU cannot take it."""
    s86, s82 = phone("android-armv86"), phone("android-armv82")
    mixed = dataclasses.replace(s86, profile=dataclasses.replace(s86.profile, qemu_cpu=s82.profile.qemu_cpu),
                                root=s82.root)
    dec, _ = tiny_gguf("Q4_K_M")
    rep = _validate(tiny_ckpt, dec.parent, mixed, "text-chat")
    row = rep["artifacts"][0]
    assert rep["exit_code"] == EXIT_CRASHED and row["status"] == "crashed" and "SIGILL" in row["error"], row["error"]


def test_fp16_overflow_shows_only_on_the_phone(phone, tiny_dir, tmp_path):
    """A checkpoint with massive activations (validate.faults.massive_activations): its F16 GGUF
    passes on x86 (float32 sums) and fails under the phone profile, where the armv8.2-a+fp16 build
    sums F16 matmuls in float16 and overflows."""
    from convert import Checkpoint
    from convert.gguf.export import export_gguf
    from validate.faults import massive_activations

    ckpt = Checkpoint(massive_activations(tiny_dir, tmp_path / "massive"))
    export_gguf(ckpt, tmp_path / "f16", quant="F16", mode="16x", quiet=True)
    x86 = run_validation(ckpt, discover(tmp_path / "f16"), load_scenarios("text-chat"), profile=Profile(threads=2),
                         quiet=True, speed_anchor=False, speed=False)
    assert x86["exit_code"] == EXIT_OK
    rep = _validate(ckpt, tmp_path / "f16", phone("android-armv82"), "text-chat")
    (sc,) = rep["artifacts"][0]["scenarios"]
    assert rep["exit_code"] == EXIT_FAILED and "non-finite values" in sc["failures"][0], sc["failures"]
    assert rep["artifacts"][0]["checks"][1]["status"] == "pass"  # the file is exactly the checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("profile", ["android-armv82", "android-armv86", "harmonyos"])
@pytest.mark.parametrize("quant", ["F16", "Q8_0", "Q4_K_M", "onnx-fp32", "onnx-fp16", "onnx-int4", "pte-8da4w",
                                   "pte-fp32"])
def test_every_profile_and_type_passes_quick(phone, tiny_ckpt, tiny_gguf, onnx_dirs, et_dirs, profile, quant):
    """The README's phone table: every artifact type, every profile, every quick scenario."""
    if quant.startswith("onnx-"):
        from validate.onnx_artifact import read_onnx

        arts = [read_onnx(onnx_dirs(quant[5:]))]
    elif quant.startswith("pte-"):
        from validate.executorch_artifact import read_executorch

        arts = [read_executorch(et_dirs(quant[4:]))]
    else:
        arts = discover(tiny_gguf(quant)[0].parent)
    rep = run_validation(tiny_ckpt, arts, load_scenarios("quick"), profile=Profile.for_phone(phone(profile)),
                         quiet=True, speed_anchor=False, speed=False)
    row = rep["artifacts"][0]
    assert rep["exit_code"] == EXIT_OK, [s.get("failures") for s in row["scenarios"]]
    assert row["platform"]["machine"] == "aarch64"
    if not quant.startswith(("onnx-", "pte-")):
        assert ("OPENMP = 1" in row["platform"]["llama_cpp"]) == (phone(profile).profile.llama_cpp["GGML_OPENMP"] == "ON")


def test_onnx_int4_runs_in_the_guest(phone, tiny_dir, tiny_ckpt, onnx_dirs):
    """An ONNX folder under the phone profile: ONNX Runtime's aarch64 wheel runs the sessions in the
    guest (the app-side pipeline stays on x86); the scenario passes and the x86 twin agrees."""
    from validate.onnx_artifact import read_onnx

    # one image scenario: the vision encoder, the embedding and the decoder all run in the guest
    # (every quick scenario, every profile: test_every_profile_and_type_passes_quick, slow)
    rep = run_validation(tiny_ckpt, [read_onnx(onnx_dirs("int4"))], load_scenarios("image-448-16x"),
                         profile=Profile.for_phone(phone("android-armv82")), quiet=True, speed_anchor=False, speed=False)
    row = rep["artifacts"][0]
    assert rep["exit_code"] == EXIT_OK, [s.get("failures") for s in row["scenarios"]]
    assert row["platform"]["machine"] == "aarch64" and "asimddp" in row["platform"]["hwcaps"]
    assert row["platform"]["onnxruntime"].startswith("1.") and row["host_platform"]["machine"] == "x86_64"
    for sc in row["scenarios"]:
        assert sc["x86"]["metrics"]["kl_mean"] < 1e-2, (sc["scenario"], sc["x86"])


def test_pte_runs_in_the_guest(phone, tiny_ckpt, et_dirs):
    """A `.pte` under the phone profile: ExecuTorch's aarch64 runtime (the wheel's kernels and XNNPACK)
    with this project's runner and llama ops runs the program in the guest; the scenario passes and
    the x86 twin (the pybindings runtime) agrees. One image scenario: every method runs."""
    from validate.executorch_artifact import read_executorch

    rep = run_validation(tiny_ckpt, [read_executorch(et_dirs("8da4w"))], load_scenarios("image-448-16x"),
                         profile=Profile.for_phone(phone("android-armv82")), quiet=True, speed_anchor=False, speed=False)
    row = rep["artifacts"][0]
    assert rep["exit_code"] == EXIT_OK, [s.get("failures") for s in row["scenarios"]]
    assert row["platform"]["machine"] == "aarch64" and "asimddp" in row["platform"]["hwcaps"]
    assert "llama ops" in row["platform"]["executorch"] and "project C++" in row["platform"]["executorch"]
    assert row["host_platform"]["machine"] == "x86_64"
    for sc in row["scenarios"]:
        # measured 3.0e-3 on the image scenario (int8 dynamic activations: a rounding difference
        # between the ISAs moves a quantization step), 1e-6 to 2e-5 on text
        assert sc["x86"]["metrics"]["kl_mean"] < 1e-2, (sc["scenario"], sc["x86"])
