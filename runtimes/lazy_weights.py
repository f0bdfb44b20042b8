"""A model's large weights held compact and widened to float32 only while their part runs.

The PyTorch reference computes in float32, but a full-size checkpoint in float32 is 5 GB per model
and the harness needs two (fp32 and fake-quant). Here every "unit" (each element of the model's
outermost ModuleLists, e.g. a vision encoder or decoder layer, and every other large part that
holds no list) keeps its parameters in a side store; the Parameter itself holds a zero-strided
float32 placeholder of the right shape (so dtype and shape reads elsewhere see float32, as in a
float32 model), and a forward pre-hook fills it with float32 values that the post-hook drops again.
Large token embeddings gather only the rows they look up.

A store holds the checkpoint's own dtype (bfloat16 and float16 widen to float32 exactly), so the
numbers equal a float32 model's. A *variant* replaces some parameters with other values, fetched
on demand (the fake-quant reference: dequantized from the quantized bytes), and is switched on
around the calls that use it; the model, its small parts and its hooks are shared.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

_WIDE = torch.float32
MIN_UNIT_PARAMS = 1 << 20  # parts smaller than this stay resident in float32
CHUNK_BYTES = 64 << 20  # a larger bias-free Linear (lm_head) is computed in slices of rows this big
POOL_BYTES = 512 << 20  # float32 buffers kept for reuse; larger parts (run once per image) are freed


_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_NARROW = {"BF16": "bfloat16", "F16": "float16"}


def storage_dtype(ckpt) -> str:
    """The dtype to hold a checkpoint's model in: the checkpoint's if every float tensor is bfloat16
    (or every one float16), since those widen to float32 exactly; float32 otherwise (a mixed
    checkpoint's float32 tensors would be rounded)."""
    dts = {ckpt.info(n).dtype for n in ckpt.names()} & _FLOAT_DTYPES
    return _NARROW[next(iter(dts))] if len(dts) == 1 and next(iter(dts)) in _NARROW else "float32"


def _placeholder(p: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=_WIDE).expand(p.shape)


def _units(root: torch.nn.Module, min_params: int) -> list[torch.nn.Module]:
    """Each element of an outermost ModuleList, and each other part with no list inside and at
    least `min_params` parameters (the parts a parent calls as a whole)."""
    out: list[torch.nn.Module] = []

    def visit(m: torch.nn.Module) -> None:
        for child in m.children():
            if isinstance(child, torch.nn.ModuleList):
                out.extend(child)
            elif any(isinstance(x, torch.nn.ModuleList) for x in child.modules()):
                visit(child)
            elif sum(p.numel() for p in child.parameters()) >= max(1, min_params):
                out.append(child)

    visit(root)
    return out


class LazyWeights:
    """Install on a loaded model: its units' parameters move to a compact store (kept in their
    current dtype), everything else is made float32 and stays resident."""

    def __init__(self, model: torch.nn.Module, min_params: int | None = None):
        self.model = model
        self.units = _units(model, MIN_UNIT_PARAMS if min_params is None else min_params)
        self._base: dict[int, torch.Tensor] = {}  # id(param) -> compact tensor
        self._names: dict[str, int] = {}
        self._variants: dict[str, dict[int, Callable[[torch.Tensor], None]]] = {}
        self._rows: dict[str, dict[int, Callable]] = {}
        self._resident: dict[str, dict[int, tuple]] = {}
        self.active: str | None = None
        self._pool: dict[tuple, list[torch.Tensor]] = {}
        self._pool_bytes = 0
        self._handles = []
        self._filled: set[int] = set()
        self._pooled: set[int] = set()
        unit_params = {id(p) for u in self.units for p in u.parameters()}
        for n, p in model.named_parameters(remove_duplicate=False):
            self._names[n] = id(p)
        with torch.no_grad():
            for p in model.parameters():
                if id(p) in unit_params:
                    self._base[id(p)] = p.data
                    p.data = _placeholder(p)
                elif p.is_floating_point() and p.dtype != _WIDE:
                    p.data = p.data.to(_WIDE)
            for b in model.buffers():
                if b.is_floating_point() and b.dtype != _WIDE:
                    b.data = b.data.to(_WIDE)
        for u in self.units:
            if isinstance(u, torch.nn.Embedding):
                u.forward = self._embedding_forward(u)
            elif isinstance(u, torch.nn.Linear) and u.bias is None and u.weight.numel() * 4 > CHUNK_BYTES:
                u.forward = self._chunked_linear_forward(u)  # a 248k-row lm_head: never whole in float32
            else:
                self._handles.append(u.register_forward_pre_hook(self._fill))
                self._handles.append(u.register_forward_hook(self._drop))

    # -- variants ---------------------------------------------------------------------------------

    def add_variant(self, name: str, fetch: dict[str, Callable[[torch.Tensor], None]],
                    rows: dict[str, Callable] | None = None) -> None:
        """Parameter name -> a function writing its float32 value in this variant into the tensor
        it is given; `rows`: parameter name -> f(ids) returning just those rows (embeddings)."""
        bad = [n for n in fetch if n not in self._names]
        if bad:
            raise ValueError(f"the model has no parameter {', '.join(bad[:3])}")
        self._variants[name] = {self._names[n]: f for n, f in fetch.items() if self._names[n] in self._base}
        self._rows[name] = {self._names[n]: f for n, f in (rows or {}).items()}
        # small resident parameters: their variant value, swapped in while the variant is active
        self._resident[name] = {}
        for n, f in fetch.items():
            pid = self._names[n]
            if pid not in self._base:
                p = dict(self.model.named_parameters(remove_duplicate=False))[n]
                val = torch.empty(tuple(p.shape), dtype=_WIDE)
                f(val)
                self._resident[name][pid] = (p, val)

    def drop_variant(self, name: str) -> None:
        for d in (self._variants, self._rows, self._resident):
            d.pop(name, None)

    @contextlib.contextmanager
    def using(self, name: str | None):
        """Compute with variant `name` (None: the stored weights) inside the block."""
        if name == self.active:
            yield
            return
        if self.active is not None:
            raise RuntimeError(f"variant {self.active!r} is active; one at a time")
        swapped = []
        with torch.no_grad():
            for p, val in self._resident.get(name, {}).values():
                swapped.append((p, p.data))
                p.data = val
        self.active = name
        try:
            yield
        finally:
            self.active = None
            for p, data in swapped:
                p.data = data

    # -- materialization --------------------------------------------------------------------------

    def _fill(self, module, args):
        with torch.no_grad():
            for p in module.parameters():
                pid = id(p)
                if pid not in self._base or pid in self._filled:
                    continue  # resident, or shared with a unit already running (a tied weight)
                src = self._base[pid]
                f = self._variants.get(self.active, {}).get(pid)
                if f is None and src.dtype == _WIDE:
                    p.data = src  # stored in float32 already: nothing to widen
                else:
                    # a reused buffer: a fresh 100 MB allocation per layer and step page-faults
                    buf = self._take(tuple(src.shape))
                    f(buf) if f is not None else buf.copy_(src)
                    p.data = buf
                    self._pooled.add(pid)
                self._filled.add(pid)

    def _take(self, shape: tuple) -> torch.Tensor:
        free = self._pool.get(shape)
        if free:
            buf = free.pop()
            self._pool_bytes -= buf.numel() * 4
            return buf
        return torch.empty(shape, dtype=_WIDE)

    def _give(self, buf: torch.Tensor) -> None:
        if self._pool_bytes + buf.numel() * 4 <= POOL_BYTES:
            self._pool.setdefault(tuple(buf.shape), []).append(buf)
            self._pool_bytes += buf.numel() * 4

    def _drop(self, module, args, output):
        for p in module.parameters():
            pid = id(p)
            if pid in self._filled:
                if pid in self._pooled:
                    self._give(p.data)
                    self._pooled.discard(pid)
                p.data = _placeholder(p)
                self._filled.discard(pid)
        return output

    def _embedding_forward(self, emb: torch.nn.Embedding):
        pid = id(emb.weight)

        def forward(ids: torch.Tensor) -> torch.Tensor:
            rows = self._rows.get(self.active, {}).get(pid)
            if rows is not None:
                return rows(ids)
            f = self._variants.get(self.active, {}).get(pid)
            if f is not None:  # a variant that cannot gather rows: the whole table, once per call
                full = torch.empty(tuple(emb.weight.shape), dtype=_WIDE)
                f(full)
                return full[ids]
            return self._base[pid][ids].to(_WIDE)  # a lookup, then the exact widening

        return forward

    def _chunked_linear_forward(self, lin: torch.nn.Linear):
        pid = id(lin.weight)
        n_out, n_in = lin.weight.shape
        step = max(1, CHUNK_BYTES // (4 * n_in))

        def forward(x: torch.Tensor) -> torch.Tensor:
            rows = self._rows.get(self.active, {}).get(pid)
            f = self._variants.get(self.active, {}).get(pid)
            if f is not None and rows is None:  # a variant that cannot give rows: the whole weight
                w = torch.empty((n_out, n_in), dtype=_WIDE)
                f(w)
                return torch.nn.functional.linear(x, w)
            out = torch.empty((*x.shape[:-1], n_out), dtype=_WIDE)
            buf = self._take((step, n_in))
            # each logit is one row's dot product: slicing the rows changes no sum (test_lazy_weights)
            for r0 in range(0, n_out, step):
                r1 = min(r0 + step, n_out)
                w = rows(torch.arange(r0, r1)) if rows is not None else buf[:r1 - r0].copy_(self._base[pid][r0:r1])
                out[..., r0:r1] = torch.nn.functional.linear(x, w)
            self._give(buf)
            return out

        return forward

    def release_pool(self) -> None:
        self._pool.clear()
        self._pool_bytes = 0

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._variants.clear()
        self._rows.clear()
        self._resident.clear()
        self.release_pool()
        self._base.clear()
