"""Core ML packages checked on Linux from their own bytes (Core ML itself runs only on Apple systems).

For the vision package:
- the program: specification version 9 (iOS 18), input `pixel_values` with the enumerated slice shapes
  the manifest records (448x448 first, the default), output `image_features`;
- an operator census: every MIL op exists for the iOS 18 target in coremltools' own op registry;
- the weights read back from the package (coremltools' milproto loader) against the checkpoint:
  each float16 const equal to its source tensor rounded to float16, named by its HF name;
- a proxy run: the package's own weights in the PyTorch export module, against the float32
  reference's features of a real image slice ("weights from the package, executed in PyTorch, not by
  Core ML").
For the decoder package (check_decoder_package): its functions, inputs, outputs and states, the opset and
compression ops, every weight (folded constants included) against the source. Each failure is one
message naming the package and what is wrong. `CoremlArtifact` is the folder in the harness, run by
Core ML on macOS or by the coreml-proxy runtime (validate/coreml_proxy.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convert import manifest
from convert.checkpoint import Checkpoint
from convert.coreml.decoder import HEAD_CONSTS
from convert.coreml.read import decoder_names, function_weights, program_weights, read_program, weight_value
from convert.errors import ConvertError

from .artifacts import Projector

SPEC_VERSION = {"iOS18": 9}
PROXY = "coreml-proxy"
PROXY_WORDING = "weights from the package, executed in PyTorch, not by Core ML"


def is_coreml_folder(folder: Path) -> bool:
    m = manifest.read(folder)
    return bool(m and isinstance((m.get("source") or {}).get("coreml"), dict))


def read_coreml(folder: str | Path) -> dict:
    """The folder's manifest and its packages by part; a ConvertError for anything else."""
    from runtimes.coreml import coreml_folder

    return {"folder": Path(folder), **coreml_folder(Path(folder))}


def _recorder(path: Path, checks: list[dict], prefix: str):
    """check(what, problems, ok): one row of `checks`, failing with the package's name and the first problem."""
    def check(what: str, problems: list[str], ok: str) -> None:
        checks.append({"check": prefix + what, "status": "fail" if problems else "pass",
                       "message": f"{path.name}: {problems[0]}" if problems else ok, "details": problems})
    return check


def _read(path: Path, check):
    """(spec, program), or (None, None) with a failed "program" check when coremltools cannot read it."""
    try:
        return read_program(path)
    except Exception as e:  # coremltools raises many types on a damaged package
        check("program", [f"cannot be read by coremltools ({e.__class__.__name__}: {str(e)[:160]})"], "")
        return None, None


def _census(functions, target) -> tuple[dict[str, int], list[str]]:
    """Op counts over MIL functions, and the ops missing from `target`'s opset."""
    from coremltools.converters.mil.mil.ops.registry import SSAOpRegistry

    ops: dict[str, int] = {}
    for f in functions:
        for op in f.operations:
            ops[op.op_type] = ops.get(op.op_type, 0) + 1
    # coreml-dialect ops (coreml_update_state) are expanded by Core ML's own loader (into write_state and
    # read_state for this one); every other op must be in the target's opset
    missing = [o for o in sorted(ops) if target not in SSAOpRegistry.core_ops.get(o, {})
               and not (o.startswith("coreml_") and o in SSAOpRegistry.dialect_ops)]
    return dict(sorted(ops.items())), missing


def _consts(prog) -> dict[str, np.ndarray]:
    out = {}
    for f in prog.functions.values():
        for op in f.operations:
            if op.op_type == "const" and op.outputs[0].val is not None:
                out[op.name] = np.asarray(op.outputs[0].val)
    return out


