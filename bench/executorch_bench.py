"""ExecuTorch against llama.cpp on one checkpoint, in one run (the README's ExecuTorch tables).

    python bench/executorch_bench.py --model DIR [--threads 2] [--prompt 512] [--decode 64] [--repeat 3]
                                     [--work DIR] [--json FILE] [--reuse] [--fidelity SCENARIOS]

Measures, at `--threads` threads, median of `--repeat`:
* export: `python -m convert executorch --quant 8da4w` (16x) and `python -m convert gguf --quant Q4_K_M`,
  each in its own process: wall time, peak RSS, file size;
* text: a `--prompt`-token prompt prefilled in one `text_decoder` call, then `--decode` greedy steps,
  the 8da4w `.pte` in ExecuTorch's runtime and llama.cpp's Q4_K_M, as tokens/s and their ratios;
* the share of the decoder's FLOPs at that prefill that XNNPACK runs: from the model's shapes and the
  export's delegation report (which operator classes are inside XNNPACK delegates);
* with `--fidelity SET`: the harness on that scenario set with the `.pte` (both modes) and the Q4_K_M
  GGUF in one run, so their KL from the fp32 reference sits in one table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402,F401  (puts the project on sys.path)
from onnx_bench import llamacpp_anchor, median_timings, timed_process  # noqa: E402


def decoder_flops(spec, T: int, past: int = 0) -> dict:
    """Multiply-adds x2 of one T-token decoder call after `past` positions, by where they run in the
    .pte: linears (projections, MLP, LM head on the last row) in XNNPACK; attention (llama::custom_sdpa)
    and the Gated DeltaNet (depthwise conv in XNNPACK, llama::gated_delta_rule in a portable kernel)."""
    t = spec.text
    H = t.hidden_size
    lin = 0
    attn = gdn = conv = 0
    for kind in t.layer_types:
        if kind == "full_attention":
            lin += H * (2 * t.num_heads * t.head_dim) + 2 * H * t.num_kv_heads * t.head_dim + t.num_heads * t.head_dim * H
            pairs = T * past + T * (T + 1) // 2  # (query, key) pairs under the causal mask
            attn += 4 * t.num_heads * t.head_dim * pairs  # QK^T and PV, a multiply and an add each
        else:
            qkv = t.linear_conv_dim
            lin += H * qkv + H * t.linear_v_dim + 2 * H * t.linear_num_value_heads + t.linear_v_dim * H
            conv += 2 * qkv * t.conv_kernel * T
            # per token and value head: decay, k.S, outer-product update, q.S (dk x dv each)
            gdn += 2 * 4 * t.linear_num_value_heads * t.linear_key_head_dim * t.linear_value_head_dim * T
        lin += 3 * H * t.intermediate_size
    dense = 2 * lin * T + 2 * H * t.vocab_size  # LM head on the last position only
    total = dense + conv + attn + gdn
    return {"xnnpack": dense + conv, "custom_sdpa": attn, "gated_delta_rule": gdn, "total": total,
            "xnnpack_share": round((dense + conv) / total, 4)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--work", default="out/executorch-bench")
    ap.add_argument("--json")
    ap.add_argument("--reuse", action="store_true", help="keep the exports already in --work (speed only)")
    ap.add_argument("--fidelity", help="also run the harness on this scenario set (.pte both modes + Q4_K_M)")
    ap.add_argument("--skip-speed", action="store_true")
    a = ap.parse_args()
    work = Path(a.work).absolute()
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"setup": {"threads": a.threads, "prompt_tokens": a.prompt, "decode_tokens": a.decode,
                           "repeat": a.repeat}, "export": {}}
    m = ["--model", a.model, "--quiet", "--no-validate", "--force"]
    if a.reuse:
        res["export"] = "reused (see an earlier run)"
    else:
        pte_dir = work / "et-8da4w"
        res["export"]["executorch 8da4w (16x)"] = timed_process(
            ["-m", "convert", "executorch", *m, "--quant", "8da4w", "--out", str(pte_dir)])
        res["export"]["executorch 8da4w (16x)"]["size_mb"] = round(next(pte_dir.glob("*.pte")).stat().st_size / 2**20, 1)
        print("executorch export", res["export"], flush=True)
        res["export"]["gguf Q4_K_M"] = timed_process(["-m", "convert", "gguf", *m, "--quant", "Q4_K_M", "--out",
                                                      str(work / "gguf")])
        res["export"]["gguf Q4_K_M"]["size_mb"] = round(next((work / "gguf").glob("*Q4_K_M.gguf")).stat().st_size / 2**20, 1)
        print("exports", res["export"], flush=True)
    if not a.skip_speed:
        speed(a, work, res)
    if a.fidelity:
        fidelity(a, work, res)
    print(json.dumps(res, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


def speed(a, work: Path, res: dict) -> None:
    from convert import Checkpoint
    from runtimes.executorch import ExecutorchRuntime

    ckpt = Checkpoint(a.model)
    prompt = llamacpp_anchor(a, work, res, ckpt)
    with ExecutorchRuntime(work / "et-8da4w", n_threads=a.threads) as rt:
        rt.greedy(prompt[:8], 2)  # warm-up: XNNPACK's first call packs and plans
        res["executorch 8da4w"] = median_timings(rt, prompt, a.decode, a.repeat)
        res["executorch 8da4w"]["prefill_calls"] = 1 if a.prompt <= rt.engine.max_seq_len else None
        deleg = rt.manifest["source"]["executorch"]["delegation"]["text_decoder"]
    print("executorch", res["executorch 8da4w"], flush=True)
    et, ll = res["executorch 8da4w"], res["llama.cpp Q4_K_M"]
    res["ratios"] = {"executorch/llama.cpp prefill": round(et["prefill_tok_s"] / ll["prefill_tok_s"], 2),
                     "executorch/llama.cpp decode": round(et["decode_tok_s"] / ll["decode_tok_s"], 2)}
    res["decoder flops"] = {"prefill": decoder_flops(ckpt.spec, a.prompt),
                            "decode step": decoder_flops(ckpt.spec, 1, a.prompt)}
    res["delegation (text_decoder)"] = {"xnnpack_nodes": deleg["delegated_nodes"], "portable_nodes": deleg["portable_nodes"],
                                        "xnnpack_subgraphs": deleg["n_delegates"], "portable_ops": deleg["portable"]}


def fidelity(a, work: Path, res: dict) -> None:
    """The harness with the .pte (both modes) and the Q4_K_M GGUF side by side."""
    from convert import Checkpoint
    from validate.artifacts import discover
    from validate.executorch_artifact import read_executorch
    from validate.harness import Profile, run_validation
    from validate.scenarios import load_scenarios

    m = ["--model", a.model, "--quiet", "--no-validate", "--force"]
    both = work / "et-8da4w-both"
    if not (both / "manifest.json").is_file() or not a.reuse:
        timed_process(["-m", "convert", "executorch", *m, "--quant", "8da4w", "--mode", "both", "--out", str(both)])
    gg = work / "gguf-both"
    if not (gg / "manifest.json").is_file() or not a.reuse:
        timed_process(["-m", "convert", "gguf", *m, "--quant", "Q4_K_M", "--mode", "both", "--out", str(gg)])
    arts = [read_executorch(both), *discover(gg)]
    rep = run_validation(Checkpoint(a.model), arts, load_scenarios(a.fidelity), profile=Profile(threads=a.threads),
                         quiet=True, speed_anchor=False, speed=False)
    table = {}
    for art in rep["artifacts"]:
        rows = {}
        for s in art["scenarios"]:
            mt = s.get("metrics") or {}
            if s.get("status") in ("pass", "fail"):
                fp, fq = mt.get("fp32", {}), mt.get("fake-quant", {})
                rows[s["scenario"]] = {"status": s["status"], "kl_fp32": fp.get("kl_mean"), "kl_p99_fp32": fp.get("kl_p99"),
                                       "kl_fake_quant": fq.get("kl_mean"), "top1_fp32": fp.get("top1_agreement")}
        table[art["quant"]] = {"status": art["status"], "scenarios": rows}
    res["fidelity"] = {"scenarios": a.fidelity, "artifacts": table}


if __name__ == "__main__":
    sys.exit(main())
