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


def _get(d: dict, key: str, where: str, default: Any = ...) -> Any:
    if key in d and d[key] is not None:
        return d[key]
    if default is ...:
        raise ConvertError(f"config.json: {where} has no '{key}'")
    return default


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

    n_layers = int(_get(tc, "num_hidden_layers", "text_config"))
    interval = int(tc.get("full_attention_interval") or 4)
    layer_types = tc.get("layer_types")
    if layer_types is None:
        layer_types = [FULL if (i + 1) % interval == 0 else LINEAR for i in range(n_layers)]
    layer_types = tuple(layer_types)
    if len(layer_types) != n_layers:
        raise ConvertError(f"config.json: layer_types has {len(layer_types)} entries, num_hidden_layers is {n_layers}")
    bad = sorted(set(layer_types) - {LINEAR, FULL})
    if bad:
        raise ConvertError(f"config.json: unsupported layer type(s) {bad}")

    rope = tc.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise ConvertError(f"config.json: rope_type {rope_type!r} is not supported (only 'default')")
    mrope = tuple(rope.get("mrope_section") or DEFAULT_MROPE_SECTION)
    head_dim = int(tc.get("head_dim") or int(_get(tc, "hidden_size", "text_config")) // int(_get(tc, "num_attention_heads", "text_config")))
    if sum(mrope) > head_dim:
        # llama.cpp aborts the process (not an error) on such a file
        raise ConvertError(f"config.json: rope mrope_section {list(mrope)} sums to more than head_dim {head_dim}")
    hidden = int(_get(tc, "hidden_size", "text_config"))
    n_heads = int(_get(tc, "num_attention_heads", "text_config"))
    k_heads = int(_get(tc, "linear_num_key_heads", "text_config"))
    v_heads = int(_get(tc, "linear_num_value_heads", "text_config"))
    if v_heads % k_heads:
        raise ConvertError(f"config.json: linear_num_value_heads {v_heads} is not a multiple of linear_num_key_heads {k_heads}")
    kdim = int(_get(tc, "linear_key_head_dim", "text_config"))
    vdim = int(_get(tc, "linear_value_head_dim", "text_config"))
    if kdim != vdim:
        # llama.cpp's qwen35 graph assumes one head size for the recurrent state.
        raise ConvertError(f"config.json: linear_key_head_dim {kdim} != linear_value_head_dim {vdim} is not supported by llama.cpp")
    if tc.get("hidden_act", "silu") != "silu":
        raise ConvertError(f"config.json: text hidden_act {tc.get('hidden_act')!r} is not supported (only 'silu')")
    if tc.get("attn_output_gate", True) is not True:
        raise ConvertError("config.json: attn_output_gate=false is not supported (llama.cpp's qwen35 expects the gate)")

    tie = bool(config.get("tie_word_embeddings", tc.get("tie_word_embeddings", False)))
    text = TextSpec(
        vocab_size=int(_get(tc, "vocab_size", "text_config")),
        hidden_size=hidden,
        intermediate_size=int(_get(tc, "intermediate_size", "text_config")),
        num_layers=n_layers,
        layer_types=layer_types,
        full_attention_interval=interval,
        num_heads=n_heads,
        num_kv_heads=int(tc.get("num_key_value_heads") or n_heads),
        head_dim=head_dim,
        attn_output_gate=True,
        conv_kernel=int(_get(tc, "linear_conv_kernel_dim", "text_config")),
        linear_key_head_dim=kdim,
        linear_value_head_dim=vdim,
        linear_num_key_heads=k_heads,
        linear_num_value_heads=v_heads,
        max_position_embeddings=int(tc.get("max_position_embeddings") or 262144),
        rms_norm_eps=float(tc.get("rms_norm_eps") or 1e-6),
        rope_theta=float(rope.get("rope_theta", tc.get("rope_theta", 10000.0))),
        partial_rotary_factor=float(rope.get("partial_rotary_factor", tc.get("partial_rotary_factor", 0.25))),
        mrope_section=mrope,
        tie_word_embeddings=tie,
        eos_token_id=tc.get("eos_token_id"),
        pad_token_id=tc.get("pad_token_id"),
        bos_token_id=tc.get("bos_token_id"),
    )

    ps = vc.get("patch_size", 14)
    im = vc.get("image_size", 980)
    if isinstance(ps, (list, tuple)) or isinstance(im, (list, tuple)):
        raise ConvertError("config.json: non-square vision patch_size/image_size is not supported")
    wk = tuple(vc.get("window_kernel_size") or (2, 2))
    if wk != (2, 2):
        raise ConvertError(f"config.json: window_kernel_size {list(wk)} is not supported (llama.cpp's mtmd uses 2x2)")
    act = vc.get("hidden_act", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh":
        raise ConvertError(f"config.json: vision hidden_act {act!r} is not supported (only 'gelu_pytorch_tanh')")
    insert = int(config.get("insert_layer_id", vc.get("insert_layer_id", 6)))
    v_layers = int(_get(vc, "num_hidden_layers", "vision_config"))
    if not 0 <= insert < v_layers:
        raise ConvertError(f"config.json: insert_layer_id {insert} is outside the {v_layers} vision layers")
    vision = VisionSpec(
        hidden_size=int(_get(vc, "hidden_size", "vision_config")),
        intermediate_size=int(_get(vc, "intermediate_size", "vision_config")),
        num_layers=v_layers,
        num_heads=int(_get(vc, "num_attention_heads", "vision_config")),
        num_channels=int(vc.get("num_channels", 3)),
        image_size=int(im),
        patch_size=int(ps),
        layer_norm_eps=float(vc.get("layer_norm_eps", 1e-6)),
        hidden_act=act,
        insert_layer_id=insert,
        window_kernel_size=wk,  # type: ignore[arg-type]
    )

    merger_times = int(config.get("merger_times", 1))
    if merger_times != 1:
        raise ConvertError(f"config.json: merger_times={merger_times} is not supported (llama.cpp's mtmd has one merger MLP)")
    mk = tuple(config.get("merge_kernel_size") or (2, 2))
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
        mtp_num_layers=int(tc.get("mtp_num_hidden_layers") or 0),
        raw=config,
    )
