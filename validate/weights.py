"""Static artifact validation: a GGUF's tensors and keys against its source checkpoint.

No runtime is involved. Every tensor of the artifact is traced back through the export plan
(HF source, transforms, shape) and compared, after dequantization to float32, with the source
re-quantized to the artifact's own type by `quantize.ggml` -- bit for bit, since that encoder is
byte-exact with ggml. When exact equality is impossible (an imatrix the file records but that is
not at hand, or a type this project cannot encode) a relative-error bound is checked instead.
Failures say what the data looks like (another tensor's data, the source with a transform left
out), which is how swaps and forgotten `+1`s show up.

The keys are compared with what this project's exporter writes for the same checkpoint, kind,
mode and file type (the same as llama.cpp's converter writes).

`fake_quant_state_dict` is the second reference: the source quantized the artifact's way and
mapped back to HF names and layout, to load into the transformers model.
"""

from __future__ import annotations

import dataclasses
import math
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

from convert.checkpoint import Checkpoint
from convert.errors import ConvertError
from convert.gguf import metadata, transforms
from convert.gguf.export import FLOATS, Quant, load_imatrix, quantized_plan
from convert.gguf.plan import TensorPlan, build_plan, float_type_rule
from convert.gguf.reader import GGUFFile
from convert.gguf.writer import source_chunks
from quantize import ggml
from quantize.mixtures import FALLBACK, MIXTURES, allows_quantization


# general.architecture -> artifact kind
KINDS = {"qwen35": "decoder", "clip": "mmproj"}
PROJECTOR_TYPE = "minicpmv4_6"
# The token compressor inserted after insert_layer_id: only the 16x projector carries it.
MODE_16X_PREFIX = "v.vit_merger."

# Intermediates a published file may have been quantized through, tried in this order after the
# direct path (llama-quantize usually runs on an F16 or BF16 GGUF, not on the checkpoint).
INTERMEDIATES: dict[str, T | None] = {"exact": None, "exact-from-f16": T.F16, "exact-from-bf16": T.BF16}
FLOAT_TYPES = (T.F32, T.F16, T.BF16)
# Types whose bytes an importance matrix changes (ggml ignores it for floats and Q8_0).
IMATRIX_INDEPENDENT = (*FLOAT_TYPES, T.Q8_0)

# Where exactness is impossible: the artifact's relative error vs the source may be at most this
# factor times the error of a plain re-quantization with the same type. An imatrix lowers the
# *weighted* error, so the plain one can go up a little; 1.5x leaves room without hiding faults
# (a swapped or untransformed tensor is off by ~100%).
BOUND_FACTOR: dict[T, float] = {}
DEFAULT_BOUND_FACTOR = 1.5
# Types quantize.ggml cannot encode are bounded by a kin type it can (with a looser factor).
PROXY: dict[T, T] = {
    T.IQ4_XS: T.Q4_K, T.IQ4_NL: T.Q4_0, T.IQ3_S: T.Q3_K, T.IQ3_XXS: T.Q3_K,
    T.IQ2_S: T.Q2_K, T.IQ2_XS: T.Q2_K, T.IQ2_XXS: T.Q2_K, T.IQ1_S: T.Q2_K, T.IQ1_M: T.Q2_K,
}
PROXY_BOUND_FACTOR = 2.0
# "Looks like" comparisons of float data allow float32 rounding, e.g. (w + 1) - 1 != w.
LOOKS_LIKE_TOL = 1e-5


@dataclass
class TensorCheck:
    name: str  # GGUF tensor name
    qtype: str  # the artifact's ggml type (the plan's when the tensor is missing)
    status: str  # "pass" | "bound" | "fail"
    rel_err: float  # |artifact - source after transforms| / |source| (the quantization error)
    max_abs_err: float  # max |artifact - source after transforms|
    matched: str  # "exact", "exact-from-f16", "exact-from-bf16", "bound" or "" (fail)
    message: str = ""  # "<file>: tensor <name>: <what>" for a failure, else ""


def _open(gguf_path) -> tuple[GGUFFile, dict]:
    try:
        r = GGUFFile(gguf_path)
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as e:
        raise ConvertError(f"{Path(gguf_path).name}: not a readable GGUF file ({e.__class__.__name__}: {e})") from None
    return r, r.kv


