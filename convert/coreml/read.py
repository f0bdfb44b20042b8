"""A Core ML package read back from its own files: the spec, the MIL program and its weights, with the
names of the HF tensors they came from. Used by the checks (validate/coreml_artifact.py) and by the
proxy runtime (validate/coreml_proxy.py), which runs these weights, not the checkpoint's."""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import numpy as np


@contextlib.contextmanager
def quiet():
    """coremltools' import notes (no Core ML framework off macOS) and warnings go to stderr."""
    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def read_program(path: Path):
    """(spec, MIL program) read from the package's files directly: coremltools' MLModel would rewrite
    the package's Manifest.json on opening it, and a check must not change what it checks."""
    with quiet():
        from coremltools.converters.mil.frontend.milproto.load import load as milproto_load
        from coremltools.proto import Model_pb2

    man = json.loads((path / "Manifest.json").read_text())
    root = man["itemInfoEntries"][man["rootModelIdentifier"]]["path"]
    spec = Model_pb2.Model()
    spec.ParseFromString((path / "Data" / root).read_bytes())
    weights = path / "Data" / Path(root).parent / "weights"
    with quiet():
        prog = milproto_load(spec, specification_version=spec.specificationVersion, file_weights_dir=str(weights))
    return spec, prog


def function_weights(fn, names: dict[str, str]) -> dict[str, tuple[str, object]]:
    """HF name -> (how it is stored, the MIL op) for one function: "float16" for a const, "quantized" for
    a constexpr_blockwise_shift_scale (int4 / int8 data and scales). `names`: Core ML parameter name
    (as ct.convert names an ExportedProgram's parameter) -> HF name; a function lacks the ones it does
    not use."""
    ops = {op.name: op for op in fn.operations}
    out = {}
    for cname, hf in names.items():
        if cname + "_to_fp16_quantized" in ops:
            out[hf] = ("quantized", ops[cname + "_to_fp16_quantized"])
            continue
        key = next((k for k in (cname + "_to_fp16", cname) if k in ops and ops[k].op_type == "const"), None)
        if key is not None:
            out[hf] = ("float16", ops[key])
    return out


def weight_value(kind: str, op) -> np.ndarray:
    """The float16 weight Core ML computes with: a const's value, or coremltools' own decompression of a
    constexpr op (scale * (data - offset), in float16 as on device)."""
    if kind == "quantized":
        return np.asarray(op.materialized_val_inference()).astype(np.float16)
    return np.asarray(op.outputs[0].val).astype(np.float16)


def package_weights(path: Path, names: dict[str, str], source=None) -> tuple[dict[str, np.ndarray], dict[str, tuple]]:
    """`program_weights` of the package at `path`."""
    return program_weights(read_program(path)[1], names, source)


def program_weights(prog, names: dict[str, str], source=None) -> tuple[dict[str, np.ndarray], dict[str, tuple]]:
    """Every weight of a package's program keyed by HF name (a weight shared by several functions read once): float16
    as stored, or, for a parameter Core ML folded into another constant, its inverse from that constant
    (float32; located by value with `source(hf_name) -> source tensor`, see FOLDS). Also the folds:
    HF name -> (function, constant, transform)."""
    out: dict[str, np.ndarray] = {}
    folds: dict[str, tuple] = {}
    claimed: dict[str, set] = {}
    for fname, fn in prog.functions.items():
        found = function_weights(fn, names)
        for hf, (kind, op) in found.items():
            if hf not in out:
                out[hf] = weight_value(kind, op)
        # a quantized weight's data and scale constants are its own too
        claimed[fname] = {op.name for _, op in found.values()} | {
            v.op.name for _, op in found.values() for v in op.inputs.values() if getattr(v, "op", None) is not None}
    missing = sorted(set(names.values()) - set(out))
    if source is not None and missing:
        todo = {hf: source(hf) for hf in missing}
        for fname, fn in prog.functions.items():
            for hf, (const, how, value) in folded_weights(fn, claimed[fname], todo).items():
                out[hf] = value
                folds[hf] = (fname, const, how)
                todo.pop(hf)
    return out, folds


