"""ModelSpec: the one typed description of a MiniCPM-V 4.6 checkpoint, read from its HF config.

Every converter, the synthetic builder and the validation harness take sizes from here; nothing
else parses config.json. Options this project cannot convert are rejected with a ConvertError.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import ConvertError

MODEL_TYPE = "minicpmv4_6"
ARCHITECTURE = "MiniCPMV4_6ForConditionalGeneration"
LINEAR, FULL = "linear_attention", "full_attention"

# Qwen3.5's interleaved M-RoPE default, used when the config has no mrope_section.
DEFAULT_MROPE_SECTION = (11, 11, 10)


@dataclass(frozen=True)
class TextSpec:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    layer_types: tuple[str, ...]
    full_attention_interval: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    attn_output_gate: bool
    conv_kernel: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    partial_rotary_factor: float
    mrope_section: tuple[int, ...]
    tie_word_embeddings: bool
    eos_token_id: int | None
    pad_token_id: int | None
    bos_token_id: int | None

    @property
    def rope_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def linear_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == LINEAR)

    @property
    def full_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == FULL)

    @property
    def linear_qk_dim(self) -> int:
        return self.linear_key_head_dim * self.linear_num_key_heads

    @property
    def linear_v_dim(self) -> int:
        return self.linear_value_head_dim * self.linear_num_value_heads

    @property
    def linear_conv_dim(self) -> int:
        return 2 * self.linear_qk_dim + self.linear_v_dim


@dataclass(frozen=True)
class VisionSpec:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_channels: int
    image_size: int  # the position-embedding grid is (image_size / patch_size)^2
    patch_size: int
    layer_norm_eps: float
    hidden_act: str
    insert_layer_id: int
    window_kernel_size: tuple[int, int]

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def window_hidden_size(self) -> int:
        return self.hidden_size * self.window_kernel_size[0] * self.window_kernel_size[1]

    @property
    def window_intermediate_size(self) -> int:
        return self.intermediate_size * self.window_kernel_size[0] * self.window_kernel_size[1]


@dataclass(frozen=True)
class ModelSpec:
    text: TextSpec
    vision: VisionSpec
    image_token_id: int | None
    video_token_id: int | None
    downsample_mode: str
    merge_kernel_size: tuple[int, int]
    merger_times: int
    drop_vision_last_layer: bool
    tie_word_embeddings: bool
    mtp_num_layers: int = 0
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def merger_hidden_size(self) -> int:
        return self.vision.hidden_size * self.merge_kernel_size[0] * self.merge_kernel_size[1]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ModelSpec":
        return _parse(config)


# A sanity bound, not a model's size: a corrupt layer count would otherwise build a list that long.
MAX_LAYERS = 1 << 12
# GGUF stores these numbers as uint32 and float32
UINT32_MAX, FLOAT32_MAX = (1 << 32) - 1, 3.4028234663852886e38


def _get(d: dict, key: str, where: str, default: Any = ...) -> Any:
    if key in d and d[key] is not None:
        return d[key]
    if default is ...:
        raise ConvertError(f"config.json: {where} has no '{key}'")
    return default


def _name(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _int(d: dict, key: str, where: str, default: Any = ..., *, lo: int = 1, hi: int = UINT32_MAX) -> int:
    """An integer field (bool is not one) between `lo` and `hi`."""
    v = _get(d, key, where, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConvertError(f"config.json: {_name(where, key)} is {v!r}, not an integer")
    if not lo <= v <= hi:
        raise ConvertError(f"config.json: {_name(where, key)} is {v}; it must be between {lo} and {hi}")
    return v


def _float(d: dict, key: str, where: str, default: float, *, hi: float = FLOAT32_MAX) -> float:
    """A positive number, at most `hi`."""
    v = _get(d, key, where, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= hi:  # NaN fails too
        raise ConvertError(f"config.json: {_name(where, key)} is {v!r}, not a positive number up to {hi:g}")
    return float(v)


def _bool(v: Any, name: str) -> bool:
    if not isinstance(v, bool):
        raise ConvertError(f"config.json: {name} is {v!r}, not true or false")
    return v


def _ints(v: Any, name: str, n: int | None = None, lo: int = 0) -> tuple[int, ...]:
    """A list of integers (of length n)."""
    if (not isinstance(v, (list, tuple)) or any(isinstance(x, bool) or not isinstance(x, int) or x < lo for x in v)
            or (n is not None and len(v) != n)):
        raise ConvertError(f"config.json: {name} is {v!r}, not a list of {n or ''}{' ' if n else ''}integers >= {lo}")
    return tuple(v)


def _dict(v: Any, name: str) -> dict:
    if not isinstance(v, dict):
        raise ConvertError(f"config.json: {name} is {v!r}, not an object")
    return v


def _parse(config: dict[str, Any]) -> ModelSpec:
    if not isinstance(config, dict):
        raise ConvertError("config.json is not a JSON object")
    mt = config.get("model_type")
    if mt != MODEL_TYPE:
        raise ConvertError(
            f"config.json has model_type {mt!r}; this tool converts MiniCPM-V 4.6 ({MODEL_TYPE!r}) only"
        )
    tc = config.get("text_config")
    vc = config.get("vision_config")
    if not isinstance(tc, dict) or not isinstance(vc, dict):
        raise ConvertError("config.json: MiniCPM-V 4.6 needs both 'text_config' and 'vision_config'")
    if tc.get("model_type", "qwen3_5_text") != "qwen3_5_text":
        raise ConvertError(f"config.json: text_config.model_type {tc.get('model_type')!r} is not 'qwen3_5_text'")

    T = "text_config"
    n_layers = _int(tc, "num_hidden_layers", T, hi=MAX_LAYERS)
    interval = _int(tc, "full_attention_interval", T, 4)
    layer_types = tc.get("layer_types")
    if layer_types is None:
        layer_types = [FULL if (i + 1) % interval == 0 else LINEAR for i in range(n_layers)]
    if not isinstance(layer_types, list) or not all(isinstance(t, str) for t in layer_types):
        raise ConvertError(f"config.json: text_config.layer_types is not a list of layer type names")
    layer_types = tuple(layer_types)
    if len(layer_types) != n_layers:
        raise ConvertError(f"config.json: layer_types has {len(layer_types)} entries, num_hidden_layers is {n_layers}")
    bad = sorted(set(layer_types) - {LINEAR, FULL})
    if bad:
        raise ConvertError(f"config.json: unsupported layer type(s) {bad}")

    rope = _dict(tc.get("rope_parameters") or {}, "text_config.rope_parameters")
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise ConvertError(f"config.json: rope_type {rope_type!r} is not supported (only 'default')")
    mrope = _ints(rope.get("mrope_section") or DEFAULT_MROPE_SECTION, "text_config.rope_parameters.mrope_section")
    hidden = _int(tc, "hidden_size", T)
    n_heads = _int(tc, "num_attention_heads", T)
    head_dim = _int(tc, "head_dim", T, hidden // n_heads)
    if sum(mrope) > head_dim:
        # llama.cpp aborts the process (not an error) on such a file
        raise ConvertError(f"config.json: rope mrope_section {list(mrope)} sums to more than head_dim {head_dim}")
    n_kv = _int(tc, "num_key_value_heads", T, n_heads)
    if n_heads % n_kv:
        raise ConvertError(f"config.json: num_attention_heads {n_heads} is not a multiple of num_key_value_heads {n_kv}")
    k_heads = _int(tc, "linear_num_key_heads", T)
    v_heads = _int(tc, "linear_num_value_heads", T)
    if v_heads % k_heads:
        raise ConvertError(f"config.json: linear_num_value_heads {v_heads} is not a multiple of linear_num_key_heads {k_heads}")
    kdim = _int(tc, "linear_key_head_dim", T)
    vdim = _int(tc, "linear_value_head_dim", T)
    if kdim != vdim:
        # llama.cpp's qwen35 graph assumes one head size for the recurrent state.
        raise ConvertError(f"config.json: linear_key_head_dim {kdim} != linear_value_head_dim {vdim} is not supported by llama.cpp")
    if tc.get("hidden_act", "silu") != "silu":
        raise ConvertError(f"config.json: text hidden_act {tc.get('hidden_act')!r} is not supported (only 'silu')")
    if tc.get("attn_output_gate", True) is not True:
        raise ConvertError("config.json: attn_output_gate=false is not supported (llama.cpp's qwen35 expects the gate)")

    tie = _bool(config.get("tie_word_embeddings", tc.get("tie_word_embeddings", False)), "tie_word_embeddings")
    text = TextSpec(
        vocab_size=_int(tc, "vocab_size", T),
        hidden_size=hidden,
        intermediate_size=_int(tc, "intermediate_size", T),
        num_layers=n_layers,
        layer_types=layer_types,
        full_attention_interval=interval,
        num_heads=n_heads,
        num_kv_heads=n_kv,
        head_dim=head_dim,
        attn_output_gate=True,
        conv_kernel=_int(tc, "linear_conv_kernel_dim", T),
        linear_key_head_dim=kdim,
        linear_value_head_dim=vdim,
        linear_num_key_heads=k_heads,
        linear_num_value_heads=v_heads,
        max_position_embeddings=_int(tc, "max_position_embeddings", T, 262144),
        rms_norm_eps=_float(tc, "rms_norm_eps", T, 1e-6),
        rope_theta=_float(rope, "rope_theta", "text_config.rope_parameters", _float(tc, "rope_theta", T, 10000.0)),
        partial_rotary_factor=_float(rope, "partial_rotary_factor", "text_config.rope_parameters",
                                     _float(tc, "partial_rotary_factor", T, 0.25, hi=1.0), hi=1.0),
        mrope_section=mrope,
        tie_word_embeddings=tie,
        eos_token_id=tc.get("eos_token_id"),
        pad_token_id=tc.get("pad_token_id"),
        bos_token_id=tc.get("bos_token_id"),
    )

    V = "vision_config"
    ps = vc.get("patch_size", 14)
    im = vc.get("image_size", 980)
    if isinstance(ps, (list, tuple)) or isinstance(im, (list, tuple)):
        raise ConvertError("config.json: non-square vision patch_size/image_size is not supported")
    wk = _ints(vc.get("window_kernel_size") or (2, 2), "vision_config.window_kernel_size")
    if wk != (2, 2):
        raise ConvertError(f"config.json: window_kernel_size {list(wk)} is not supported (llama.cpp's mtmd uses 2x2)")
    act = vc.get("hidden_act", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh":
        raise ConvertError(f"config.json: vision hidden_act {act!r} is not supported (only 'gelu_pytorch_tanh')")
    insert = _int(config, "insert_layer_id", "", _int(vc, "insert_layer_id", V, 6, lo=0), lo=0)
    v_layers = _int(vc, "num_hidden_layers", V, hi=MAX_LAYERS)
    if not 0 <= insert < v_layers:
        raise ConvertError(f"config.json: insert_layer_id {insert} is outside the {v_layers} vision layers")
    vision = VisionSpec(
        hidden_size=_int(vc, "hidden_size", V),
        intermediate_size=_int(vc, "intermediate_size", V),
        num_layers=v_layers,
        num_heads=_int(vc, "num_attention_heads", V),
        num_channels=_int(vc, "num_channels", V, 3),
        image_size=_int(vc, "image_size", V, 980),
        patch_size=_int(vc, "patch_size", V, 14),
        layer_norm_eps=_float(vc, "layer_norm_eps", V, 1e-6),
        hidden_act=act,
        insert_layer_id=insert,
        window_kernel_size=wk,  # type: ignore[arg-type]
    )

    merger_times = _int(config, "merger_times", "", 1)
    if merger_times != 1:
        raise ConvertError(f"config.json: merger_times={merger_times} is not supported (llama.cpp's mtmd has one merger MLP)")
    mk = _ints(config.get("merge_kernel_size") or (2, 2), "merge_kernel_size")
    if mk != (2, 2):
        raise ConvertError(f"config.json: merge_kernel_size {list(mk)} is not supported (llama.cpp's mtmd uses 2x2)")
    if config.get("drop_vision_last_layer", False):
        raise ConvertError("config.json: drop_vision_last_layer=true is not supported")
    mode = config.get("downsample_mode", "16x")
    if mode not in ("16x", "4x"):
        raise ConvertError(f"config.json: downsample_mode {mode!r} is not '16x' or '4x'")
    return ModelSpec(
        text=text,
        vision=vision,
        image_token_id=config.get("image_token_id"),
        video_token_id=config.get("video_token_id"),
        downsample_mode=mode,
        merge_kernel_size=mk,  # type: ignore[arg-type]
        merger_times=merger_times,
        drop_vision_last_layer=False,
        tie_word_embeddings=tie,
        mtp_num_layers=_int(tc, "mtp_num_hidden_layers", T, 0, lo=0),
        raw=config,
    )
