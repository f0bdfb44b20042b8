"""Calibration samples for importance matrices: chats with and without images.

A sample is a chat rendered with the checkpoint's chat template and run through MiniCPM-V's
processor, so image samples put real image-token activations into the statistics. A checkpoint
whose processor has no template, whose template drops images, or that has no template at all
still gets its image placeholders where the image was (convert/chat.py chooses the layout once
per run; `calibration_layout` names it).

Sources (`--calib`):

* `default` (the default): ships with the project, nothing is downloaded. Half the samples
  (every other one, starting with the first) carry an image. Images: scikit-image's sample photos
  that its wheel bundles (`skimage/data/*.png|jpg`, read as files; 21 of them: astronaut, cat,
  coffee, rocket, motorcycle, Hubble deep field, retina, microscopy, textures, a text page,
  handwriting, ...), used once as they are and then as seeded random crops. Text: the prompts,
  system prompts and per-image captions (English and Chinese) in
  `recipes/calibration/default.json`, and passages drawn from `recipes/calibration/passages.txt`
  (prose, code, dialogue, tables, JSON, several languages) and the synthetic tokenizer's corpus
  (`convert/synth/corpus.txt`). An image sample is [system?] user(image + question),
  assistant(caption), then a text turn (instruction + passage, assistant passage) that fills the
  sample up to `seqlen` tokens; a text sample is [system?] user(instruction + passage),
  assistant(passage). Samples are cut at `seqlen` tokens, never inside an image: an image that
  does not fit is sliced less (`max_slice_nums` 9 -> 4 -> 2 -> 1).
* `text`: the same without images (for comparisons).
* a folder of pairs: `name.jpg|jpeg|png|webp|bmp|gif` + `name.txt` is an image sample, a lone
  `name.txt` a text-only sample, a lone image an image sample asking "Describe this image.".
  A `.txt` file (UTF-8) holds the user turn; a line consisting of `---` ends it, and the text
  after that line is the assistant turn (without it the sample ends at the assistant's header,
  like a prompt awaiting an answer). Samples run in file-name order; with `--samples N` smaller
  than the folder, a seeded choice of N of them.
* a `.txt` file: plain text cut into `seqlen`-token chunks, no chat template (what
  `llama-imatrix -f FILE` does); the first `--samples` chunks.

Everything is deterministic for a seed.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convert.errors import ConvertError

__all__ = ["DEFAULT_SAMPLES", "DEFAULT_SEQLEN", "IMAGE_EXTS", "SETS", "Encoded", "Sample",
           "default_samples", "folder_samples", "text_file_samples", "load_calibration", "encode_sample",
           "calibration_layout", "skimage_data_dir"]

SETS = ("default", "text")
DEFAULT_SAMPLES = 64
DEFAULT_SEQLEN = 512
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
FOLDER_IMAGE_PROMPT = "Describe this image."
SEPARATOR = "---"
# Characters of text per token of budget: more than any tokenizer needs, the excess is cut off.
_CHARS_PER_TOKEN = 6
_SLICE_SCHEDULE = (None, 4, 2, 1)



@dataclass(frozen=True)
class Sample:
    """One calibration sample: chat messages (processor format) and at most one image, or,
    for plain-text chunks, token ids run as they are."""

    name: str
    messages: tuple = ()
    image: Any = None  # PIL.Image.Image (RGB) or None
    token_ids: tuple[int, ...] | None = None


@dataclass
class Encoded:
    input_ids: Any  # torch.LongTensor [1, T]
    pixel_values: Any = None
    target_sizes: Any = None
    n_image_tokens: int = 0

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.shape[1])


# ---------------------------------------------------------------------------------------------
# shipped data


def _recipe(name: str) -> Path:
    import recipes

    p = recipes.HERE / "calibration" / name
    if not p.is_file():
        raise ConvertError(f"calibration data file {p} is missing (broken installation)")
    return p


def _default_json() -> dict:
    return json.loads(_recipe("default.json").read_text(encoding="utf-8"))


def _paragraphs(text: str, min_chars: int = 20) -> list[str]:
    return [p.strip() for p in re.split(r"\n[ \t\r]*\n", text) if len(p.strip()) >= min_chars]


def _passage_pools() -> list[list[str]]:
    natural = _paragraphs(_recipe("passages.txt").read_text(encoding="utf-8"))
    import convert.synth

    corpus = Path(convert.synth.__file__).resolve().parent / "corpus.txt"
    pools = [natural]
    if corpus.is_file():
        pools.append(_paragraphs(corpus.read_bytes().decode("utf-8")))
    return pools


def skimage_data_dir() -> Path:
    """scikit-image's bundled sample-data folder (found without importing skimage)."""
    try:
        spec = importlib.util.find_spec("skimage")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ConvertError("the default calibration set's images are scikit-image's bundled sample photos, and "
                           "scikit-image is not installed (pip install scikit-image); or use --calib text, "
                           "--calib FOLDER or --calib FILE.txt")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _open_image(path: Path):
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.seek(0)
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                return Image.alpha_composite(bg, im).convert("RGB")
            return im.convert("RGB")
    except (OSError, ValueError) as e:
        raise ConvertError(f"{path}: cannot read the image ({e.__class__.__name__}: {str(e)[:120]})") from None