def decoder_names(hf_model, spec) -> dict[str, str]:
    """Core ML const name -> HF tensor name for the decoder functions' parameters (by identity with the
    transformers model the export modules share; a model on the meta device is enough)."""
    from .decoder import StatefulDecoder, _Embed

    hf_names = {id(p): n for n, p in hf_model.named_parameters(remove_duplicate=False)}
    out = {}
    for mod in (StatefulDecoder(hf_model, spec.text, 1), _Embed(hf_model)):
        out.update({"p_" + n.replace(".", "_"): hf_names[id(p)] for n, p in mod.named_parameters()})
    return out


# Core ML's passes fold a parameter transformed on its own into a new constant named after the op
# (Qwen3.5's RMSNorm `1 + w` -> "add_1", the Gated DeltaNet's `-exp(A_log)`, a bias fused into the
# linear before it): such a constant is found by its value, f(source), among the constants no parameter
# claims by name; f's inverse gives the weight the package computes with. (transform, inverse)
FOLDS = {
    "as stored": (lambda s: s, lambda c: c),
    "1 + w": (lambda s: 1.0 + s, lambda c: c - 1.0),
    "-exp(w)": (lambda s: -np.exp(s), lambda c: np.log(-c)),
    "exp(w)": (lambda s: np.exp(s), lambda c: np.log(c)),
}


def _close16(c: np.ndarray, want: np.ndarray) -> bool:
    """Equal up to float16's rounding of the folded value (the fold may run in float32 or float16)."""
    c, want = c.astype(np.float32), want.astype(np.float32)
    ulp = np.maximum(np.abs(want), 2.0 ** -14) * 2.0 ** -10
    return bool(np.all(np.abs(c - want) <= 1.01 * ulp))


def folded_weights(fn, claimed: set[str], sources: dict[str, np.ndarray]) -> dict[str, tuple[str, str, np.ndarray]]:
    """HF name -> (constant name, transform, the weight the package computes with, float32) for the
    parameters of `sources` (HF name -> source value) that `fn` holds only as a folded constant. A folded
    matrix large enough to be quantized (a linear's weight renamed by the bias fusion) is a constexpr op:
    it matches when every value is within half a quantization step (its block's scale) of f(source)."""
    pool = []
    for op in fn.operations:
        if op.name in claimed:
            continue
        if op.op_type == "const" and op.outputs[0].val is not None and np.asarray(op.outputs[0].val).dtype.kind == "f":
            pool.append((op, np.asarray(op.outputs[0].val), None))
        elif op.op_type == "constexpr_blockwise_shift_scale":
            c = np.asarray(op.materialized_val_inference())
            scale = np.asarray(op.inputs["scale"].val, np.float32)
            for axis, (n, k) in enumerate(zip(c.shape, scale.shape)):
                scale = np.repeat(scale, n // k, axis) if n != k else scale
            pool.append((op, c, np.abs(scale)))
    out = {}
    with np.errstate(all="ignore"):
        for hf, src in sources.items():
            s = src.astype(np.float16).astype(np.float32)
            for op, c, step in pool:
                if c.size != s.size:
                    continue
                c = c.reshape(s.shape) if c.shape != s.shape and c.ndim <= 1 else c
                if c.shape != s.shape:
                    continue
                if step is None:
                    hit = next((k for k, (f, _) in FOLDS.items() if _close16(c, f(s))), None)
                else:  # quantized: within half a step of the source (plus float16's rounding of the product)
                    err = np.abs(c.astype(np.float32) - s)
                    hit = "as stored" if np.all(err <= 0.5 * step * 1.01 + np.abs(s) * 2.0 ** -10) else None
                if hit is not None:
                    out[hf] = (op.name, hit if step is None else "as stored, quantized",
                               FOLDS[hit][1](c.astype(np.float32)).astype(np.float32))
                    break
    return out
