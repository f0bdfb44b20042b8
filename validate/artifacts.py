"""Which artifacts to validate: a folder of GGUFs (this project's, llama.cpp's converter's, or
downloaded ones) or explicit --decoder/--mmproj files; their types, the manifest check, and the
"is this even the same model" check that turns a mix-up into a one-line error."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from gguf import LlamaFileType

from convert import manifest
from convert.checkpoint import Checkpoint
from convert.errors import ConvertError
from convert.gguf.reader import GGUFFile

DECODER_ARCH = "qwen35"


@dataclass
class GGUFInfo:
    path: Path
    arch: str
    kv: dict  # scalar keys only (arrays are left out: the token list is large)
    tensors: dict[str, tuple[tuple[int, ...], str]]  # name -> (ggml shape, type name)

    @property
    def kind(self) -> str:
        return "decoder" if self.arch == DECODER_ARCH else "mmproj"

    @property
    def mode(self) -> str | None:
        """An mmproj's token mode, from its tensors: the 16x compressor has its own weights."""
        if self.kind != "mmproj":
            return None
        return "16x" if any(n.startswith("v.vit_merger.") or ".vit_merger." in n for n in self.tensors) else "4x"

    @property
    def type_label(self) -> str:
        """The file type as llama.cpp names it (F32, F16, BF16, Q8_0, Q4_K_M, ...)."""
        ft = self.kv.get("general.file_type")
        try:
            name = LlamaFileType(int(ft)).name
        except (TypeError, ValueError):
            return "unknown"
        return name.removeprefix("ALL_").removeprefix("MOSTLY_")


