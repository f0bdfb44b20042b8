"""One runtime in its own process, driven by the harness over a pipe.

A native crash, an abort or a hang in the runtime then costs that artifact's row, not the whole
validation: the harness sees the pipe close (or its time limit pass), records the failure, and
goes on. Requests and answers are JSON lines; arrays travel as .npy files in the harness's
scratch folder. Every answer carries the process's peak RSS so far.

    python -m validate.worker MODULE:CLASS RFD WFD   (the constructor's JSON kwargs on stdin's first line)
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from runtimes.phone.cpu import cpu_seen


def _peak_rss_mb() -> float:
    """This process's peak resident set. Linux: VmHWM of the current address space; ru_maxrss
    would carry over the harness's own peak through fork and exec."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024.0 * 1024.0) if sys.platform == "darwin" else rss / 1024.0  # bytes on macOS, KiB elsewhere


def _reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM to the current RSS (no-op elsewhere)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        pass


def _image(path: str):
    """An image file, or a folder of video frames (runtimes.base.Video)."""
    from pathlib import Path

    from PIL import Image

    if Path(path).is_dir():
        from runtimes.base import Video

        return Video(tuple(_image(str(f)) for f in sorted(Path(path).glob("*.png"))))
    with Image.open(path) as im:
        return im.convert("RGB")


def _chunks(chunks) -> list[dict]:
    return [{"kind": c.kind, "n_tokens": c.n_tokens, "n_pos": c.n_pos, "tokens": list(c.tokens)} for c in chunks]


class Worker:
    def __init__(self, rt):
        self.rt = rt

    def op_info(self, req):
        rt = self.rt
        return {"name": rt.name, "n_vocab": int(rt.n_vocab), "capabilities": sorted(rt.capabilities),
                "unsupported": {k: rt.unsupported(k) for k in ("text", "image", "video") if k not in rt.capabilities},
                "platform": {**cpu_seen(), **rt.system_info()}}  # a remote engine's guest overrides

    def op_tokenize(self, req):
        return {"ids": [self.rt.tokenize(t) for t in req["texts"]]}

    def op_layout(self, req):
        return {"chunks": _chunks(self.rt.image_layout(_image(req["image"])))}

    def op_embeddings(self, req):
        img = _image(req["image"])
        t0 = time.perf_counter()
        embs = self.rt.image_embeddings(img)
        dt = time.perf_counter() - t0
        files = []
        for i, e in enumerate(embs):
            f = f"{req['out']}-{i}.npy"
            np.save(f, e)
            files.append(f)
        return {"files": files, "seconds": dt}

    def op_pixels(self, req):
        """The runtime's own preprocessed pixels. For llama.cpp this is the numpy replica of mtmd,
        not the runtime, so its memory is left out of the runtime's peak RSS (see main)."""
        chunks = self.rt.image_pixels(_image(req["image"]))
        if chunks is None:
            return {"files": None}
        files = []
        for i, c in enumerate(chunks):
            f = f"{req['out']}-{i}.npy"
            np.save(f, np.asarray(c, dtype=np.float32))
            files.append(f)
        return {"files": files}

    def _parts(self, parts):
        return [_image(p["image"]) if isinstance(p, dict) else p for p in parts]

    def op_run(self, req):
        """Turns of parts (the first fresh, the rest continuing the memory), then the teacher
        tokens one at a time: logits at every text position and after every teacher token."""
        rt = self.rt
        rows, chunks = [], []
        t0 = time.perf_counter()
        for i, turn in enumerate(req["turns"]):
            res = rt.prefill(self._parts(turn), fresh=i == 0)
            rows.append(res.logits)
            chunks.append(_chunks(res.chunks))
        t1 = time.perf_counter()
        for tok in req["teacher"]:
            rows.append(rt.extend([tok]))
        t2 = time.perf_counter()
        logits = np.concatenate(rows) if rows else np.empty((0, rt.n_vocab), np.float32)
        np.save(req["out"], logits)
        return {"file": req["out"], "rows": int(logits.shape[0]), "chunks": chunks,
                "prefill_s": t1 - t0, "steps_s": t2 - t1}

    def op_greedy(self, req):
        """Free-running greedy decoding of a text prompt, timed (the speed probe)."""
        toks = self.rt.greedy(req["tokens"], int(req["n"]))
        return {"tokens": toks, "timings": dict(getattr(self.rt, "last_timings", {}) or {})}


def main(argv: list[str]) -> int:
    target, rfd, wfd = argv[0], int(argv[1]), int(argv[2])
    rin = os.fdopen(rfd, "r", encoding="utf-8")
    wout = os.fdopen(wfd, "w", encoding="utf-8")

    peak = [0.0]

    def send(msg: dict, *, count_peak: bool = True) -> None:
        if count_peak:
            peak[0] = max(peak[0], _peak_rss_mb())
        msg["peak_rss_mb"] = peak[0]
        wout.write(json.dumps(msg) + "\n")
        wout.flush()

    from convert.cli import quiet_third_party_logs

    quiet_third_party_logs()
    try:
        kwargs = json.loads(rin.readline())
        import importlib

        module, _, attr = target.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        rt = cls(**kwargs)
    except Exception as e:  # a load failure is an answer, not a crash
        send({"ok": False, "error": f"{type(e).__name__}: {e}".splitlines()[0]})
        return 0
    worker = Worker(rt)
    send({"ok": True, **worker.op_info({})})
    for line in rin:
        req = json.loads(line)
        op = req.get("op")
        if op == "exit":
            break
        try:
            if op == "pixels":  # not the runtime's memory: measured, then the high-water mark reset
                peak[0] = max(peak[0], _peak_rss_mb())
                ans = worker.op_pixels(req)
                import gc

                gc.collect()
                _reset_peak_rss()
                send({"ok": True, **ans}, count_peak=False)
                continue
            send({"ok": True, **getattr(worker, f"op_{op}")(req)})
        except Exception as e:
            tb = traceback.format_exc(limit=3)
            send({"ok": False, "error": f"{type(e).__name__}: {e}".splitlines()[0], "traceback": tb})
    rt.close()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main(sys.argv[1:]))