def _crop(im, rng: random.Random):
    w, h = im.size
    cw, ch = max(16, int(w * rng.uniform(0.5, 0.9))), max(16, int(h * rng.uniform(0.5, 0.9)))
    x, y = rng.randint(0, max(0, w - cw)), rng.randint(0, max(0, h - ch))
    return im.crop((x, y, x + cw, y + ch))


def _text(t: str) -> dict:
    return {"type": "text", "text": t}


def _passage(rng: random.Random, pools: list[list[str]], budget: int) -> str:
    pool = pools[rng.randrange(len(pools))]
    i = rng.randrange(len(pool))
    out, n = [], 0
    while n < budget and len(out) < len(pool):
        out.append(pool[(i + len(out)) % len(pool)])
        n += len(out[-1]) + 2
    return "\n\n".join(out)[:budget]


def default_samples(n: int = DEFAULT_SAMPLES, *, seqlen: int = DEFAULT_SEQLEN, seed: int = 0,
                    images: bool = True) -> list[Sample]:
    """The shipped calibration set (see the module docstring)."""
    if n < 1:
        raise ConvertError(f"--samples {n}: must be at least 1")
    d = _default_json()
    pools = _passage_pools()
    rng = random.Random(f"minicpmv-edge calibration {seed}")
    img_files: list[Path] = []
    if images:
        root = skimage_data_dir()
        img_files = [root / f for f in d["images"] if (root / f).is_file()]
        if not img_files:
            raise ConvertError(f"{root}: none of the default calibration images are there "
                               "(scikit-image without its bundled sample data?)")
    order = rng.sample(range(len(img_files)), len(img_files)) if img_files else []
    cache: dict[Path, Any] = {}
    budget = _CHARS_PER_TOKEN * seqlen
    out = []
    n_img = 0
    for i in range(n):
        msgs: list[dict] = []
        if rng.random() < 0.25:
            msgs.append({"role": "system", "content": [_text(rng.choice(d["system"]))]})
        lang = "zh" if rng.random() < 0.25 else "en"
        image = None
        if img_files and i % 2 == 0:
            f = img_files[order[n_img % len(order)]]
            if f not in cache:
                cache[f] = _open_image(f)
            image = cache[f] if n_img < len(order) else _crop(cache[f], rng)
            n_img += 1
            msgs.append({"role": "user", "content": [{"type": "image"}, _text(rng.choice(d["image_prompts"][lang]))]})
            msgs.append({"role": "assistant", "content": [_text(d["images"][f.name][lang])]})
            name = f"{i:04d}-image-{f.stem}"
        else:
            name = f"{i:04d}-text"
        share = rng.uniform(0.3, 0.6)
        user = rng.choice(d["text_prompts"][lang]) + "\n\n" + _passage(rng, pools, int(budget * share))
        msgs.append({"role": "user", "content": [_text(user)]})
        msgs.append({"role": "assistant", "content": [_text(_passage(rng, pools, int(budget * (1 - share))))]})
        out.append(Sample(name, tuple(msgs), image))
    return out


# ---------------------------------------------------------------------------------------------
# user data