def _kind(path, r: GGUFFile, kv: dict) -> tuple[str, str | None]:
    name = Path(path).name
    arch = kv.get("general.architecture")
    kind = KINDS.get(arch)
    if kind is None:
        raise ConvertError(f"{name}: general.architecture {arch!r} is not MiniCPM-V 4.6 (qwen35 decoder or clip projector)")
    if kind == "decoder":
        return kind, None
    pt = kv.get("clip.projector_type")
    if pt is not None and pt != PROJECTOR_TYPE:
        raise ConvertError(f"{name}: clip projector type {pt!r} is not MiniCPM-V 4.6's ({PROJECTOR_TYPE})")
    # from the tensors, not clip.vision.projector.scale_factor: that key is itself under test
    return kind, "16x" if any(t.name.startswith(MODE_16X_PREFIX) for t in r.tensors) else "4x"


def artifact_kind(gguf_path) -> tuple[str, str | None]:
    """("decoder", None) or ("mmproj", "16x" | "4x")."""
    r, kv = _open(gguf_path)
    return _kind(gguf_path, r, kv)


# -- plans -----------------------------------------------------------------------------------

def quant_of_file_type(file_type: int | None) -> Quant | None:
    """The export Quant behind a general.file_type, None for one this toolchain does not make."""
    for label, (t, ft) in FLOATS.items():
        if ft == file_type:
            return Quant(t.name, ft, float_type=t)
    for mix in MIXTURES.values():
        if mix.ftype == file_type:
            return Quant(mix.name, mix.ftype, mixture=mix)
    return None


def _plans(ckpt: Checkpoint, kind: str, mode: str | None, kv: dict, order: list[str]) -> tuple[list[TensorPlan], bool]:
    """The plan with the types the artifact's file type implies; (plans, types_known).

    Mixture types depend on tensor order (llama.cpp's per-category counters), so the plan is
    walked in the artifact's order, as llama-quantize walked its input.
    """
    base = build_plan(ckpt, kind, T.F32, mode or "16x")
    pos = {n: i for i, n in enumerate(order)}
    base.sort(key=lambda p: pos.get(p.name, len(pos)))
    quant = quant_of_file_type(kv.get("general.file_type"))
    if quant is None:
        return base, False
    if quant.float_type is not None:
        typed = {p.name: p for p in build_plan(ckpt, kind, quant.float_type, mode or "16x")}
        return [typed[p.name] for p in base], True
    t, v = ckpt.spec.text, ckpt.spec.vision
    n_layer = t.num_layers if kind == "decoder" else v.num_layers
    n_gqa = t.num_heads // t.num_kv_heads if kind == "decoder" else 1
    plans, _ = quantized_plan(base, quant, n_layer, n_gqa=n_gqa, has_imatrix="quantize.imatrix.file" in kv)
    return plans, True


def _imatrix_vectors(imatrix, kind: str, kv: dict, plans: list[TensorPlan], gguf_path: Path) -> tuple[dict, bool]:
    """(importance vectors by GGUF name, unknown): `unknown` when the file records an imatrix that
    is not at hand (neither passed nor found at the recorded path)."""
    if kind != "decoder":
        return {}, False  # projectors are never quantized with an imatrix here
    if isinstance(imatrix, dict):
        return imatrix, False
    if imatrix is not None:
        return load_imatrix(imatrix, plans)[0], False
    recorded = kv.get("quantize.imatrix.file")
    if recorded is None:
        return {}, False
    for cand in (Path(recorded), gguf_path.parent / recorded, gguf_path.parent / Path(recorded).name):
        if cand.is_file():
            try:
                return load_imatrix(cand, plans)[0], False
            except ConvertError:
                pass
    return {}, True


# -- tensor data -----------------------------------------------------------------------------

@dataclass
class _Scan:
    """One pass over a tensor: the artifact vs a candidate source x and vs requant(x)."""
    equal: bool = True  # artifact == requant(x), bit for bit
    d2: float = 0.0  # |art - x|^2
    x2: float = 0.0  # |x|^2
    q2: float = 0.0  # |requant(x) - x|^2
    max_abs: float = 0.0  # max |art - x|

    @staticmethod
    def _rel(a2: float, b2: float) -> float:
        return math.sqrt(a2 / b2) if b2 > 0 else (0.0 if a2 == 0 else math.inf)

    @property
    def rel(self) -> float:
        return self._rel(self.d2, self.x2)

    @property
    def q_rel(self) -> float:
        return self._rel(self.q2, self.x2)

