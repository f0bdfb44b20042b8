"""llama.cpp's quantization mixtures (llama-quantize's file types) as data, and the per-tensor
type choice of src/llama-quant.cpp (llama-cpp-python 0.3.36), rule for rule.

A mixture is a default block type plus bumps for sensitive tensors. `TypeChooser` walks the
tensors in file order, keeping llama.cpp's counters (the shared attn_v/attn_qkv counter, the
ffn_down layer counter), so the same tensor order gives the same types as llama-quantize.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, LlamaFileType as F

from .ggml import ggml_dims


@dataclass(frozen=True)
class Mixture:
    name: str
    ftype: F
    default: T
    # category -> rule name (see _RULES); categories not listed keep the default
    bumps: dict[str, str] = field(default_factory=dict)


def _m(name, ftype, default, **bumps):
    return Mixture(name, ftype, default, bumps)


MIXTURES: dict[str, Mixture] = {m.name: m for m in (
    _m("Q8_0", F.MOSTLY_Q8_0, T.Q8_0),
    _m("Q4_0", F.MOSTLY_Q4_0, T.Q4_0, ffn_down="legacy_imatrix_guard"),
    _m("Q4_1", F.MOSTLY_Q4_1, T.Q4_1),
    _m("Q5_0", F.MOSTLY_Q5_0, T.Q5_0, ffn_down="legacy_imatrix_guard"),
    _m("Q5_1", F.MOSTLY_Q5_1, T.Q5_1),
    _m("Q2_K", F.MOSTLY_Q2_K, T.Q2_K, attn_v="q2k_attn_v", ffn_down="to:Q3_K", attn_output="to:Q3_K"),
    _m("Q3_K_S", F.MOSTLY_Q3_K_S, T.Q3_K),
    _m("Q3_K_M", F.MOSTLY_Q3_K_M, T.Q3_K, attn_v="first2_q5k_else_q4k", ffn_down="q3km_ffn_down", attn_output="to:Q4_K"),
    _m("Q3_K_L", F.MOSTLY_Q3_K_L, T.Q3_K, attn_v="to:Q5_K", ffn_down="to:Q5_K", attn_output="to:Q5_K"),
    _m("Q4_K_S", F.MOSTLY_Q4_K_S, T.Q4_K, attn_v="first4_q5k", ffn_down="first8th_q5k"),
    _m("Q4_K_M", F.MOSTLY_Q4_K_M, T.Q4_K, attn_v="more_bits_q6k", ffn_down="more_bits_q6k"),
    _m("Q5_K_S", F.MOSTLY_Q5_K_S, T.Q5_K),
    _m("Q5_K_M", F.MOSTLY_Q5_K_M, T.Q5_K, attn_v="more_bits_q6k", ffn_down="more_bits_q6k"),
    _m("Q6_K", F.MOSTLY_Q6_K, T.Q6_K),
)}


def use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _rule(name: str, i: int, n: int, cur: T, ctx: "TypeChooser") -> T:
    if name == "more_bits_q6k":
        return T.Q6_K if use_more_bits(i, n) else cur
    if name == "first4_q5k":
        return T.Q5_K if i < 4 else cur
    if name == "first2_q5k_else_q4k":
        return T.Q5_K if i < 2 else T.Q4_K
    if name == "first8th_q5k":
        return T.Q5_K if i < n // 8 else cur
    if name == "q3km_ffn_down":  # non-Falcon: Q5_K for the first 16th, Q4_K after
        return T.Q5_K if i < n // 16 else T.Q4_K
    if name == "q2k_attn_v":
        return T.Q4_K if ctx.n_gqa >= 4 else T.Q3_K
    if name == "legacy_imatrix_guard":  # Q4_0/Q5_0 with an imatrix: first 8th of ffn_down one step up
        if ctx.has_imatrix and i < n // 8:
            return T.Q4_1 if cur == T.Q4_0 else T.Q5_1
        return cur
    if name.startswith("to:"):
        return T[name[3:]]
    raise KeyError(name)


# llama.cpp's tensor categories (tensor_get_category), first match wins
_CATEGORIES = [
    ("output", re.compile(r"output\.weight")),
    ("token_embd", re.compile(r"(per_layer_)?token_embd\.weight")),
    ("attn_v", re.compile(r".*attn_(qkv|kv_b|v)\.weight.*")),  # the attn_v-like category
    ("attn_k", re.compile(r".*attn_k\.weight.*")),
    ("attn_q", re.compile(r".*attn_q\.weight.*")),
    ("attn_output", re.compile(r".*attn_output\.weight.*")),
    ("ffn_up", re.compile(r".*ffn_up.*")),
    ("ffn_gate", re.compile(r".*ffn_gate.*")),
    ("ffn_down", re.compile(r".*ffn_down.*")),
]

# Substrings that keep a tensor out of quantization (tensor_allows_quantization, as it applies here)
_NO_QUANT = ("_norm.weight", "ffn_gate_inp.weight", "ssm_conv1d", ".position_embd", ".patch_embd", ".patch_merger")

FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0, T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0}


def category(name: str) -> str:
    for cat, rx in _CATEGORIES:
        if rx.fullmatch(name):
            return cat
    return "other"


def allows_quantization(name: str, shape: tuple[int, ...]) -> bool:
    """llama-quantize quantizes tensors of ggml_n_dims >= 2: trailing ggml dims of 1 (leading numpy
    ones) do not count, so a [1, n] weight (a Gated DeltaNet with one value head) stays as it came."""
    return len(ggml_dims(shape)) >= 2 and name.endswith("weight") and not any(s in name for s in _NO_QUANT)


def fallback(qtype: T, ncols: int) -> tuple[T, bool]:
    """(type, fell_back): llama.cpp's tensor_type_fallback for rows of `ncols` values."""
    if ncols % GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype, False
    fb = FALLBACK.get(qtype, qtype)
    if ncols % GGML_QUANT_SIZES[fb][0] != 0:
        fb = T.F16
    return fb, True


