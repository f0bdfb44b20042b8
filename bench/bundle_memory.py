"""Each platform recipe's memory check on one checkpoint (the README's memory table): the recipe's
GGUF part exported once, then per device class the estimate (files + K/V + Gated DeltaNet state +
the compute buffers llama.cpp allocates at that context and batch) beside the measured peak RSS of
the llama.cpp process that loaded the files at the same settings and encoded one image.

    python bench/bundle_memory.py --model FULL_SYNTH_DIR [--recipes android,harmonyos,ios] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def main(argv=None) -> int:
    from convert.bundle.checks import memory_check
    from convert.bundle.parts import export, plan_parts
    from convert.recipe import load_recipe

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--recipes", default="android,harmonyos,ios")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    ckpt = common.open_checkpoint(args.model)
    out = {"model": str(ckpt.path), "recipes": {}}
    built: dict[str, tuple] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.recipes.split(","):
            recipe = load_recipe(name)
            part = plan_parts(recipe)[0]
            key = json.dumps(part.options, sort_keys=True)
            if key not in built:  # the recipes share their GGUF types: one export
                dest = Path(tmp) / f"b{len(built)}"
                dest.mkdir()
                t0 = time.monotonic()
                export(part, ckpt, dest, quiet=True)
                built[key] = (part, dest, round(time.monotonic() - t0, 1))
            part, dest, export_s = built[key]
            rows = memory_check(recipe, ckpt, part, dest, quiet=False)
            out["recipes"][name] = {"files": {f: (dest / f).stat().st_size for f in part.files},
                                    "export_s": export_s, "devices": rows}
            for r in rows:
                print(f"{name:10s} {r['status']:4s} {r['message']}; peak RSS {r['measured']['peak_rss_mb']} MB")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