def _requant(qt: T, imat: np.ndarray | None, via: T | None = None) -> Callable[[np.ndarray], np.ndarray]:
    def f(x: np.ndarray) -> np.ndarray:
        if via is not None:
            x = ggml.decode(ggml.encode(x, via), via, x.shape)
        return ggml.decode(ggml.encode(x, qt, imat), qt, x.shape)
    return f


def _scan(art_rows: Callable[[int, int], np.ndarray], chunks: Iterable[np.ndarray],
          requant: Callable | None, stop_early: bool = False) -> _Scan:
    s, r0 = _Scan(), 0
    for x in chunks:
        r1 = r0 + (x.shape[0] if x.ndim else 1)
        a = art_rows(r0, r1).reshape(x.shape)
        x64 = x.astype(np.float64)
        d = a - x64
        s.d2 += float(np.square(d).sum())
        s.x2 += float(np.square(x64).sum())
        if d.size:
            s.max_abs = float(np.fmax(s.max_abs, np.abs(d).max()))  # NaN only when nothing else
        if requant is not None:
            q = requant(x)
            s.q2 += float(np.square(q.astype(np.float64) - x64).sum())
            if s.equal and not np.array_equal(q, a, equal_nan=True):
                s.equal = False
                if stop_early:
                    return s
        r0 = r1
    return s


class _TensorJudge:
    """Compares one artifact tensor with candidate sources (the planned one, variants, others)."""

    def __init__(self, ckpt: Checkpoint, t, plan: TensorPlan, imat, imatrix_unknown: bool):
        self.ckpt, self.t, self.plan, self.imat = ckpt, t, plan, imat
        self.qt = T(t.tensor_type)
        self.shape = plan.shape
        encodable = self.qt in ggml.SUPPORTED
        # exact comparison needs the encoder and, for imatrix-dependent types, the imatrix
        self.exact = encodable and not (imatrix_unknown and self.qt not in IMATRIX_INDEPENDENT)
        self.bound_type = self.qt if encodable else PROXY.get(self.qt)
        self.factor = (BOUND_FACTOR.get(self.qt, DEFAULT_BOUND_FACTOR) if encodable else PROXY_BOUND_FACTOR)

    def art_rows(self, r0: int, r1: int) -> np.ndarray:
        data = self.t.data
        if data.ndim != len(self.shape):  # stored with its trailing ggml dims of 1 dropped
            data = data.reshape(*self.shape[:-1], -1)
        if len(self.shape) < 2:
            return ggml.decode(data, self.qt, self.shape)
        return ggml.decode(data[r0:r1], self.qt, (r1 - r0, *self.shape[1:]))

    def paths(self) -> Iterator[tuple[str, T | None]]:
        for label, via in INTERMEDIATES.items():
            # a float type is its own intermediate; bf16 adds nothing for a bf16 source
            if via is not None and (self.qt in FLOAT_TYPES or (via == T.BF16 and self._source_is_bf16())):
                continue
            yield label, via

    def _source_is_bf16(self) -> bool:
        return self.ckpt.info(self.plan.source).dtype == "BF16"

    def first(self, chunks_fn) -> _Scan:
        """The full pass against the planned source: exactness of the direct path and the errors."""
        rq = _requant(self.qt, self.imat) if self.exact else (_requant(self.bound_type, None) if self.bound_type else None)
        return _scan(self.art_rows, chunks_fn(), rq)

    def explains(self, chunks_fn, first: _Scan | None = None) -> tuple[str, _Scan] | None:
        """How a candidate source explains the artifact: an exact path, "bound", or None."""
        s = first or self.first(chunks_fn)
        if self.exact:
            if s.equal:
                return "exact", s
            for label, via in list(self.paths())[1:]:
                if _scan(self.art_rows, chunks_fn(), _requant(self.qt, self.imat, via), stop_early=True).equal:
                    return label, s
            return None
        if self.bound_type is not None and s.rel <= self.factor * s.q_rel:
            return "bound", s
        return None

    def looks_like(self, chunks_fn, first: _Scan | None = None) -> tuple[str, _Scan] | None:
        """As `explains`, or close to the candidate within the bound or float rounding."""
        s = first or self.first(chunks_fn)
        hit = self.explains(chunks_fn, s)
        if hit:
            return hit
        if s.rel <= max(self.factor * s.q_rel, LOOKS_LIKE_TOL):
            return "close", s
        return None


