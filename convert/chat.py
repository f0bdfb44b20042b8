"""How a chat (messages with text and image items) becomes prompt text: one place for the
calibration samples (quantize/calibration.py) and the validation scenarios (validate/scenarios.py).

Checkpoints differ in where their chat template lives and what it does with images, so the
layout is chosen once per tokenizer/processor, in this order:

1. `processor`: the processor's chat template, when it renders an image item as the processor's
   image placeholder (what MiniCPM-V 4.6's own template does).
2. `tokenizer`: the tokenizer's chat template, when it places images itself (a folder whose
   template is only in tokenizer_config.json: its processor has none).
3. `placeholders`: a template that drops images (a fine-tune's text-only template): every content
   is flattened to a string in which each image item is a marker, the template renders that, and
   each marker becomes the processor's placeholder, so the image stays where it was in its turn.
4. `chatml`: no template at all: MiniCPM-V 4.6's ChatML turns, built here.

Like `checkpoint` and `errors`, a leaf: it imports nothing of the project but `errors`, so
quantize/ and validate/ may both use it.
"""

from __future__ import annotations

from typing import Any

from .errors import ConvertError

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# MiniCPM-V 4.6's placeholders (the tokenizer's image_token / video_token), used when neither the
# tokenizer nor the processor names one.
IMAGE_TOKEN, VIDEO_TOKEN = "<|image_pad|>", "<|video_pad|>"
# What MiniCPM-V 4.6's template renders for an image or video item: the placeholder and a newline.
ITEM_SUFFIX = "\n"
# Stands for an image/video item while a template renders flattened content; no template alters it.
_MARK = "@@minicpmv-edge-{kind}-{i}@@"

DESCRIPTIONS = {
    "processor": "processor chat template",
    "tokenizer": "tokenizer chat template",
    "placeholders": "{source} chat template + processor image placeholders",
    "chatml": "built-in ChatML layout (the checkpoint has no chat template)",
}

_PROBE = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}]


def _kind(item: Any) -> str:
    """'image', 'video' or 'text' for one content item (the keys MiniCPM-V's template accepts)."""
    if isinstance(item, dict):
        t = item.get("type")
        if t == "image" or (t is None and ("image" in item or "image_url" in item)):
            return "image"
        if t == "video" or (t is None and "video" in item):
            return "video"
    return "text"


def _template_of(obj) -> str | None:
    """A processor's or tokenizer's default chat template, None when it has none."""
    tpl = getattr(obj, "chat_template", None)
    if isinstance(tpl, dict):
        tpl = tpl.get("default")
    return tpl if isinstance(tpl, str) and tpl.strip() else None


class ChatLayout:
    """render(messages, add_generation_prompt) -> prompt text with one image placeholder per image
    item, where the item was. `kind` is one of DESCRIPTIONS; `description` says it in words."""

    def __init__(self, kind: str, tokenizer, *, processor=None, template: str | None = None, source: str = ""):
        self.kind = kind
        self.tokenizer = tokenizer
        self.processor = processor
        self.template = template
        self.description = DESCRIPTIONS[kind].format(source=source)
        owner = processor if processor is not None else tokenizer
        self.image_token = getattr(owner, "image_token", None) or IMAGE_TOKEN
        self.video_token = getattr(owner, "video_token", None) or VIDEO_TOKEN

    def render(self, messages: list[dict], *, add_generation_prompt: bool) -> str:
        try:
            if self.kind == "processor":
                return self.processor.apply_chat_template(messages, tokenize=False,
                                                          add_generation_prompt=add_generation_prompt)
            if self.kind == "tokenizer":
                return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                          add_generation_prompt=add_generation_prompt)
        except Exception as e:  # jinja and transformers raise many types (raise_exception in templates)
            raise ConvertError(f"the {self.description} cannot render this chat ({e.__class__.__name__}: "
                               f"{str(e)[:160]})") from None
        marks: dict[str, str] = {}
        flat = [{**m, "content": self._flatten(m.get("content"), marks)} for m in messages]
        if self.kind == "chatml":
            text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in flat)
            text += f"{IM_START}assistant\n" if add_generation_prompt else ""
        else:
            try:
                text = self.tokenizer.apply_chat_template(flat, chat_template=self.template, tokenize=False,
                                                          add_generation_prompt=add_generation_prompt)
            except Exception as e:
                raise ConvertError(f"the {self.description} cannot render this chat ({e.__class__.__name__}: "
                                   f"{str(e)[:160]})") from None
        for mark, placeholder in marks.items():
            if text.count(mark) != 1:
                raise ConvertError(f"the checkpoint's chat template does not render each message's text once "
                                   f"(an image marker appears {text.count(mark)} times); cannot place the images")
            text = text.replace(mark, placeholder)
        return text

    def _flatten(self, content, marks: dict[str, str]) -> str:
        """Content as one string, image/video items as markers (templates that predate images
        render string content, and some only string content)."""
        if content is None or isinstance(content, str):
            return content or ""
        out = []
        for item in content:
            kind = _kind(item)
            if kind == "text":
                out.append(item.get("text", "") if isinstance(item, dict) else str(item))
                continue
            mark = _MARK.format(kind=kind, i=len(marks))
            marks[mark] = (self.image_token if kind == "image" else self.video_token) + ITEM_SUFFIX
            out.append(mark)
        return "".join(out)


def _places_image(render, token: str) -> bool:
    """Whether a template renders one image item as exactly one placeholder."""
    try:
        return render(_PROBE).count(token) == 1
    except Exception:  # a template that cannot render the probe does not place images
        return False


def chat_layout(tokenizer, processor=None) -> ChatLayout:
    """The layout for this tokenizer (and processor, if given): see the module docstring."""
    token = getattr(processor, "image_token", None) or getattr(tokenizer, "image_token", None) or IMAGE_TOKEN
    ptpl = _template_of(processor) if processor is not None else None
    if ptpl and _places_image(lambda m: processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True),
                              token):
        return ChatLayout("processor", tokenizer, processor=processor)
    ttpl = _template_of(tokenizer)
    if ttpl and _places_image(lambda m: tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True),
                              token):
        return ChatLayout("tokenizer", tokenizer, processor=processor)
    if ttpl or ptpl:
        return ChatLayout("placeholders", tokenizer, processor=processor, template=ttpl or ptpl,
                          source="tokenizer" if ttpl else "processor")
    return ChatLayout("chatml", tokenizer, processor=processor)