def read_gguf(path: str | Path) -> GGUFInfo:
    path = Path(path).absolute()  # the runtime's child process runs from another folder
    if not path.is_file():
        raise ConvertError(f"{path}: no such file")
    try:
        r = GGUFFile(path)
    except (ValueError, struct.error, OSError, IndexError, KeyError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: not a readable GGUF file ({str(e).splitlines()[0][:120] or type(e).__name__})") from None
    kv = {k: v.encode("utf-8", "surrogateescape").decode("utf-8", "replace") if isinstance(v, str) else v
          for k, v in r.kv.items() if not isinstance(v, tuple)}  # scalars; arrays are read where needed
    arch = kv.get("general.architecture")
    if arch not in (DECODER_ARCH, "clip"):
        raise ConvertError(f"{path.name}: general.architecture {arch!r} is not MiniCPM-V 4.6 "
                           f"(a {DECODER_ARCH} decoder or a clip projector)")
    if arch == "clip" and kv.get("clip.projector_type") not in (None, "minicpmv4_6"):
        raise ConvertError(f"{path.name}: projector type {kv.get('clip.projector_type')!r} is not minicpmv4_6")
    tensors = {t.name: (tuple(int(x) for x in t.shape.tolist()), t.tensor_type.name) for t in r.tensors}
    return GGUFInfo(path, arch, kv, tensors)


@dataclass
class Artifact:
    """One decoder GGUF with the projector(s) it runs with."""

    decoder: GGUFInfo
    mmproj: dict[str, GGUFInfo] = field(default_factory=dict)  # mode -> projector
    folder: Path | None = None

    @property
    def name(self) -> str:
        return self.decoder.path.stem

    @property
    def files(self) -> list[Path]:
        return [self.decoder.path] + [m.path for m in self.mmproj.values()]

    @property
    def size_bytes(self) -> int:
        return self.decoder.path.stat().st_size

    @property
    def label(self) -> str:
        """The decoder's type: the key of its tolerances."""
        return self.decoder.type_label

    runtime: str | None = None  # None: the profile's (llama.cpp)

    def describe(self) -> dict:
        return {"decoder": str(self.decoder.path), "mmproj": {m: str(i.path) for m, i in self.mmproj.items()}}

    def runtime_kwargs(self, mode: str, profile) -> dict:
        mm = self.mmproj.get(mode)
        kw = {"decoder": str(self.decoder.path), "mmproj": str(mm.path) if mm else None,
              "n_ctx": profile.n_ctx, "n_threads": profile.threads}
        if getattr(profile, "n_batch", None):  # a phone profile's batch sizes (the app's settings)
            kw.update(n_batch=profile.n_batch, n_ubatch=profile.n_ubatch)
        return kw

    def static_checks(self, ckpt: Checkpoint, *, imatrix=None, quiet: bool = True) -> list[dict]:
        """Manifest hashes; every tensor against dequant(quant(source after transforms)); every key."""
        from .weights import check_metadata, check_tensors

        checks = [manifest_check(self)]
        tensor_fail, tensor_bound, n = [], 0, 0
        meta = []
        # a file made with llama-quantize's per-tensor overrides (recorded in this project's
        # manifest) has other types than its file type's rules: each tensor is checked at its own
        ov = _manifest_entry(self.folder, self.decoder.path.name).get("overrides")
        for info in [self.decoder, *self.mmproj.values()]:
            for tc in check_tensors(ckpt, info.path, imatrix=imatrix if info.kind == "decoder" else None,
                                    progress=not quiet, expect_types=not (ov and info.kind == "decoder")):
                n += 1
                if tc.status == "fail":
                    tensor_fail.append(tc.message)
                elif tc.status == "bound":
                    tensor_bound += 1
            meta += check_metadata(ckpt, info.path)
        extra = f" ({tensor_bound} within the re-quantization bound: imatrix not given)" if tensor_bound else ""
        checks.append({"check": "tensors", "status": "fail" if tensor_fail else "pass",
                       "message": tensor_fail[0] if tensor_fail else f"{n} tensors equal dequant(quant(source)){extra}",
                       "details": tensor_fail})
        checks.append({"check": "metadata", "status": "fail" if meta else "pass",
                       "message": meta[0] if meta else "every key and the tokenizer as the converter writes them",
                       "details": meta})
        return checks

    def fake_quant_key(self, imatrix=None) -> tuple:
        """What the fake-quant reference depends on: every tensor's type and the importance matrix."""
        types = tuple(sorted((n, t[1]) for i in [self.decoder, *self.mmproj.values()] for n, t in i.tensors.items()))
        return ("gguf", self.label, types, str(imatrix), self.decoder.kv.get("quantize.imatrix.file"))

    def fake_quant_reference(self, ckpt: Checkpoint, *, threads=None, imatrix=None, base=None):
        """The source quantized with this artifact's tensor types (None for F32: the fp32 reference is it).
        With `base` (the fp32 reference) the decoder's tensors only, as a variant of its model: the
        harness feeds the fake-quant decoder the runtime's own image features, so its projector
        would never run."""
        if self.label == "F32":
            return None
        from .references import Reference

        files = [self.decoder.path] if base is not None else self.files
        return Reference.fake_quant(ckpt, files, threads=threads, imatrix=imatrix, base=base)


def discover(folder: str | Path | None = None, decoder: str | Path | None = None,
             mmproj: list[str | Path] | None = None, runtime: str | None = None) -> list:
    """Artifacts in `folder` (every decoder GGUF, sharing the folder's projectors; or the folder
    itself when it is a quantized HF checkpoint, an ONNX, ExecuTorch or Core ML export), or the one
    given by `decoder` and `mmproj`. `runtime`: the one asked for (a Core ML folder needs it off macOS)."""
    if (folder is None) == (decoder is None):
        raise ConvertError("give an artifacts folder or --decoder FILE (not both)")
    if folder is not None:
        folder = Path(folder)
        if not folder.is_dir():
            raise ConvertError(f"{folder}: no such folder")
        from .coreml_artifact import is_coreml_folder, read_coreml_artifact
        from .executorch_artifact import is_executorch_folder, read_executorch
        from .onnx_artifact import is_onnx_folder, read_onnx

        if is_onnx_folder(folder):
            return [read_onnx(folder)]
        if is_executorch_folder(folder):
            return [read_executorch(folder)]
        if is_coreml_folder(folder):
            return [read_coreml_artifact(folder, runtime)]
        if (folder / "config.json").is_file() and not any(folder.glob("*.gguf")):
            return [read_hf_quantized(folder)]  # a GPTQ / AWQ / compressed-tensors checkpoint
        infos = [read_gguf(p) for p in sorted(folder.glob("*.gguf"))]
        decoders = [i for i in infos if i.kind == "decoder"]
        if not decoders:
            raise ConvertError(f"{folder}: no decoder GGUF (general.architecture {DECODER_ARCH}) in the folder")
        projs = [i for i in infos if i.kind == "mmproj"]
    else:
        d = read_gguf(decoder)
        if d.kind != "decoder":
            raise ConvertError(f"--decoder {decoder}: this is a projector (clip) file, not a decoder")
        decoders, projs = [d], [read_gguf(p) for p in mmproj or []]
        for p in projs:
            if p.kind != "mmproj":
                raise ConvertError(f"--mmproj {p.path}: this is a decoder, not a projector")
    by_mode: dict[str, GGUFInfo] = {}
    for p in projs:
        if p.mode in by_mode:
            raise ConvertError(f"two {p.mode} projectors ({by_mode[p.mode].path.name}, {p.path.name}); "
                               "pass --decoder and --mmproj to choose")
        by_mode[p.mode] = p
    return [Artifact(d, dict(by_mode), Path(folder) if folder is not None else d.path.parent) for d in decoders]


def check_same_model(ckpt: Checkpoint, art) -> None:
    """Refuse artifacts made from another model (bad input, not a validation failure)."""
    from .coreml_artifact import CoremlArtifact
    from .executorch_artifact import ExecutorchArtifact
    from .onnx_artifact import OnnxArtifact

    t, v = ckpt.spec.text, ckpt.spec.vision
    if isinstance(art, (HFArtifact, OnnxArtifact, ExecutorchArtifact, CoremlArtifact)):
        tc = art.config.get("text_config", {})
        for k, val in (("num_hidden_layers", t.num_layers), ("hidden_size", t.hidden_size), ("vocab_size", t.vocab_size)):
            if k in tc and tc[k] != val:
                raise ConvertError(f"{art.folder.name} was made from another model: text_config.{k} is {tc[k]}, "
                                   f"the checkpoint {ckpt.name} has {val}")
        return
    want = {"qwen35.block_count": t.num_layers, "qwen35.embedding_length": t.hidden_size,
            "qwen35.attention.head_count": t.num_heads}
    dkv = art.decoder.kv
    for k, val in want.items():
        if k in dkv and dkv[k] != val:
            raise ConvertError(f"{art.decoder.path.name} was made from another model: {k} is {dkv[k]}, "
                               f"the checkpoint {ckpt.name} has {val}")
    emb = art.decoder.tensors.get("token_embd.weight")
    if emb and emb[0][-1] != t.vocab_size:
        raise ConvertError(f"{art.decoder.path.name} was made from another model: vocabulary {emb[0][-1]}, "
                           f"the checkpoint {ckpt.name} has {t.vocab_size}")
    if isinstance(art, (HFArtifact, OnnxArtifact, ExecutorchArtifact)):
        return
    for p in art.mmproj.values():
        pw = {"clip.vision.block_count": v.num_layers, "clip.vision.embedding_length": v.hidden_size,
              "clip.vision.projection_dim": t.hidden_size}
        for k, val in pw.items():
            if k in p.kv and p.kv[k] != val:
                raise ConvertError(f"{p.path.name} was made from another model: {k} is {p.kv[k]}, "
                                   f"the checkpoint {ckpt.name} has {val}")


def _manifest_entry(folder: Path | None, name: str) -> dict:
    m = manifest.read(folder) if folder else None
    return next((a for a in (m or {}).get("artifacts", []) if a.get("file") == name), {})


def manifest_check(art: Artifact) -> dict:
    """sha256 and size of the artifact's files against the folder's manifest.json, if any."""
    m = manifest.read(art.folder) if art.folder else None
    if m is None:
        return {"check": "manifest", "status": "skipped", "message": "no manifest.json beside the artifact"}
    entries = {a["file"]: a for a in m.get("artifacts", [])}
    problems, unlisted = [], []
    for f in art.files:
        e = entries.get(f.name)
        if e is None:
            unlisted.append(f.name)  # e.g. a file copied in by hand: nothing to check it against
        elif e.get("size") != f.stat().st_size or e.get("sha256") != manifest.sha256_file(f):
            problems.append(f"{f.name}: sha256/size differ from manifest.json (the file changed after export)")
    if problems:
        return {"check": "manifest", "status": "fail", "message": problems[0], "details": problems + unlisted}
    if len(unlisted) == len(art.files):
        return {"check": "manifest", "status": "skipped", "message": "manifest.json does not list these files"}
    note = f"; not listed: {', '.join(unlisted)}" if unlisted else ""
    return {"check": "manifest", "status": "pass",
            "message": f"{len(art.files) - len(unlisted)} file(s) match manifest.json{note}"}


def mark_manifest(folder: Path, status_by_file: dict[str, str]) -> None:
    """Record each artifact's validation status in the folder's manifest (kept deterministic:
    the status only, no figures or times)."""
    m = manifest.read(folder)
    if m is None:
        return
    for a in m.get("artifacts", []):
        if a["file"] in status_by_file:
            a["validation"] = status_by_file[a["file"]]
    manifest.write_doc(folder, m)


@dataclass
class Projector:
    """A vision encoder inside an artifact (an HF checkpoint's tower, an ONNX graph, a `.pte` method, a
    Core ML package), as the harness's projector tolerances see it: keyed by the nearest GGUF type."""

    path: Path
    type_label: str


@dataclass
class HFArtifact:
    """A quantized HF checkpoint folder (GPTQ, AWQ or compressed-tensors), run by transformers
    through the real loaders (runtimes/hf_quant.py)."""

    folder: Path
    config: dict
    dtype: str = "float16"  # the runtime's compute dtype (the loaders' kernels are fp16)
    runtime: str | None = "transformers-quant"

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def qcfg(self) -> dict:
        return self.config["quantization_config"]

    @property
    def label(self) -> str:
        q = self.qcfg
        return str(q.get("quant_method", "unknown"))

    @property
    def mmproj(self) -> dict[str, Projector]:
        lab = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}[self.dtype]
        return {m: Projector(self.folder, lab) for m in ("16x", "4x")}

    @property
    def files(self) -> list[Path]:
        return sorted(self.folder.glob("*.safetensors")) + [self.folder / "config.json"]

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.glob("model*.safetensors"))

    def describe(self) -> dict:
        return {"folder": str(self.folder), "format": self.label}

    def runtime_kwargs(self, mode: str, profile) -> dict:
        return {"model": str(self.folder), "mode": mode, "n_threads": profile.threads, "dtype": self.dtype}

    def static_checks(self, ckpt: Checkpoint, *, imatrix=None, quiet: bool = True) -> list[dict]:
        from .hf_checks import check_hf_quantized

        checks = [manifest_check_folder(self.folder, self.files)]
        checks.append(check_hf_quantized(ckpt, self.folder, quiet=quiet))
        return checks

    def fake_quant_key(self, imatrix=None) -> tuple:
        return ("hf", str(self.folder))

    def fake_quant_reference(self, ckpt: Checkpoint, *, threads=None, imatrix=None, base=None):
        from .references import Reference

        return Reference.from_hf_quantized(ckpt, self.folder, threads=threads, dtype=self.dtype)


