"""Tensor transforms between HF layout and what llama.cpp's qwen35 graph reads.

Each takes (float32 array, ModelSpec) and returns a float32 array. They are also used by
validation to compare an artifact's dequantized data with the source after the same steps.
`INVERSES` undo them (GGUF layout -> HF layout), for validation's fake-quantized reference:
exact for the reorders and squeeze, to float32 rounding for add_one and neg_exp.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..spec import ModelSpec


def _reorder_v(a: np.ndarray, axis: int, spec: ModelSpec, head_dim: int, inverse: bool = False) -> np.ndarray:
    """V heads grouped by K head (HF repeat_interleave) -> tiled (ggml_repeat) along `axis`;
    `inverse` goes back (tiled -> grouped)."""
    t = spec.text
    nk, nv = t.linear_num_key_heads, t.linear_num_value_heads
    if nk == nv:
        return a
    a = np.moveaxis(a, axis, 0)
    rest = a.shape[1:]
    groups = (nv // nk, nk) if inverse else (nk, nv // nk)
    a = a.reshape(*groups, head_dim, *rest).swapaxes(0, 1).reshape(nv * head_dim, *rest)
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


# -- inverses: (array after the transform, spec, shape before it) -> array before it -------------

def _sub_one(a, spec, shape):
    return (a - np.float32(1)).astype(np.float32)


def _log_neg(a, spec, shape):
    import torch  # same library as neg_exp, so log(-(-exp(x))) rounds the same way

    return torch.log(-torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))).numpy()


def _unsqueeze(a, spec, shape):
    return np.ascontiguousarray(a.reshape(shape))


def _v_rows_after_qk_inv(a, spec, shape):
    qk = 2 * spec.text.linear_qk_dim
    return np.concatenate([a[:qk], _reorder_v(a[qk:], 0, spec, spec.text.linear_value_head_dim, inverse=True)], axis=0)


INVERSES: dict[str, Callable[[np.ndarray, ModelSpec, tuple[int, ...]], np.ndarray]] = {
    "add_one": _sub_one,
    "neg_exp": _log_neg,
    "squeeze": _unsqueeze,
    "v_rows": lambda a, spec, shape: _reorder_v(a, 0, spec, spec.text.linear_value_head_dim, inverse=True),
    "v_heads": lambda a, spec, shape: _reorder_v(a, 0, spec, 1, inverse=True),
    "v_cols": lambda a, spec, shape: _reorder_v(a, 1, spec, spec.text.linear_value_head_dim, inverse=True),
    "v_rows_after_qk": _v_rows_after_qk_inv,
}


def invert(names: tuple[str, ...], a: np.ndarray, spec: ModelSpec, source_shape: tuple[int, ...]) -> np.ndarray:
    """Undo `apply(names, ., spec)`: GGUF layout back to the HF tensor of `source_shape`."""
    shapes = [tuple(source_shape)]  # the shape before each transform (only squeeze changes it)
    for n in names:
        shapes.append(tuple(d for d in shapes[-1] if d != 1) if n == "squeeze" else shapes[-1])
    for n, shape in zip(reversed(names), reversed(shapes[:-1])):
        a = INVERSES[n](a, spec, shape)
    return a