def check_vision_package(ckpt: Checkpoint, path: Path, info: dict, hf_model=None) -> tuple[list[dict], dict]:
    """Checks of one vision package (see the module docstring): (checks, proxy figures)."""
    import coremltools as ct

    checks: list[dict] = []
    check = _recorder(path, checks, "")
    spec, prog = _read(path, check)
    if spec is None:
        return checks, {}
    problems = []
    want = SPEC_VERSION[info.get("deployment_target", "iOS18")]
    if spec.specificationVersion != want:
        problems.append(f"specification version {spec.specificationVersion}, iOS 18 needs {want}")
    inputs = {i.name: i for i in spec.description.input}
    outputs = [o.name for o in spec.description.output]
    if list(inputs) != ["pixel_values"]:
        problems.append(f"inputs {list(inputs)}, expected ['pixel_values']")
    else:
        arr = inputs["pixel_values"].type.multiArrayType
        shapes = [list(s.shape) for s in arr.enumeratedShapes.shapes]
        c = ckpt.spec.vision.num_channels
        expect = [[1, c, h, w] for h, w in info["pixel_shapes"]]
        if shapes != expect:
            diff = next((f"{s} where {e} was written" for s, e in zip(shapes, expect) if s != e),
                        f"{len(shapes)} shapes for {len(expect)}")
            problems.append(f"pixel_values enumerated shapes differ from the processor's: {diff}")
        if list(arr.shape) != [1, c, *info["default_shape"]]:
            problems.append(f"pixel_values default shape {list(arr.shape)}, expected {[1, c, *info['default_shape']]}")
    if outputs != ["image_features"]:
        problems.append(f"outputs {outputs}, expected ['image_features']")
    check("program", problems, f"spec {spec.specificationVersion} (iOS 18), pixel_values with "
                               f"{len(info['pixel_shapes'])} enumerated shapes, image_features")

    ops, missing = _census(prog.functions.values(), ct.target.iOS18)
    check("operators", [f"op {o} does not exist for iOS 18" for o in missing],
          f"{sum(ops.values())} ops of {len(ops)} types, all in iOS 18's opset")

    from convert.coreml.vision import weight_names
    from runtimes.reference import ReferenceRuntime

    own = hf_model is None
    if own:
        from convert.coreml.vision import drop_text

        hf_model = ReferenceRuntime(ckpt).model
        drop_text(hf_model)
    names = weight_names(hf_model, ckpt.spec, info["mode"])
    consts = _consts(prog)
    params = dict(hf_model.named_parameters(remove_duplicate=False))
    problems, found = [], {}
    for cname, hf_name in names.items():
        key = next((k for k in (cname + "_to_fp16", cname) if k in consts), None)
        if key is None:
            problems.append(f"weight {hf_name}: no const {cname} in the package")
            continue
        got = consts[key]
        src = params[hf_name].detach().float().numpy().astype(np.float16)
        if got.shape != src.shape:
            problems.append(f"weight {hf_name}: shape {list(got.shape)}, the source's is {list(src.shape)}")
        elif not np.array_equal(got.astype(np.float16), src):
            bad = float(np.mean(got.astype(np.float16) != src))
            problems.append(f"weight {hf_name}: differs from the source in float16 ({bad:.1%} of its values)")
        else:
            found[hf_name] = got
    check("weights", problems, f"{len(found)} weights equal the source in float16")

    proxy = {}
    if not problems:
        proxy = _proxy(ckpt, hf_model, info, found)
        tol = 0.999
        bad = [f"{PROXY}: {r['shape']} slice cosine {r['cosine']:.5f} < {tol}" for r in proxy["slices"] if r["cosine"] < tol]
        check("proxy", bad, f"{PROXY} ({PROXY_WORDING}): min cosine {min(r['cosine'] for r in proxy['slices']):.6f} "
                            f"against the float32 reference over {len(proxy['slices'])} slice shapes")
    return checks, proxy


def _proxy(ckpt: Checkpoint, hf_model, info: dict, weights: dict[str, np.ndarray]) -> dict:
    """The encoder with the package's float16 weights, computing in float16 as the package does (torch's
    CPU float16 kernels, not Core ML's), against the float32 one on the test image resized to the
    default and two other enumerated shapes."""
    import copy
    from types import SimpleNamespace

    import torch
    from PIL import Image

    from convert.modules import VisionEncoder

    src = Image.open(Path(__file__).resolve().parents[1] / "recipes" / "images" / "astronaut.jpg").convert("RGB")
    ip = ckpt.processor.image_processor
    mean = np.asarray(ip.image_mean, np.float32)[:, None, None]
    std = np.asarray(ip.image_std, np.float32)[:, None, None]
    mode = info["mode"]
    ref = VisionEncoder(hf_model, ckpt.spec, mode).eval()
    # a copy of the vision parts only (VisionEncoder reads model.vision_tower and model.merger)
    inner = SimpleNamespace(vision_tower=copy.deepcopy(hf_model.model.vision_tower).half(),
                            merger=copy.deepcopy(hf_model.model.merger).half())
    with torch.no_grad():
        for part in ("vision_tower", "merger"):
            own = dict(getattr(inner, part).named_parameters(remove_duplicate=False))
            for n, w in weights.items():
                if n.startswith(f"model.{part}."):
                    own[n[len(f"model.{part}."):]].copy_(torch.from_numpy(w))
    pkg = VisionEncoder(SimpleNamespace(model=inner), ckpt.spec, mode).eval()  # float16 compute, as the package's
    rows = []
    shapes = [tuple(s) for s in info["pixel_shapes"]]
    for h, w in dict.fromkeys([shapes[0], *shapes[1:3]]):
        x = (np.asarray(src.resize((w, h), Image.BICUBIC), np.float32).transpose(2, 0, 1) / 255.0 - mean) / std
        t = torch.from_numpy(np.ascontiguousarray(x))[None]
        with torch.no_grad():
            a, b = ref(t).numpy(), pkg(t.half()).float().numpy()
        cos = float((a.ravel() @ b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b)))
        rows.append({"shape": [h, w], "tokens": int(a.shape[0]), "cosine": cos})
    return {"runtime": PROXY, "wording": PROXY_WORDING, "slices": rows}


