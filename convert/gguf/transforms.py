"""Tensor transforms between HF layout and what llama.cpp's qwen35 graph reads.

Each takes (float32 array, ModelSpec) and returns a float32 array. They are also used by
validation to compare an artifact's dequantized data with the source after the same steps.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..spec import ModelSpec


def _reorder_v(a: np.ndarray, axis: int, spec: ModelSpec, head_dim: int) -> np.ndarray:
    """V heads grouped by K head (HF repeat_interleave) -> tiled (ggml_repeat) along `axis`."""
    t = spec.text
    nk, nv = t.linear_num_key_heads, t.linear_num_value_heads
    if nk == nv:
        return a
    a = np.moveaxis(a, axis, 0)
    rest = a.shape[1:]
    a = a.reshape(nk, nv // nk, head_dim, *rest).swapaxes(0, 1).reshape(nv * head_dim, *rest)
    return np.ascontiguousarray(np.moveaxis(a, 0, axis))


def add_one(a, spec):
    return (a + np.float32(1)).astype(np.float32)


def neg_exp(a, spec):
    import torch  # torch's float32 exp, as llama.cpp's converter computes it (numpy's differs by 1 ulp)

    return (-torch.exp(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)))).numpy()


def squeeze(a, spec):
    return np.ascontiguousarray(a.reshape([d for d in a.shape if d != 1]))


def v_rows(a, spec):
    return _reorder_v(a, 0, spec, spec.text.linear_value_head_dim)


def v_heads(a, spec):
    return _reorder_v(a, 0, spec, 1)


def v_cols(a, spec):
    return _reorder_v(a, 1, spec, spec.text.linear_value_head_dim)


def v_rows_after_qk(a, spec):
    """in_proj_qkv / conv1d channels: q and k rows stay, the V rows are reordered."""
    qk = 2 * spec.text.linear_qk_dim
    return np.concatenate([a[:qk], v_rows(a[qk:], spec)], axis=0)


TRANSFORMS: dict[str, Callable[[np.ndarray, ModelSpec], np.ndarray]] = {
    "add_one": add_one,
    "neg_exp": neg_exp,
    "squeeze": squeeze,
    "v_rows": v_rows,
    "v_heads": v_heads,
    "v_cols": v_cols,
    "v_rows_after_qk": v_rows_after_qk,
}


def apply(names: tuple[str, ...], a: np.ndarray, spec: ModelSpec) -> np.ndarray:
    for n in names:
        a = TRANSFORMS[n](a, spec)
    return a