def folder_samples(path: str | Path, n: int | None = None, *, seed: int = 0) -> list[Sample]:
    """Samples from a folder of image + text pairs (see the module docstring)."""
    root = Path(path)
    groups: dict[str, dict[str, Path]] = {}
    for p in sorted(root.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        ext = p.suffix.lower()
        kind = "text" if ext == ".txt" else "image" if ext in IMAGE_EXTS else None
        if kind is None:
            continue
        g = groups.setdefault(p.stem, {})
        if kind in g:
            raise ConvertError(f"--calib {root}: two {kind} files for sample {p.stem!r} ({g[kind].name}, {p.name})")
        g[kind] = p
    if not groups:
        raise ConvertError(f"--calib {root}: no samples (expected name.txt, name.jpg|png + name.txt, ...)")
    stems = sorted(groups)
    if n is not None:
        if n < 1:
            raise ConvertError(f"--samples {n}: must be at least 1")
        if n < len(stems):
            pick = set(random.Random(f"minicpmv-edge calibration {seed}").sample(range(len(stems)), n))
            stems = [s for i, s in enumerate(stems) if i in pick]
    out = []
    for stem in stems:
        g = groups[stem]
        user, answer = FOLDER_IMAGE_PROMPT, None
        if "text" in g:
            try:
                raw = g["text"].read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise ConvertError(f"--calib {g['text']}: not UTF-8 text") from None
            lines = raw.replace("\r\n", "\n").split("\n")
            cut = next((i for i, ln in enumerate(lines) if ln.strip() == SEPARATOR), None)
            user = "\n".join(lines if cut is None else lines[:cut]).strip()
            answer = None if cut is None else "\n".join(lines[cut + 1:]).strip()
            if not user and not answer and "image" not in g:
                raise ConvertError(f"--calib {g['text']}: empty sample")
        image = _open_image(g["image"]) if "image" in g else None
        content = ([{"type": "image"}] if image is not None else []) + ([_text(user)] if user else [])
        msgs = [{"role": "user", "content": content}]
        if answer:
            msgs.append({"role": "assistant", "content": [_text(answer)]})
        out.append(Sample(stem, tuple(msgs), image))
    return out


def text_file_samples(path: str | Path, tokenizer, n: int | None = None, *,
                      seqlen: int = DEFAULT_SEQLEN) -> list[Sample]:
    """Plain text cut into `seqlen`-token chunks (special-token text stays text, as llama-imatrix)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConvertError(f"--calib {path}: not UTF-8 text") from None
    ids = list(tokenizer.encode(text, add_special_tokens=True, split_special_tokens=True))
    if not ids:
        raise ConvertError(f"--calib {path}: empty")
    chunks = [ids[i:i + seqlen] for i in range(0, len(ids) - seqlen + 1, seqlen)] or [ids]
    if n is not None:
        if n < 1:
            raise ConvertError(f"--samples {n}: must be at least 1")
        chunks = chunks[:n]
    return [Sample(f"{path.stem}-{i:04d}", token_ids=tuple(c)) for i, c in enumerate(chunks)]


def load_calibration(calib: str | Path = "default", *, tokenizer=None, n: int | None = None,
                     seqlen: int = DEFAULT_SEQLEN, seed: int = 0) -> tuple[list[Sample], str]:
    """(samples, dataset description for `imatrix.datasets`) for a set name, a folder or a .txt file.

    n=None: DEFAULT_SAMPLES for a named set, every sample of a folder, every chunk of a file.
    """
    if seqlen < 1:
        raise ConvertError(f"--seqlen {seqlen}: must be at least 1")
    calib = str(calib)
    if calib in SETS:
        k = DEFAULT_SAMPLES if n is None else n
        samples = default_samples(k, seqlen=seqlen, seed=seed, images=(calib == "default"))
        return samples, f"minicpmv-edge:{calib} (seed {seed}, {k} samples, seqlen {seqlen})"
    p = Path(calib).expanduser()
    if p.is_dir():
        return folder_samples(p, n, seed=seed), calib
    if p.is_file():
        if p.suffix.lower() != ".txt":
            raise ConvertError(f"--calib {calib}: a file must be plain text (.txt); images go in a folder")
        if tokenizer is None:
            raise ConvertError("a text-file calibration set needs the model's tokenizer")
        return text_file_samples(p, tokenizer, n, seqlen=seqlen), calib
    raise ConvertError(f"--calib {calib}: no such folder or file, and not a calibration set ({', '.join(SETS)})")


# ---------------------------------------------------------------------------------------------
# encoding


_LAYOUT_ATTR = "_minicpmv_edge_chat_layout"


def chat_layout_of(processor):
    """The processor's chat layout (convert/chat.py), chosen on first use and kept on the
    processor, so every sample of a run is laid out the same way."""
    from convert.chat import chat_layout

    layout = getattr(processor, _LAYOUT_ATTR, None)
    if layout is None:
        layout = chat_layout(processor.tokenizer, processor)
        setattr(processor, _LAYOUT_ATTR, layout)
    return layout


def calibration_layout(ckpt, samples: list[Sample]) -> str:
    """How a checkpoint's samples are laid out, in words (the quantize CLIs print it)."""
    if all(s.token_ids is not None for s in samples):
        return "plain text chunks (no chat template)"
    return chat_layout_of(ckpt.processor).description


def encode_sample(processor, sample: Sample, *, seqlen: int, mode: str | None = None) -> Encoded:
    """Model inputs for one sample, at most `seqlen` tokens, never cut inside an image."""
    import torch

    from convert.chat import IM_END

    if sample.token_ids is not None:
        return Encoded(torch.tensor([list(sample.token_ids[:seqlen])], dtype=torch.long))
    msgs = list(sample.messages)
    text = chat_layout_of(processor).render(msgs, add_generation_prompt=msgs[-1]["role"] == "user")
    if sample.image is None:
        out = processor(text=text, return_tensors="pt")
        return Encoded(out["input_ids"][:, :seqlen])
    tok = processor.tokenizer
    img_id = processor.image_token_id
    end_id = tok.convert_tokens_to_ids(IM_END)
    kw = {"downsample_mode": mode} if mode else {}
    need = None
    for k in _SLICE_SCHEDULE:
        out = processor(images=[sample.image], text=text, return_tensors="pt",
                        **kw, **({"max_slice_nums": k} if k else {}))
        ids = out["input_ids"][0]
        pos = (ids == img_id).nonzero().flatten()
        last = int(pos[-1]) if len(pos) else -1
        ends = ((ids == end_id).nonzero().flatten()).tolist()
        need = next((e + 1 for e in ends if e > last), len(ids))  # through the image's user turn
        if need <= seqlen:
            n_img = int((ids[:seqlen] == img_id).sum())
            return Encoded(out["input_ids"][:, :seqlen], out["pixel_values"], out["target_sizes"], n_img)
    raise ConvertError(f"--seqlen {seqlen} is too small for image sample {sample.name}: its image turn needs "
                       f"{need} tokens even unsliced")