def _ggml_shape(shape) -> str:
    return "x".join(str(d) for d in reversed(tuple(shape)))


def _omitted_variants(ckpt: Checkpoint, p: TensorPlan) -> Iterator[tuple[str, Callable]]:
    """The source with each transform left out in turn (those that keep the planned shape)."""
    if not p.transforms:
        return
    raw = ckpt.tensor(p.source)
    planned = transforms.apply(p.transforms, raw, ckpt.spec)
    for i, name in enumerate(p.transforms):
        rest = p.transforms[:i] + p.transforms[i + 1:]
        try:
            v = transforms.apply(rest, raw, ckpt.spec)
        except ValueError:
            continue
        # a transform that is a no-op here (e.g. a V reorder with as many V as K heads) says nothing
        if tuple(v.shape) == tuple(p.shape) and not np.array_equal(v, planned, equal_nan=True):
            yield name, (lambda v=v: iter([v]))


def _diagnose(ckpt: Checkpoint, judge: _TensorJudge, first: _Scan, same_shape: list[TensorPlan]) -> str:
    p = judge.plan
    for name, chunks_fn in _omitted_variants(ckpt, p):
        if judge.looks_like(chunks_fn):
            return f"looks like the source without transform {name}"
    # a swap: the data of another tensor of the same shape (cheap pre-filter on the plain error,
    # so a failing tensor of the full model does not re-quantize every same-shape tensor)
    limit = max(3 * first.q_rel, 0.1)
    for other in same_shape:
        if other.name == p.name:
            continue
        s = _scan(judge.art_rows, source_chunks(ckpt, other, allow_nonfinite=True), None)
        if s.rel > limit:
            continue
        hit = judge.looks_like(lambda o=other: source_chunks(ckpt, o, allow_nonfinite=True))
        if hit:
            how = "holds" if hit[0].startswith("exact") else "looks like"
            return f"{how} the data of {other.name} (rel err {first.rel:.3g} vs its own source)"
    what = (f"data differs from the source quantized as {judge.qt.name}: rel err {first.rel:.3g} vs the source "
            f"(re-quantizing it gives {first.q_rel:.3g}), max |diff| {first.max_abs:.3g}")
    if judge.exact and first.rel <= judge.factor * first.q_rel:
        what += "; within the quantization error bound (another quantizer, or an imatrix the file does not record?)"
    return what


