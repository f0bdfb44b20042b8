"""Validation scenarios (recipes/scenarios.json) turned into prompts.

A scenario's prompt is a list of turns; a turn is a list of parts, each a piece of text (with
its token ids from the reference tokenizer) or an image. The first turn starts from a fresh
runtime state; each later turn continues it (multi-turn), while the reference recomputes the
whole sequence in one pass. Text goes through the checkpoint's chat template (or, when it has
none, MiniCPM-V 4.6's ChatML turns: convert/chat.py, shared with calibration); `<|image_pad|>`
(what the template renders for an image, or what convert/chat.py puts where a template that drops
images had the image item) is where the runtime's own image layout goes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convert.chat import IM_END, IMAGE_TOKEN, chat_layout
from convert.errors import ConvertError

IMAGE_DIR = Path(__file__).resolve().parents[1] / "recipes" / "images"
IMAGE_PLACEHOLDER = IMAGE_TOKEN
KINDS = ("text", "multi-turn", "image", "video")


@dataclass(frozen=True)
class TextPart:
    text: str
    ids: tuple[int, ...]


@dataclass(frozen=True)
class ImagePart:
    index: int  # into Scenario.images


@dataclass
class Scenario:
    name: str
    kind: str
    messages: list[dict[str, Any]]
    mode: str = "16x"
    images: list[dict[str, Any]] = field(default_factory=list)
    frames: list[dict[str, Any]] = field(default_factory=list)
    preprocessing: str = "same"  # "differs": a known difference between runtime and processor
    about: str = ""
    greedy: int = 16

    @property
    def needs_vision(self) -> bool:
        return self.kind in ("image", "video")


def _data() -> dict:
    from recipes import load

    return load("scenarios")


def scenario_sets() -> dict[str, list[str]]:
    return dict(_data()["sets"])


def load_scenarios(selection: str = "default") -> list[Scenario]:
    """A named set ("default", "quick", "text", "images") or a comma list of scenario names."""
    data = _data()
    by_name = {s["name"]: s for s in data["scenarios"]}
    sets = data["sets"]
    if selection in sets:
        names = sets[selection]
    else:
        names = [n.strip() for n in selection.split(",") if n.strip()]
        unknown = [n for n in names if n not in by_name]
        if unknown or not names:
            raise ConvertError(f"unknown scenario set or scenario {unknown[0] if unknown else selection!r}; "
                               f"sets: {', '.join(sets)}; scenarios: {', '.join(by_name)}")
    out = []
    for n in names:
        s = dict(by_name[n])
        if s["kind"] not in KINDS:
            raise ConvertError(f"scenario {n}: unknown kind {s['kind']!r}")
        s.setdefault("greedy", data.get("greedy_steps", 16))
        out.append(Scenario(**s))
    return out


def media_specs(scenario: "Scenario") -> list[dict[str, Any]]:
    """The scenario's media in prompt order: its images, or its video as one {"frames": [...]} item."""
    if scenario.kind == "video":
        return [{"frames": scenario.frames}]
    return scenario.images


def load_media(spec: dict[str, Any]):
    """An image spec's image, or a frames spec's `runtimes.base.Video`."""
    if "frames" in spec:
        from runtimes.base import Video

        return Video(tuple(load_image(f) for f in spec["frames"]))
    return load_image(spec)


def load_image(spec: dict[str, Any]):
    """The scenario image: a shipped photo, optionally cropped (fractions l, t, r, b), resized."""
    from PIL import Image

    path = IMAGE_DIR / spec["file"]
    if not path.is_file():
        raise ConvertError(f"scenario image {path} is missing")
    img = Image.open(path).convert("RGB")
    if "crop" in spec:
        l, t, r, b = spec["crop"]
        img = img.crop((round(l * img.width), round(t * img.height), round(r * img.width), round(b * img.height)))
    w, h = spec["size"]
    return img.resize((int(w), int(h)), Image.BICUBIC)


def _parts(tokenizer, text: str, first_image: int, placeholder: str = IMAGE_PLACEHOLDER,
           video_placeholder: str | None = None) -> list[TextPart | ImagePart]:
    import re

    out: list[TextPart | ImagePart] = []
    marks = [placeholder] + ([video_placeholder] if video_placeholder else [])
    pieces = re.split("|".join(re.escape(m) for m in marks), text)
    for i, piece in enumerate(pieces):
        if i:
            out.append(ImagePart(first_image + i - 1))
        if piece:
            out.append(TextPart(piece, tuple(tokenizer.encode(piece, add_special_tokens=False))))
    return out


def build_turns(scenario: Scenario, tokenizer) -> list[list[TextPart | ImagePart]]:
    """The prompt as turns of parts. Multi-turn: the first turn is the chat up to the first user
    message with the generation prompt; each later turn is the assistant's answer, its end
    token, and the next user message with the generation prompt, i.e. exactly what a chat app
    appends to a live context."""
    layout = chat_layout(tokenizer)

    def parts(messages: list[dict], prefix: str = "") -> list[TextPart | ImagePart]:
        text = prefix + layout.render(messages, add_generation_prompt=True)
        return _parts(tokenizer, text, 0, layout.image_token, layout.video_token)

    msgs = scenario.messages
    if scenario.kind != "multi-turn":
        return [parts(msgs)]
    first_user = next(i for i, m in enumerate(msgs) if m["role"] == "user")
    turns = [parts(msgs[:first_user + 1])]
    i = first_user + 1
    while i < len(msgs):
        if msgs[i]["role"] != "assistant" or i + 1 >= len(msgs):
            raise ConvertError(f"scenario {scenario.name}: multi-turn messages must alternate assistant, user")
        turns.append(parts([msgs[i + 1]], msgs[i]["content"] + IM_END + "\n"))
        i += 2
    return turns