def check_decoder_package(ckpt: Checkpoint, path: Path, info: dict, hf_model) -> list[dict]:
    """The decoder package: its functions (decode, prefill, embed), each one's inputs, outputs and float16
    states, the opset and compression ops, and every weight against the source: a quantized one equal to
    coremltools' own quantization of the source tensor in float16 (data and scales), others equal in
    float16."""
    import coremltools as ct
    from coremltools.optimize.coreml._quantization_passes import linear_quantize_weights as lq

    from convert.spec import FULL

    checks: list[dict] = []
    check = _recorder(path, checks, "decoder ")
    spec, prog = _read(path, check)
    if spec is None:
        return checks
    t, C, P = ckpt.spec.text, info["max_context"], info["prefill_len"]
    states = {}
    for i, kind in enumerate(t.layer_types):
        if kind == FULL:
            states[f"k_cache_{i}"] = states[f"v_cache_{i}"] = [1, t.num_kv_heads, C, t.head_dim]
        else:
            states[f"conv_state_{i}"] = [1, t.linear_conv_dim, t.conv_kernel - 1]
            states[f"recurrent_state_{i}"] = [1, t.linear_num_value_heads, t.linear_key_head_dim, t.linear_value_head_dim]
    want = {"decode": ({"inputs_embeds": [1, 1, t.hidden_size], "cache_position": [1]}, ["logits"], states),
            "prefill": ({"inputs_embeds": [1, P, t.hidden_size], "cache_position": [P]}, ["logits"], states),
            "embed": ({"input_ids": [1, 1]}, ["inputs_embeds"], {})}
    problems = []
    if spec.specificationVersion != SPEC_VERSION["iOS18"]:
        problems.append(f"specification version {spec.specificationVersion}, iOS 18 needs {SPEC_VERSION['iOS18']}")
    funcs = {f.name: f for f in spec.description.functions}
    if sorted(funcs) != sorted(want):
        problems.append(f"functions {sorted(funcs)}, expected {sorted(want)}")
    if spec.description.defaultFunctionName != "decode":
        problems.append(f"default function {spec.description.defaultFunctionName!r}, expected 'decode'")
    f16 = ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT16
    for fname, (ins, outs, sts) in want.items():
        f = funcs.get(fname)
        if f is None:
            continue
        got_in = {i.name: list(i.type.multiArrayType.shape) for i in f.input}
        if got_in != ins:
            problems.append(f"function {fname}: inputs {got_in}, expected {ins}")
        if [o.name for o in f.output] != outs:
            problems.append(f"function {fname}: outputs {[o.name for o in f.output]}, expected {outs}")
        got_st = {s.name: (list(s.type.stateType.arrayType.shape), s.type.stateType.arrayType.dataType) for s in f.state}
        for sname, shape in sts.items():
            if sname not in got_st:
                problems.append(f"function {fname}: state {sname} is missing")
            elif got_st[sname] != (shape, f16):
                problems.append(f"function {fname}: state {sname} is {got_st[sname][0]}, expected float16 {shape}")
        for extra in sorted(set(got_st) - set(sts)):
            problems.append(f"function {fname}: unexpected state {extra}")
    check("program", problems, f"spec {spec.specificationVersion} (iOS 18), functions decode / prefill of {P} / embed, "
                               f"{len(states)} float16 states of a {C}-position context")

    problems, n_ops = [], 0
    quant = info["quant"]
    for fname, fn in prog.functions.items():
        ops, missing = _census([fn], ct.target.iOS18)
        n_ops += sum(ops.values())
        problems += [f"function {fname}: op {o} does not exist for iOS 18" for o in missing]
        packed = ops.get("constexpr_blockwise_shift_scale", 0)
        if quant == "fp16" and (info.get("head_quant") or quant) == "fp16" and packed:
            problems.append(f"function {fname}: {packed} quantized weights in an fp16 package")
        if quant != "fp16" and not packed:
            problems.append(f"function {fname}: no {quant} weights (no constexpr_blockwise_shift_scale op)")
    check("operators", problems, f"{n_ops} ops over {len(prog.functions)} functions, all in iOS 18's opset, "
                                 f"{quant} weights as constexpr_blockwise_shift_scale" if quant != "fp16" else
          f"{n_ops} ops over {len(prog.functions)} functions, all in iOS 18's opset")

    names = decoder_names(hf_model, ckpt.spec)
    head = info.get("head_quant") or quant
    heads = {names[c] for c in HEAD_CONSTS_NAMES if c in names}
    problems, n = [], 0
    for fname, fn in prog.functions.items():
        for hf_name, (kind, op) in function_weights(fn, names).items():
            src = _source(ckpt, hf_name)
            n += 1
            q = head if hf_name in heads else quant
            if kind == "quantized":
                qp = None if q == "fp16" else lq.blockwise_compress(
                    src, nbits=4 if q == "int4" else 8, mode="LINEAR_SYMMETRIC", signed=True,
                    block_sizes=[1, 32] if q == "int4" else [1, 0])
                data, scale = op.inputs["data"].val, op.inputs["scale"].val
                if qp is None or not (np.array_equal(qp.data, data) and np.array_equal(qp.scale, scale)):
                    problems.append(f"function {fname}: weight {hf_name}: its data or scales differ from "
                                    f"coremltools' {q} quantization of the source")
            else:
                got = weight_value(kind, op)
                if got.shape != src.shape or not np.array_equal(got, src):
                    problems.append(f"function {fname}: weight {hf_name}: differs from the source in float16")
    # the rest must be constants Core ML folded from them (1 + w, -exp(w), a fused bias): found by value
    _, folds = program_weights(prog, names, lambda n: _source(ckpt, n).astype(np.float32))
    seen = {hf for fn in prog.functions.values() for hf in function_weights(fn, names)} | set(folds)
    problems += [f"weight {hf}: not in the package, by name or as a constant folded from it"
                 for hf in sorted(set(names.values()) - seen)]
    kinds = sorted({how for _, _, how in folds.values()})
    check("weights", problems, f"{n} weight uses over the functions equal the source ({quant} as coremltools "
                               f"quantizes it); {len(folds)} of {len(set(names.values()))} parameters held as constants "
                               f"Core ML folded from them ({', '.join(kinds) or 'none'}), each equal to its transform "
                               f"of the source")
    return checks