def check_tensors(ckpt: Checkpoint, gguf_path, *, imatrix=None, progress: bool = False,
                  expect_types: bool = True) -> list[TensorCheck]:
    """Every tensor of the artifact against the checkpoint, plus the planned tensors it lacks.

    imatrix: an imatrix file (path) or {GGUF name: importance vector}; by default the file the
    artifact records in `quantize.imatrix.file`, when it exists. expect_types: also require each
    tensor's type to be what the file type's rules give (llama.cpp's converter for F32/F16/BF16,
    llama-quantize's mixture otherwise); turn off for files made with per-tensor overrides (the
    tensors llama.cpp never quantizes must still be F32). NaN/Inf in the source are compared as
    they are (the exporter refuses them; a file made with --allow-nonfinite still checks).
    """
    from tqdm import tqdm

    gguf_path = Path(gguf_path)
    fname = gguf_path.name
    r, kv = _open(gguf_path)
    kind, mode = _kind(gguf_path, r, kv)
    order = [t.name for t in r.tensors]
    plans, types_known = _plans(ckpt, kind, mode, kv, order)
    by_name = {p.name: p for p in plans}
    vecs, imatrix_unknown = _imatrix_vectors(imatrix, kind, kv, plans, gguf_path)
    out: list[TensorCheck] = []

    def fail(name, qt, what, rel=math.nan, mx=math.nan):
        out.append(TensorCheck(name, qt, "fail", rel, mx, "", f"{fname}: tensor {name}: {what}"))

    for t in tqdm(r.tensors, desc=fname, disable=not progress, leave=False):
        qt = T(t.tensor_type)
        p = by_name.get(t.name)
        if p is None:
            fail(t.name, qt.name, "unexpected tensor (this checkpoint's export has no such tensor)")
            continue
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        if ggml.ggml_dims(shape) != ggml.ggml_dims(p.shape):  # llama-quantize writes [n, 1] as [n]
            fail(t.name, qt.name, f"shape {_ggml_shape(shape)}, expected {_ggml_shape(p.shape)}")
            continue
        problems = []
        if expect_types and types_known:
            # a [1, n] weight (ggml_n_dims 1): llama-quantize keeps it in its input's type (F32 from
            # this project's F32 file, F16 / BF16 from a converter's), llama.cpp's converter
            # quantizes it under --outtype q8_0; its type is the producer's choice, its data is checked
            either = (p.qtype == T.F32 and not allows_quantization(p.name, p.shape) and len(p.shape) >= 2
                      and float_type_rule(p.name, p.shape, T.F16, kind=kind) != T.F32)
            if qt != p.qtype and not either:
                problems.append(f"type {qt.name}, expected {p.qtype.name}")
        elif qt != T.F32 and float_type_rule(p.name, p.shape, T.F16, kind=kind) == T.F32:
            problems.append(f"type {qt.name}, expected F32 (llama.cpp keeps this tensor in F32)")
        judge = _TensorJudge(ckpt, t, dataclasses.replace(p, qtype=qt), vecs.get(p.name), imatrix_unknown)
        chunks_fn = lambda p=p: source_chunks(ckpt, p, allow_nonfinite=True)  # noqa: E731
        if judge.bound_type is None:
            problems.append(f"type {qt.name} can be neither re-quantized nor bounded here")
            first, hit = judge.first(chunks_fn), None
        else:
            first = judge.first(chunks_fn)
            hit = judge.explains(chunks_fn, first)
            if hit is None:
                same = [o for o in plans if o.shape == p.shape]
                problems.append(_diagnose(ckpt, judge, first, same))
        if problems:
            fail(t.name, qt.name, "; ".join(problems), first.rel, first.max_abs)
        else:
            status = "bound" if hit[0] == "bound" else "pass"
            out.append(TensorCheck(t.name, qt.name, status, first.rel, first.max_abs, hit[0]))
    present = set(order)
    for p in plans:
        if p.name not in present:
            fail(p.name, p.qtype.name if types_known else "?", "missing from the artifact")
    return out


# -- metadata --------------------------------------------------------------------------------

# Keys that legitimately differ between producers (names, sizes, licences, quantizer notes, split
# bookkeeping); general.architecture is compared, general.file_type against the tensor types.
IGNORED_PREFIXES = ("general.", "quantize.", "split.")
COMPARED_ANYWAY = ("general.architecture",)
# Arrays compared as sets first (an entry missing matters more than where it sits): key -> noun
SET_LIKE = {"tokenizer.ggml.merges": "merge"}


def _fmt(v) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return np.float32(a) == np.float32(b) or (math.isnan(a) and math.isnan(b))
        except (TypeError, ValueError):
            return False
    return a == b


def _array_diff(key: str, exp: tuple, got: tuple) -> str | None:
    noun = SET_LIKE.get(key)
    if noun:
        es, gs = set(exp), set(got)
        parts = []
        missing = [m for m in exp if m not in gs]
        extra = [m for m in got if m not in es]
        if missing:
            parts.append(f"{len(missing)} {noun}{'s' if len(missing) > 1 else ''} missing (e.g. {missing[0]!r})")
        if extra:
            parts.append(f"{len(extra)} unexpected {noun}{'s' if len(extra) > 1 else ''} (e.g. {extra[0]!r})")
        if parts:
            return "; ".join(parts)
    if len(exp) == len(got) and all(_same(a, b) for a, b in zip(exp, got)):
        return None
    n = min(len(exp), len(got))
    diff = [i for i in range(n) if not _same(exp[i], got[i])]
    parts = [f"{len(got)} entries, expected {len(exp)}"] if len(exp) != len(got) else []
    if diff:
        i = diff[0]
        parts.append(f"{len(diff)} of {n} entries differ, first at index {i}: expected {_fmt(exp[i])}, found {_fmt(got[i])}")
    elif noun:
        parts.append(f"same {noun}s in another order")
    return "; ".join(parts)


