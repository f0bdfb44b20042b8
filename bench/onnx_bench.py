"""ONNX Runtime against llama.cpp on one checkpoint, in one run (the README's ONNX speed table).

    python bench/onnx_bench.py --model DIR [--threads 2] [--prompt 512] [--decode 64] [--repeat 3]
                               [--work DIR] [--json FILE]

Measures, at `--threads` threads, median of `--repeat`:
* export: `python -m convert onnx --quant int4 --mode both` and `--portable` (16x), each in its own
  process: wall time and peak RSS; `python -m convert gguf --quant Q4_K_M` for the llama.cpp anchor;
* text: a `--prompt`-token prompt prefilled in one call, then `--decode` greedy steps, ORT int4 (fused
  Gated DeltaNet operators) and llama.cpp Q4_K_M, as tokens/s and their ratios; ORT's `--portable`
  decoder's prefill against the fused one. Generation asks ORT's decoder for the last row only
  (`num_logits_to_keep` = 1), as llama.cpp computes only the last row's logits;
* vision: one 448x448 slice through the 16x and the 4x encoder (ratio 16x / 4x).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402,F401  (puts the project on sys.path)


def timed_process(args: list[str]) -> dict:
    """Wall seconds and peak RSS (MB) of one child process."""
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, *args], cwd=common.ROOT, stdout=subprocess.DEVNULL)
    _, status, ru = os.wait4(p.pid, 0)
    if status:
        raise SystemExit(f"error: {' '.join(args)} failed ({status})")
    return {"wall_s": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(ru.ru_maxrss / 1024)}


def median_timings(rt, prompt: list[int], n: int, repeat: int) -> dict:
    runs = []
    for _ in range(repeat):
        rt.greedy(prompt, n)
        runs.append(dict(rt.last_timings))
    pre = statistics.median(r["prefill_s"] for r in runs)
    dec = statistics.median(r["decode_s"] for r in runs)
    return {"prefill_s": round(pre, 3), "prefill_tok_s": round(len(prompt) / pre, 1),
            "decode_s": round(dec, 3), "decode_tok_s": round(n / dec, 2) if n else None}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--work", default="out/onnx-bench")
    ap.add_argument("--json")
    ap.add_argument("--reuse", action="store_true", help="keep the exports already in --work (speed only)")
    a = ap.parse_args()
    work = Path(a.work).absolute()
    work.mkdir(parents=True, exist_ok=True)
    env_note = {"threads": a.threads, "prompt_tokens": a.prompt, "decode_tokens": a.decode, "repeat": a.repeat}
    res: dict = {"setup": env_note, "export": {}}
    m = ["--model", a.model, "--quiet", "--no-validate", "--force"]
    if a.reuse:
        res["export"] = "reused (see an earlier run)"
    else:
        export_all(a, work, m, res)
    speed(a, work, res)
    return 0


def export_all(a, work: Path, m: list[str], res: dict) -> None:
    res["export"]["onnx int4 (both modes)"] = timed_process(
        ["-m", "convert", "onnx", *m, "--quant", "int4", "--mode", "both", "--out", str(work / "onnx-int4")])
    print("onnx int4 export", res["export"]["onnx int4 (both modes)"], flush=True)
    res["export"]["onnx int4 portable (16x)"] = timed_process(
        ["-m", "convert", "onnx", *m, "--quant", "int4", "--portable", "--out", str(work / "onnx-int4-portable")])
    res["export"]["gguf Q4_K_M"] = timed_process(
        ["-m", "convert", "gguf", *m, "--quant", "Q4_K_M", "--out", str(work / "gguf")])
    print("exports", res["export"], flush=True)


def llamacpp_anchor(a, work: Path, res: dict, ckpt) -> list[int]:
    """The benchmark prompt (held-out chats repeated to a.prompt tokens) and the anchor's timings:
    llama.cpp on work/gguf's Q4_K_M, into res["llama.cpp Q4_K_M"]."""
    from runtimes.llamacpp import LlamaCppRuntime

    ids: list[int] = []
    for conv in common.held_out_ids(ckpt.tokenizer):
        ids += conv
    while len(ids) < a.prompt:
        ids += ids
    prompt = ids[:a.prompt]
    gguf = next((work / "gguf").glob("*Q4_K_M.gguf"))
    with LlamaCppRuntime(gguf, n_threads=a.threads, n_ctx=a.prompt + a.decode + 16, n_batch=a.prompt) as rt:
        res["llama.cpp Q4_K_M"] = median_timings(rt, prompt, a.decode, a.repeat)
    print("llama.cpp", res["llama.cpp Q4_K_M"], flush=True)
    return prompt


def speed(a, work: Path, res: dict) -> None:

    from PIL import Image

    from convert import Checkpoint
    from recipes import HERE
    from runtimes.onnxruntime import OnnxRuntime

    ckpt = Checkpoint(a.model)
    prompt = llamacpp_anchor(a, work, res, ckpt)
    with OnnxRuntime(work / "onnx-int4", n_threads=a.threads, max_call_tokens=a.prompt) as rt:
        res["onnxruntime int4"] = median_timings(rt, prompt, a.decode, a.repeat)
        img = Image.open(HERE / "images" / "astronaut.jpg").convert("RGB").resize((448, 448))
        enc = {}
        for mode in ("16x", "4x"):
            from runtimes.pipeline import media_chunks

            px = media_chunks(rt.processor, img, mode)[0].numpy()
            rt.engine.encode(px, mode)  # warm-up: session creation
            ts = []
            for _ in range(max(a.repeat, 5)):
                t0 = time.perf_counter()
                rt.engine.encode(px, mode)
                ts.append(time.perf_counter() - t0)
            enc[mode] = round(statistics.median(ts), 4)
        res["vision 448x448 slice (s)"] = enc
    print("onnxruntime", res["onnxruntime int4"], enc, flush=True)
    with OnnxRuntime(work / "onnx-int4-portable", n_threads=a.threads, max_call_tokens=a.prompt) as rt:
        res["onnxruntime int4 portable"] = median_timings(rt, prompt, min(a.decode, 8), a.repeat)
    ort, ll, port = res["onnxruntime int4"], res["llama.cpp Q4_K_M"], res["onnxruntime int4 portable"]
    res["ratios"] = {
        "ort/llama.cpp prefill": round(ort["prefill_tok_s"] / ll["prefill_tok_s"], 2),
        "ort/llama.cpp decode": round(ort["decode_tok_s"] / ll["decode_tok_s"], 2),
        "fused/portable prefill speed": round(ort["prefill_tok_s"] / port["prefill_tok_s"], 2),
        "vision 16x/4x time": round(enc["16x"] / enc["4x"], 2),
    }
    print(json.dumps(res, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
