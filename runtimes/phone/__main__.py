"""`python -m runtimes.phone`: set up and inspect the emulated phone runtimes.

    python -m runtimes.phone setup [PROFILE ...] [--quiet]   build what the profiles run on (default: all)
    python -m runtimes.phone list                            the profiles and whether each is built
"""

from __future__ import annotations

import argparse
import json

from convert.cli import run


def cmd_setup(args) -> int:
    from .build import ensure
    from .profiles import get_profile, load_profiles

    names = args.profiles or list(load_profiles())
    profiles = [get_profile(n) for n in names]  # an unknown name fails before any work
    for p in profiles:
        setup = ensure(p, quiet=args.quiet)
        print(json.dumps(setup.describe(), sort_keys=True))
    return 0


def cmd_list(args) -> int:
    from .build import cache_root
    from .profiles import load_profiles

    built = [json.loads((d / "fingerprint.json").read_text()).get("flags") for d in cache_root().glob("llama-*")
             if (d / "fingerprint.json").is_file()]
    for name, p in load_profiles().items():
        flags = " ".join(f"{k}={v}" for k, v in sorted(p.llama_cpp.items()))
        print(f"{name:16s} qemu -cpu {p.qemu_cpu:14s} {flags}{'' if dict(p.llama_cpp) in built else '  (not built)'}")
        print(f"{'':16s} {p.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m runtimes.phone", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup", help="build the aarch64 runtimes of the profiles (once per machine, cached)")
    s.add_argument("profiles", nargs="*", help="profile names (default: every profile in recipes/phones.toml)")
    s.add_argument("--quiet", action="store_true", help="no progress lines")
    s.set_defaults(func=cmd_setup)
    lst = sub.add_parser("list", help="the phone profiles")
    lst.set_defaults(func=cmd_list)
    return ap


if __name__ == "__main__":
    raise SystemExit(run(build_parser(), None))
