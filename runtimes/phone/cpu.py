"""The CPU as a process sees it: the ISA, the CPU model in /proc/cpuinfo and, on aarch64, the
HWCAP features the kernel (or qemu) gives it. Stdlib only: it runs in the phone's guest too."""

from __future__ import annotations

# Linux arm64 HWCAP / HWCAP2 bit names (arch/arm64/include/uapi/asm/hwcap.h), as /proc/cpuinfo prints them
HWCAP = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop "
         "sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs sb paca pacg").split()
HWCAP2 = ("dcpodp sve2 sveaes svepmull svebitperm svesha3 svesm4 flagm2 frint svei8mm svef32mm svef64mm svebf16 "
          "i8mm bf16 dgh rng bti mte ecv afp rpres mte3 sme").split()


def cpu_seen() -> dict:
    """The ISA and CPU as this process sees them (under qemu: the emulated ones)."""
    import platform

    out: dict = {"machine": platform.machine()}
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key.strip() in ("CPU part", "model name") and "cpu" not in out:
                    out["cpu"] = f"{key.strip()} {val.strip()}"
    except OSError:
        pass
    if out["machine"] == "aarch64":
        import ctypes

        getauxval = ctypes.CDLL(None).getauxval
        getauxval.restype = ctypes.c_ulong
        h1, h2 = getauxval(16), getauxval(26)  # AT_HWCAP, AT_HWCAP2
        out["hwcaps"] = [n for i, n in enumerate(HWCAP) if h1 >> i & 1] + [n for i, n in enumerate(HWCAP2) if h2 >> i & 1]
    return out