HEAD_CONSTS_NAMES = tuple(c.removesuffix("_to_fp16") for c in HEAD_CONSTS)


def _source(ckpt: Checkpoint, hf_name: str) -> np.ndarray:
    """The source tensor in float16, as the conversion rounds it (a tied lm_head reads the embedding)."""
    if hf_name not in ckpt and hf_name == "lm_head.weight" and ckpt.spec.tie_word_embeddings:
        hf_name = "model.language_model.embed_tokens.weight"
    return ckpt.tensor(hf_name).astype(np.float16)


def validate_coreml(ckpt: Checkpoint, folder: str | Path, quiet: bool = False) -> dict:
    """Every package of the folder; {"status", "checks", "proxy"}."""
    from runtimes.reference import ReferenceRuntime, hf_quiet

    art = read_coreml(folder)
    checks, proxy = [], {}
    from convert.coreml.vision import drop_text

    with hf_quiet(quiet):
        hf = ReferenceRuntime(ckpt).model
    drop_text(hf)  # the checks below read the vision parts only
    for part, path in art["packages"].items():
        if part == "vision":
            c, p = check_vision_package(ckpt, path, art["info"]["vision"], hf)
            checks += c
            proxy[part] = p
        elif part == "decoder":
            checks += check_decoder_package(ckpt, path, art["info"]["decoder"], hf)
    status = "fail" if any(c["status"] == "fail" for c in checks) else "pass"
    return {"status": status, "checks": checks, "proxy": proxy}


# -- the folder as a validation artifact ----------------------------------------------------------------


