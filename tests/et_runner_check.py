"""Greedy generation by ExecuTorch's own MultimodalRunner and by runtimes/executorch.py on one `.pte`.

Usage: python tests/et_runner_check.py FOLDER N  -> one JSON line {"text": {"runner", "ours"}, "image": {...}}.
Run as a child process: the runner is C++ and a crash in it must not take the test session along.
The prompt goes in as token ids (`make_token_input`) so both sides start from the same tokens; the
runner's tokenizer (pytorch-tokenizers reading tokenizer.json) decodes what it generates. The image
prompt is laid out as transformers' processor does (overview and slices, each between its marker
tokens); the runner gets each slice's pixels as an image input, which it sends through
`vision_encoder` and on to `text_decoder`, as an app does after preprocessing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> int:
    folder, n = Path(sys.argv[1]), int(sys.argv[2])
    from runtimes.executorch import ExecutorchRuntime, load_kernels, pte_file

    load_kernels()
    from executorch.extension.llm.runner import GenerationConfig, MultimodalRunner, make_image_input, make_token_input

    rt = ExecutorchRuntime(folder, n_threads=2)
    prompt = rt.tokenize("<|im_start|>user\nDescribe a quiet harbour at dawn.<|im_end|>\n<|im_start|>assistant\n")
    ours = rt.greedy(prompt, n)
    eos = set(int(e) for e in rt.engine.program.load_method("get_eos_ids").execute([]))
    ours = cut(ours, eos)  # the runner stops at an end-of-sequence token
    ours_text = rt.detokenize(ours)

    # image: user turn with one image (overview + slices), then the assistant's turn
    from PIL import Image

    from recipes import HERE
    from runtimes.pipeline import media_chunks

    img = Image.open(HERE / "images" / "astronaut.jpg").convert("RGB").resize((672, 448))
    pre = rt.tokenize("<|im_start|>user\n")
    post = rt.tokenize("\nWhat is in the picture?<|im_end|>\n<|im_start|>assistant\n")
    rt.prefill([pre, img, post])
    ours_img = cut(rt.greedy_by_extend([], n, fresh=False), eos)
    layout, slices = rt.image_layout(img), iter(media_chunks(rt.processor, img, "16x"))
    rt.close()

    pte, _ = pte_file(folder)
    runner = MultimodalRunner(str(pte), str(folder / "tokenizer.json"))
    cfg = GenerationConfig(max_new_tokens=n, temperature=0.0, echo=False)
    pieces: list[str] = []
    runner.generate([make_token_input(prompt)], cfg, token_callback=pieces.append)
    out = {"text": {"runner": "".join(pieces), "ours": ours_text}, "tokens": ours}
    runner.reset()
    inputs = [make_token_input(pre)]
    for c in layout:
        inputs.append(make_token_input(list(c.tokens)) if c.kind == "text" else make_image_input(next(slices)[0].float()))
    inputs.append(make_token_input(post))
    pieces = []
    runner.generate(inputs, cfg, token_callback=pieces.append)
    out["image"] = {"runner": "".join(pieces), "ours": rt.detokenize(ours_img), "slices": sum(c.kind != "text" for c in layout)}
    print(json.dumps(out))
    return 0


def cut(tokens: list[int], eos: set[int]) -> list[int]:
    """Up to the first end-of-sequence token (where the runner stops)."""
    return tokens[:next((i for i, t in enumerate(tokens) if t in eos), len(tokens))]


if __name__ == "__main__":
    sys.exit(main())
