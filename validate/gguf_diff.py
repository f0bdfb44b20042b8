"""Compare two GGUF files key by key and tensor by tensor.

Used to check this project's files against llama.cpp's own converter output, and by engineers
to see how two artifacts differ. Tensor data is compared after dequantization to float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType

from quantize import ggml


@dataclass
class GGUFDiff:
    keys_only_a: list[str] = field(default_factory=list)
    keys_only_b: list[str] = field(default_factory=list)
    keys_differ: dict[str, tuple] = field(default_factory=dict)
    tensors_only_a: list[str] = field(default_factory=list)
    tensors_only_b: list[str] = field(default_factory=list)
    tensors_type_differ: dict[str, tuple[str, str]] = field(default_factory=dict)
    tensors_shape_differ: dict[str, tuple] = field(default_factory=dict)
    tensors_bytes_differ: dict[str, float] = field(default_factory=dict)  # name -> max |a-b| after dequant
    tensors_equal: int = 0

    def is_identical(self) -> bool:
        return not (self.keys_only_a or self.keys_only_b or self.keys_differ or self.tensors_only_a or
                    self.tensors_only_b or self.tensors_type_differ or self.tensors_shape_differ or
                    self.tensors_bytes_differ)

    def summary(self) -> str:
        lines = [f"{self.tensors_equal} tensors byte-identical"]
        for label, v in (("keys only in A", self.keys_only_a), ("keys only in B", self.keys_only_b),
                         ("tensors only in A", self.tensors_only_a), ("tensors only in B", self.tensors_only_b)):
            if v:
                lines.append(f"{label}: {', '.join(v)}")
        for k, (a, b) in self.keys_differ.items():
            lines.append(f"key {k}: {_short(a)} != {_short(b)}")
        for k, (a, b) in self.tensors_type_differ.items():
            lines.append(f"tensor {k}: type {a} != {b}")
        for k, (a, b) in self.tensors_shape_differ.items():
            lines.append(f"tensor {k}: shape {a} != {b}")
        for k, d in self.tensors_bytes_differ.items():
            lines.append(f"tensor {k}: bytes differ, max |a-b| = {d:.3g}")
        return "\n".join(lines)


def _short(v) -> str:
    s = repr(v)
    return s if len(s) < 80 else s[:77] + "..."


def read_kv(r: GGUFReader) -> dict[str, object]:
    out = {}
    for name, f in r.fields.items():
        if name.startswith("GGUF."):
            continue
        t = f.types[0] if f.types else None
        if t == GGUFValueType.ARRAY:
            sub = f.types[-1]
            if sub == GGUFValueType.STRING:
                out[name] = tuple(bytes(f.parts[i]).decode("utf-8", "surrogateescape") for i in f.data)
            else:
                out[name] = tuple(np.concatenate([f.parts[i] for i in f.data]).tolist()) if f.data else ()
        elif t == GGUFValueType.STRING:
            out[name] = bytes(f.parts[f.data[0]]).decode("utf-8", "surrogateescape")
        else:
            out[name] = f.parts[f.data[0]].tolist()[0]
    return out


def tensor_f32(t) -> np.ndarray:
    shape = tuple(int(x) for x in reversed(t.shape.tolist()))
    return ggml.decode(t.data, t.tensor_type, shape)


def diff(a: str | Path, b: str | Path, *, ignore_keys: tuple[str, ...] = ()) -> GGUFDiff:
    ra, rb = GGUFReader(a), GGUFReader(b)
    d = GGUFDiff()
    ka, kb = read_kv(ra), read_kv(rb)
    ign = set(ignore_keys)
    d.keys_only_a = sorted(set(ka) - set(kb) - ign)
    d.keys_only_b = sorted(set(kb) - set(ka) - ign)
    for k in sorted(set(ka) & set(kb) - ign):
        va, vb = ka[k], kb[k]
        if isinstance(va, float) or isinstance(vb, float):
            same = np.float32(va) == np.float32(vb)
        else:
            same = va == vb
        if not same:
            d.keys_differ[k] = (va, vb)
    ta = {t.name: t for t in ra.tensors}
    tb = {t.name: t for t in rb.tensors}
    d.tensors_only_a = sorted(set(ta) - set(tb))
    d.tensors_only_b = sorted(set(tb) - set(ta))
    for n in sorted(set(ta) & set(tb)):
        x, y = ta[n], tb[n]
        if x.tensor_type != y.tensor_type:
            d.tensors_type_differ[n] = (x.tensor_type.name, y.tensor_type.name)
            continue
        if x.shape.tolist() != y.shape.tolist():
            d.tensors_shape_differ[n] = (x.shape.tolist(), y.shape.tolist())
            continue
        if np.array_equal(np.asarray(x.data).view(np.uint8), np.asarray(y.data).view(np.uint8)):
            d.tensors_equal += 1
        else:
            d.tensors_bytes_differ[n] = float(np.abs(tensor_f32(x) - tensor_f32(y)).max())
    return d
