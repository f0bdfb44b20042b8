"""The guest side of runtimes/phone/remote.py: one engine, driven over stdin/stdout.

    python -m runtimes.phone.engine_server MODULE:CLASS   (the constructor's JSON kwargs first)

Runs as aarch64 Python under qemu. Requests and answers are JSON lines; arrays are .npy files.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

import numpy as np


ENGINE_ATTRS = ("max_seq_len", "max_context")


def main(target: str) -> int:
    out = sys.stdout
    sys.stdout = sys.stderr  # a library's print() must not break the protocol

    def send(msg: dict) -> None:
        out.write(json.dumps(msg) + "\n")
        out.flush()

    from runtimes.phone.cpu import cpu_seen

    try:
        kwargs = json.loads(sys.stdin.readline())["kwargs"]
        module, _, attr = target.partition(":")
        engine = getattr(importlib.import_module(module), attr)(**kwargs)
    except Exception as e:  # a load failure is an answer, not a crash
        send({"ok": False, "error": f"{type(e).__name__}: {e}".splitlines()[0]})
        return 0
    send({"ok": True, "modes": list(engine.modes), "full_logits": engine.full_logits,
          "platform": {**cpu_seen(), **engine.system_info()},
          # what a runtime reads off its engine (an ExecuTorch program's call and context sizes)
          "attrs": {k: getattr(engine, k) for k in ENGINE_ATTRS if hasattr(engine, k)}})
    n = 0
    for line in sys.stdin:
        req = json.loads(line)
        op = req.get("op")
        if op == "exit":
            break
        try:
            if op == "reset":
                engine.reset()
                send({"ok": True})
                continue
            if op == "encode":
                res = engine.encode(np.load(req["pixels"]), req["mode"])
            elif op == "embed":
                res = engine.embed(np.load(req["ids"]))
            elif op == "decode":
                res = engine.decode(np.load(req["embeds"]), req["start"], req["last_only"])
            else:
                raise ValueError(f"unknown op {op!r}")
            for k in ("pixels", "ids", "embeds"):
                if k in req:
                    os.unlink(req[k])
            n += 1
            f = f"{os.path.dirname(req.get('pixels') or req.get('ids') or req['embeds'])}/out-{n}.npy"
            np.save(f, res)
            send({"ok": True, "out": f})
        except Exception as e:
            send({"ok": False, "error": f"{type(e).__name__}: {e}".splitlines()[0]})
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