def expected_kv(ckpt: Checkpoint, kind: str, mode: str | None, file_type: int, n_params: int = 0) -> dict:
    """The keys this project's exporter writes for the checkpoint (read back from a header-only file)."""
    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN35] if kind == "decoder" else "clip"
    ft = gguf.LlamaFileType(file_type)
    w = gguf.GGUFWriter(None, arch)
    metadata.general(w, ckpt, n_params, None, mmproj=kind == "mmproj")
    if kind == "decoder":
        metadata.decoder(w, ckpt, ft)
    else:
        metadata.mmproj(w, ckpt, ft, mode or "16x")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "expected.gguf"
        w.write_header_to_file(path)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        w.close()
        return GGUFFile(path).kv


def _file_type_problem(file_type, types: set[T]) -> str | None:
    """general.file_type against the tensor types, loosely (check_tensors holds every tensor to its
    planned type): a float file holds only F32 and its float type; a mixture's default type, or the
    type it falls back to for short rows, must appear."""
    q = quant_of_file_type(file_type)
    if q is None:
        return None  # a type this toolchain does not make: nothing to hold it to
    if q.float_type is not None:
        bad = sorted(t.name for t in types - {T.F32, q.float_type})
        return f"file type {q.label}, but tensors of type {', '.join(bad)}" if bad else None
    want = {q.mixture.default, FALLBACK.get(q.mixture.default, q.mixture.default)}
    if not want & types:
        return f"file type {q.label}, but no tensor is {' or '.join(sorted(t.name for t in want))}"
    return None


def check_metadata(ckpt: Checkpoint, gguf_path) -> list[str]:
    """One "<file>: <key>: <what>" message per mismatch with the keys our exporter would write."""
    gguf_path = Path(gguf_path)
    fname = gguf_path.name
    r, got = _open(gguf_path)
    kind, mode = _kind(gguf_path, r, got)
    ft = got.get("general.file_type")
    msgs = []
    if ft is None:
        msgs.append(f"{fname}: general.file_type: missing")
        ft = int(gguf.LlamaFileType.MOSTLY_F16)
    else:
        try:
            gguf.LlamaFileType(ft)
        except ValueError:
            msgs.append(f"{fname}: general.file_type: unknown value {ft}")
            ft = int(gguf.LlamaFileType.MOSTLY_F16)
        prob = _file_type_problem(ft, {T(t.tensor_type) for t in r.tensors})
        if prob:
            msgs.append(f"{fname}: general.file_type: {prob}")
    exp = expected_kv(ckpt, kind, mode, ft)

    def compared(k: str) -> bool:
        return k in COMPARED_ANYWAY or not k.startswith(IGNORED_PREFIXES)

    for k in [k for k in exp if compared(k)] + [k for k in got if compared(k) and k not in exp]:
        if k not in got:
            msgs.append(f"{fname}: {k}: missing (expected {_fmt(exp[k])})")
        elif k not in exp:
            msgs.append(f"{fname}: {k}: unexpected key (value {_fmt(got[k])})")
        elif isinstance(exp[k], tuple) and isinstance(got[k], tuple):
            d = _array_diff(k, exp[k], got[k])
            if d:
                msgs.append(f"{fname}: {k}: {d}")
        elif not _same(exp[k], got[k]):
            msgs.append(f"{fname}: {k}: expected {_fmt(exp[k])}, found {_fmt(got[k])}")
    return msgs


# -- the fake-quantized reference ------------------------------------------------------------

def fake_quant_state_dict(ckpt: Checkpoint, gguf_paths, *, imatrix=None, types: dict | None = None,
                          col_orders: dict | None = None) -> dict:
    """HF name -> torch float32 tensor: iter_fake_quant's tensors in one dict (later ones win)."""
    return dict(iter_fake_quant(ckpt, gguf_paths, imatrix=imatrix, types=types, col_orders=col_orders))