@dataclass
class Overrides:
    """llama-quantize's command-line overrides."""
    pure: bool = False
    output_type: T | None = None
    token_embedding_type: T | None = None
    tensor_types: list[tuple[re.Pattern, T]] = field(default_factory=list)  # first match wins

    def describe(self) -> dict:
        """The overrides given, as llama-quantize's flags name them (for manifests); {} if none."""
        out: dict = {}
        if self.pure:
            out["pure"] = True
        if self.output_type is not None:
            out["output_tensor_type"] = self.output_type.name
        if self.token_embedding_type is not None:
            out["token_embedding_type"] = self.token_embedding_type.name
        if self.tensor_types:
            out["tensor_type"] = [f"{rx.pattern}={t.name}" for rx, t in self.tensor_types]
        return out


class TypeChooser:
    """Stateful per-tensor type choice; call `choose` once per tensor, in file order."""

    def __init__(self, mixture: Mixture, names: list[str], n_layer: int, *, n_gqa: int = 1,
                 has_imatrix: bool = False, overrides: Overrides | None = None):
        self.mix, self.n_layer, self.n_gqa, self.has_imatrix = mixture, n_layer, n_gqa, has_imatrix
        self.ov = overrides or Overrides()
        cats = [category(n) for n in names]
        self.tied = "output" not in cats
        self.n_attn_v = cats.count("attn_v")
        self.i_attn_v = self.i_ffn_down = 0
        self.fallbacks: list[str] = []

    def choose(self, name: str, shape: tuple[int, ...], input_type: T) -> T:
        """The type of `name` (numpy shape, so shape[-1] is ggml's ne[0]); `input_type` is kept
        for tensors llama.cpp does not quantize."""
        if not allows_quantization(name, shape):
            return input_type
        cat = category(name)
        ov = self.ov
        if ov.token_embedding_type is not None and cat == "token_embd":
            return ov.token_embedding_type
        if ov.output_type is not None and cat == "output":
            return ov.output_type
        t = self.mix.default
        manual = False
        for rx, qt in ov.tensor_types:
            if rx.search(name):
                t, manual = qt, True
                break
        if not manual and not ov.pure:
            t = self._impl(name, shape, t, cat)
        t, fell = fallback(t, shape[-1])
        if fell:
            self.fallbacks.append(name)
        return t

    def _impl(self, name: str, shape: tuple[int, ...], t: T, cat: str) -> T:
        bumps = self.mix.bumps
        if cat == "output" or (self.tied and cat == "token_embd"):
            if self.ov.output_type is not None:
                return self.ov.output_type
            if shape[-1] % GGML_QUANT_SIZES[t][0] != 0:
                return T.Q8_0
            return t if t == T.Q8_0 else T.Q6_K
        if cat == "token_embd":
            return t
        if cat == "attn_v":
            if "attn_v" in bumps:
                t = _rule(bumps["attn_v"], self.i_attn_v, self.n_attn_v, t, self)
            self.i_attn_v += 1
            return t
        if cat == "ffn_down":
            if "ffn_down" in bumps:
                t = _rule(bumps["ffn_down"], self.i_ffn_down, self.n_layer, t, self)
            self.i_ffn_down += 1
            return t
        if cat == "attn_output" and "attn_output" in bumps:
            return _rule(bumps["attn_output"], 0, 1, t, self)
        return t


def parse_mixture(name: str) -> Mixture | None:
    return MIXTURES.get(name.upper())