def read_hf_quantized(folder: str | Path) -> HFArtifact:
    import json

    folder = Path(folder).absolute()
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConvertError(f"{folder}: no readable config.json ({e})") from None
    if "quantization_config" not in cfg:
        raise ConvertError(f"{folder}: not a quantized checkpoint (config.json has no quantization_config)")
    if cfg.get("model_type") != "minicpmv4_6":
        raise ConvertError(f"{folder}: model_type {cfg.get('model_type')!r} is not minicpmv4_6")
    return HFArtifact(folder, cfg)


def manifest_check_folder(folder: Path, files: list[Path]) -> dict:
    m = manifest.read(folder)
    if m is None:
        return {"check": "manifest", "status": "skipped", "message": "no manifest.json in the folder"}
    entries = {a["file"]: a for a in m.get("artifacts", [])}
    rel = {f: f.relative_to(folder).as_posix() if f.is_relative_to(folder) else f.name for f in files}
    bad = [rel[f] for f in files if rel[f] in entries and
           (entries[rel[f]].get("size") != f.stat().st_size or entries[rel[f]].get("sha256") != manifest.sha256_file(f))]
    if bad:
        return {"check": "manifest", "status": "fail", "message": f"{bad[0]}: sha256/size differ from manifest.json",
                "details": bad}
    return {"check": "manifest", "status": "pass", "message": f"{sum(rel[f] in entries for f in files)} file(s) match"}