@dataclass
class CoremlArtifact:
    """A `python -m convert coreml` folder, run by Core ML on macOS or by the proxy (runtimes/coreml.py)."""

    folder: Path
    config: dict
    info: dict  # the manifest's source.coreml
    packages: dict  # part -> package path
    runtime: str | None = None

    @property
    def name(self) -> str:
        return f"{self.folder.name} (coreml {self.info.get('quant')})"

    @property
    def label(self) -> str:
        return f"coreml-{self.info.get('quant')}"  # its key in tolerances.json

    @property
    def mmproj(self) -> dict[str, Projector]:
        v = self.info.get("vision")
        return {v["mode"]: Projector(self.packages["vision"], "F16")} if v and "vision" in self.packages else {}

    @property
    def files(self) -> list[Path]:
        return list(self.packages.values())

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for p in self.packages.values() for f in p.rglob("*") if f.is_file())

    def describe(self) -> dict:
        d = self.info.get("decoder") or {}
        return {"folder": str(self.folder), "format": "coreml", "quant": self.info.get("quant"),
                "packages": {k: p.name for k, p in self.packages.items()}, "max_context": d.get("max_context"),
                "prefill_len": d.get("prefill_len"),
                "executed_by": "Core ML" if self.runtime == "coreml" else PROXY_WORDING}

    source: Path | None = None  # the checkpoint: the proxy locates folded constants with it

    mode_hint = "a Core ML vision package has one mode: export the other into a second folder with --mode"

    @property
    def device_memory(self) -> bool:
        """Whether the runtime's peak RSS says anything about a device (the proxy's is PyTorch's)."""
        return self.runtime == "coreml"

    def runtime_kwargs(self, mode: str, profile) -> dict:
        return {"folder": str(self.folder), "mode": mode, "n_threads": profile.threads,
                "source": str(self.source) if self.source else None}

    def static_checks(self, ckpt: Checkpoint, *, imatrix=None, quiet: bool = True) -> list[dict]:
        self.source = ckpt.path
        rep = validate_coreml(ckpt, self.folder, quiet=quiet)
        return [manifest_check_packages(self.folder, self.packages)] + rep["checks"]

    def fake_quant_key(self, imatrix=None) -> tuple:
        return ("coreml", str(self.folder))

    def fake_quant_reference(self, ckpt: Checkpoint, *, threads=None, imatrix=None, base=None):
        from .references import Reference

        return Reference.from_coreml(ckpt, self.folder, threads=threads)


def manifest_check_packages(folder: Path, packages: dict) -> dict:
    """Every file of each package against the manifest's sha256 and size."""
    from convert.coreml.export import package_entry

    entries = {a["file"]: a for a in read_coreml(folder)["manifest"].get("artifacts", [])}
    bad = []
    for p in packages.values():
        want = {f["path"]: f for f in entries.get(p.name, {}).get("files", [])}
        got = {f["path"]: f for f in package_entry(p)["files"]}
        for rel in sorted(set(want) | set(got)):
            if rel not in got or rel not in want or (got[rel]["sha256"], got[rel]["size"]) != (want[rel]["sha256"], want[rel]["size"]):
                bad.append(f"{p.name}/{rel}: " + ("missing" if rel not in got else "not in manifest.json" if rel not in want
                                                   else "sha256/size differ from manifest.json"))
    if bad:
        return {"check": "manifest", "status": "fail", "message": bad[0], "details": bad}
    n = sum(len(entries[p.name]["files"]) for p in packages.values())
    return {"check": "manifest", "status": "pass", "message": f"{n} files of {len(packages)} package(s) match manifest.json"}


def read_coreml_artifact(folder: str | Path, runtime: str | None = None) -> CoremlArtifact:
    """The folder as an artifact. The runtime: Core ML on macOS (the default there); elsewhere only the
    proxy, and only when asked for (`--runtime coreml-proxy`): its numbers are not Core ML's."""
    import sys

    from runtimes.coreml import NEEDS_MACOS, coreml_folder

    folder = Path(folder).absolute()
    found = coreml_folder(folder)
    if runtime is None:
        runtime = "coreml" if sys.platform == "darwin" else None
    if runtime is None or (runtime == "coreml" and sys.platform != "darwin"):
        raise ConvertError(f"{folder.name}: validating a Core ML export in its runtime needs macOS: {NEEDS_MACOS}")
    if runtime not in ("coreml", PROXY):
        raise ConvertError(f"--runtime {runtime}: a Core ML export runs in coreml (macOS) or {PROXY}")
    if "decoder" not in found["packages"]:
        raise ConvertError(f"{folder.name}: no decoder package to validate (export with --parts vision,decoder); "
                           f"the vision package alone is checked by `python -m convert coreml`")
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConvertError(f"{folder}: no readable config.json ({e.__class__.__name__})") from None
    return CoremlArtifact(folder, cfg, found["info"], found["packages"], runtime)