def iter_fake_quant(ckpt: Checkpoint, gguf_paths, *, imatrix=None, types: dict | None = None,
                    col_orders: dict | None = None):
    """(HF name, torch float32 tensor), one at a time: the source as each artifact's tensor type
    would store it (a generator, so a reference can load them without a second copy of the model).

    Every non-F32 tensor of the given artifacts is re-quantized from the source after transforms
    with its own ggml type (and imatrix: passed, or found at the path the decoder records; without
    one, plain), dequantized and mapped back to HF layout by the inverse transforms. F32 tensors are
    left out: they hold the source exactly, and inverting add_one / neg_exp would only add float32
    rounding to weights the model already has. When two artifacts hold the same HF tensor (the 16x
    and 4x projectors), the later one's version is kept. `types`, when given, receives each HF
    tensor's ggml type (F32 ones included), for the reference's activation emulation; `col_orders`
    receives, for each weight whose columns the GGUF stores in another order (ssm_out's V heads),
    that order as HF column indices: ggml quantizes the matmul's input in blocks along the GGUF
    order, and a Q8_K block of 256 then spans other heads than in HF order.
    """
    import torch

    for p, qt, imat in _fake_quant_plans(ckpt, gguf_paths, imatrix, types, col_orders):
        q = _requant_rows(ckpt, p, _requant(qt, imat))
        hf = transforms.invert(p.transforms, q, ckpt.spec, ckpt.info(p.source).shape)
        yield p.source, torch.from_numpy(np.ascontiguousarray(hf, dtype=np.float32))


def _fake_quant_plans(ckpt: Checkpoint, gguf_paths, imatrix, types: dict | None, col_orders: dict | None):
    """(plan, ggml type, imatrix vector) of every non-F32 tensor of the artifacts, in file order;
    fills `types` and `col_orders` as iter_fake_quant documents."""
    for path in [gguf_paths] if isinstance(gguf_paths, (str, Path)) else gguf_paths:
        path = Path(path)
        r, kv = _open(path)
        kind, mode = _kind(path, r, kv)
        plans = {p.name: p for p in build_plan(ckpt, kind, T.F32, mode or "16x")}
        vecs, _ = _imatrix_vectors(imatrix, kind, kv, list(plans.values()), path)
        for t in r.tensors:
            qt = T(t.tensor_type)
            p = plans.get(t.name)
            if p is None:
                raise ConvertError(f"{path.name}: tensor {t.name}: not produced from this checkpoint; run check_tensors")
            if types is not None:
                types[p.source] = qt
            if col_orders is not None and "v_cols" in p.transforms:
                cols = ckpt.info(p.source).shape[1]
                idx = transforms.apply(("v_cols",), np.arange(cols, dtype=np.float32)[None, :], ckpt.spec)
                col_orders[p.source] = idx[0].astype(np.int64)
            if qt == T.F32:
                continue
            if qt not in ggml.SUPPORTED:
                raise ConvertError(f"{path.name}: tensor {t.name}: type {qt.name} cannot be fake-quantized here")
            yield p, qt, vecs.get(p.name)


class PackedFakeQuant:
    """One fake-quantized tensor held as its quantized bytes (a quarter to a sixth of float32 for the
    k-quants) and dequantized on demand: the same float32 values iter_fake_quant yields."""

    def __init__(self, ckpt: Checkpoint, p: TensorPlan, qt: T, imat):
        self.qt, self.plan, self.spec = qt, p, ckpt.spec
        self.hf_shape = tuple(ckpt.info(p.source).shape)
        self.data = _quant_rows(ckpt, p, lambda x: ggml.encode(x, qt, imat))

    def fill(self, out) -> None:
        """Write the HF-layout float32 value into the torch tensor `out`."""
        import torch

        q = ggml.decode(self.data, self.qt, tuple(self.plan.shape))
        hf = transforms.invert(self.plan.transforms, q, self.spec, self.hf_shape)
        out.copy_(torch.from_numpy(np.ascontiguousarray(hf, dtype=np.float32)))

    def rows(self, ids):
        """Rows `ids` (a torch integer tensor of any shape) of a row-wise stored, untransformed
        tensor, e.g. a token embedding: only those rows are dequantized."""
        import torch

        flat = ids.reshape(-1).numpy()
        uniq, inv = np.unique(flat, return_inverse=True)
        vals = ggml.decode(self.data.reshape(self.plan.shape[0], -1)[uniq], self.qt, (len(uniq), self.plan.shape[1]))
        return torch.from_numpy(vals[inv]).reshape(*ids.shape, self.plan.shape[1])

    @property
    def row_wise(self) -> bool:
        return not self.plan.transforms and len(self.plan.shape) == 2 and self.hf_shape == tuple(self.plan.shape)


