"""Editing a good GGUF into a broken one, for the planted-fault tests."""

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFValueType, GGUFWriter


def rewrite(src, dst, *, kv=None, data=None, types=None, drop=(), arch=None):
    """Copy a GGUF through gguf-py's reader and writer, changing keys (same value type), tensor
    data (raw; same type unless given in `types`) or dropping tensors/keys; everything else is kept."""
    kv, data, types = kv or {}, data or {}, types or {}
    r = GGUFReader(src)
    w = GGUFWriter(dst, arch or r.fields["general.architecture"].contents())
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in drop:
            continue
        sub = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
        w.add_key_value(name, kv.get(name, f.contents()), f.types[0], sub_type=sub)
    for t in r.tensors:
        if t.name not in drop:
            w.add_tensor(t.name, np.array(data.get(t.name, t.data)), raw_dtype=types.get(t.name, T(t.tensor_type)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def raw(path, name):
    return next(t for t in GGUFReader(path).tensors if t.name == name).data
