"""Greedy generation by ExecuTorch's own MultimodalRunner and by runtimes/executorch.py on one `.pte`.

Usage: python tests/et_runner_check.py FOLDER N  -> prints one JSON line {"text": {"runner", "ours"}}.
Run as a child process: the runner is C++ and a crash in it must not take the test session along.
The prompt goes in as token ids (`make_token_input`) so both sides start from the same tokens; the
runner's tokenizer (pytorch-tokenizers reading tokenizer.json) decodes what it generates.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> int:
    folder, n = Path(sys.argv[1]), int(sys.argv[2])
    from runtimes.executorch import ExecutorchRuntime, load_kernels, pte_file

    load_kernels()
    from executorch.extension.llm.runner import GenerationConfig, MultimodalRunner, make_token_input

    rt = ExecutorchRuntime(folder, n_threads=2)
    prompt = rt.tokenize("<|im_start|>user\nDescribe a quiet harbour at dawn.<|im_end|>\n<|im_start|>assistant\n")
    ours = rt.greedy(prompt, n)
    eos = set(int(e) for e in rt.engine.program.load_method("get_eos_ids").execute([]))
    if any(t in eos for t in ours):  # the runner stops at an end-of-sequence token; so do we
        ours = ours[:next(i for i, t in enumerate(ours) if t in eos)]
    ours_text = rt.detokenize(ours)
    rt.close()

    pte, _ = pte_file(folder)
    runner = MultimodalRunner(str(pte), str(folder / "tokenizer.json"))
    pieces: list[str] = []
    cfg = GenerationConfig(max_new_tokens=n, temperature=0.0, echo=False)
    runner.generate([make_token_input(prompt)], cfg, token_callback=pieces.append)
    print(json.dumps({"text": {"runner": "".join(pieces), "ours": ours_text}, "tokens": ours}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