def packed_fake_quant(ckpt: Checkpoint, gguf_paths, *, imatrix=None, types: dict | None = None,
                      col_orders: dict | None = None):
    """(HF name, PackedFakeQuant), one tensor at a time: iter_fake_quant's tensors, kept quantized."""
    for p, qt, imat in _fake_quant_plans(ckpt, gguf_paths, imatrix, types, col_orders):
        yield p.source, PackedFakeQuant(ckpt, p, qt, imat)


def _quant_rows(ckpt: Checkpoint, p: TensorPlan, encode) -> np.ndarray:
    """The tensor after its transforms in its stored form (ggml.encode), encoded slice by slice."""
    parts = [encode(chunk) for chunk in source_chunks(ckpt, p, allow_nonfinite=True)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


def _requant_rows(ckpt: Checkpoint, p: TensorPlan, requant) -> np.ndarray:
    """The tensor after its transforms, fake-quantized slice by slice of rows into one float32 array
    (the 248k-row embedding never exists twice in float32 beside its quantized form)."""
    out = None
    r0 = 0
    for chunk in source_chunks(ckpt, p, allow_nonfinite=True):
        q = requant(chunk)
        if out is None:
            if q.shape == tuple(p.shape):
                return q  # one chunk: the whole tensor
            out = np.empty(p.shape, np.float32)
        out[r0:r0 + len(q)] = q
        r0 += len(q)
        del chunk, q
    return out


def load_fake_quant(reference_runtime, state_dict, *, restore: bool = True) -> dict:
    """Load `state_dict` (HF names; a dict, or an iterable of (name, tensor) pairs that is consumed
    one tensor at a time) into the reference's transformers model; returns the replaced values, so
    `load_fake_quant(rt, returned)` restores the model. With tied embeddings lm_head follows
    embed_tokens (llama.cpp's output matmul reads the quantized token_embd too).

    restore=False keeps no copies and empties a dict as it goes (tensors are copied into the model
    in place); with an iterable only one fake-quantized tensor exists besides the model at a time:
    on the full-size model that is 5 GB less at the peak than building the whole dict first."""
    import torch

    model = reference_runtime.model
    own = model.state_dict()
    embed = "model.language_model.embed_tokens.weight"
    tie = reference_runtime.ckpt.spec.tie_word_embeddings and "lm_head.weight" in own
    if isinstance(state_dict, dict):
        sd = state_dict if not restore else dict(state_dict)
        _check_loadable(sd.items(), own)
        tied = tie and embed in sd and "lm_head.weight" not in sd
        items = ((k, sd.pop(k) if not restore else sd[k]) for k in list(sd))
    else:
        if restore:
            raise ValueError("restore=True needs a dict")
        items, tied = state_dict, None  # decided below: lm_head follows embed_tokens unless it comes itself
    previous = {}
    if restore:  # copies first: a tied lm_head shares embed_tokens' storage, so copying one changes the other
        previous = {t: own[t].detach().clone() for k in sd for t in ([k, "lm_head.weight"] if tied and k == embed else [k])}
    head_given = False
    with torch.no_grad():
        for k, v in items:
            if not isinstance(state_dict, dict):
                _check_loadable([(k, v)], own)
            own[k].copy_(v.to(own[k].dtype))  # shares storage with the parameter: in place
            head = own.get("lm_head.weight")
            if (k == embed and tie and tied is not False and not head_given
                    and head.data_ptr() != own[embed].data_ptr()):
                head.copy_(v.to(head.dtype))  # an lm_head.weight given later overwrites it
            head_given |= k == "lm_head.weight"
            del v
    return previous


def _check_loadable(items, own: dict) -> None:
    for k, v in items:
        if k not in own:
            raise ConvertError(f"fake-quantized tensor {k}: the reference model does not have it")
        if tuple(v.shape) != tuple(own[k].shape):
            raise ConvertError(f"fake-quantized {k} has shape {list(v.shape)}, "
                               f"the reference model's is {list(own[k].shape)}")
