"""An ExecuTorch folder (`python -m convert executorch`) as a validation artifact, run by ExecuTorch.

Static checks: the manifest's hashes, and the program itself against the contract of ExecuTorch's
`MultimodalRunner` (method names, constant methods and their values, input and output shapes), read
from the `.pte` by ExecuTorch's own loader. The delegation report (operators in XNNPACK and in
portable kernels per method, from executorch.devtools at export) goes into the validation report.
The fake-quant reference is the transformers model with the same torchao quantization applied in
eager PyTorch (convert/executorch/quant.py), so only the kernels differ.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from convert import manifest
from convert.checkpoint import Checkpoint
from convert.errors import ConvertError

from .artifacts import Projector

RUNNER_METHODS = ("vision_encoder", "token_embedding", "text_decoder")
CONSTANTS = ("get_max_seq_len", "get_max_context_len", "get_vocab_size", "get_bos_id", "get_eos_ids",
             "use_kv_cache", "enable_dynamic_shape")


def is_executorch_folder(folder: Path) -> bool:
    m = manifest.read(folder)
    return bool(m and isinstance((m.get("source") or {}).get("executorch"), dict))


@dataclass
class ExecutorchArtifact:
    folder: Path
    config: dict
    et: dict  # the manifest's source.executorch
    runtime: str | None = "executorch"

    @property
    def pte(self) -> Path:
        return self.folder / self.et["file"]

    @property
    def name(self) -> str:
        return f"{self.folder.name} (executorch {self.et['quant']})"

    @property
    def label(self) -> str:
        return f"executorch-{self.et['quant']}"  # its key in tolerances.json

    @property
    def mmproj(self) -> dict[str, Projector]:
        # the projector tolerance of the nearest GGUF type: int8 weights (and activations) ~ Q8_0
        label = "F32" if self.et.get("vision_quant", "fp32") == "fp32" else "Q8_0"
        return {m: Projector(self.pte, label) for m in self.et.get("modes", ["16x"])}

    @property
    def files(self) -> list[Path]:
        return [self.pte]

    @property
    def size_bytes(self) -> int:
        return self.pte.stat().st_size

    def describe(self) -> dict:
        deleg = {name: {"xnnpack_nodes": d["delegated_nodes"], "portable_nodes": d["portable_nodes"],
                        "portable_ops": d["portable"]} for name, d in (self.et.get("delegation") or {}).items()}
        return {"folder": str(self.folder), "format": "executorch", "quant": self.et["quant"],
                "vision_quant": self.et.get("vision_quant"), "file": self.et["file"],
                "max_context": self.et.get("max_context"), "max_seq_len": self.et.get("max_seq_len"),
                "delegation": deleg}

    def runtime_kwargs(self, mode: str, profile) -> dict:
        return {"folder": str(self.folder), "mode": mode, "n_threads": profile.threads}

    def static_checks(self, ckpt: Checkpoint, *, imatrix=None, quiet: bool = True) -> list[dict]:
        from .artifacts import manifest_check_folder

        return [manifest_check_folder(self.folder, self.files), check_program(self, ckpt)]

    def fake_quant_key(self, imatrix=None) -> tuple:
        return ("executorch", self.et["quant"], self.et.get("vision_quant", "fp32"))

    def fake_quant_reference(self, ckpt: Checkpoint, *, threads=None, imatrix=None, base=None):
        if self.et["quant"] == "fp32" and self.et.get("vision_quant", "fp32") == "fp32":
            return None
        from .references import Reference

        return Reference.from_torchao(ckpt, self.et["quant"], self.et.get("vision_quant", "fp32"), threads=threads)


def read_executorch(folder: str | Path) -> ExecutorchArtifact:
    from runtimes.executorch import pte_file

    folder = Path(folder).absolute()
    path, info = pte_file(folder)
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConvertError(f"{folder}: no readable config.json ({e})") from None
    head = path.read_bytes()[:8]
    if len(head) < 8 or head[4:8] != b"ET12":  # the flatbuffer's file identifier (ExecuTorch's program schema)
        raise ConvertError(f"{path}: not an ExecuTorch program (no ET12 identifier)")
    try:  # a truncated or corrupt program is bad input, said now (ExecuTorch's loader verifies it)
        _program_facts(path)
    except Exception as e:
        raise ConvertError(f"{path}: ExecuTorch cannot load it ({e.__class__.__name__}: "
                           f"{str(e).splitlines()[0][:120] if str(e) else 'invalid program'})") from None
    return ExecutorchArtifact(folder, cfg, info)


def _program_facts(pte: Path) -> dict:
    """Method names, constant values and the decoder's tensor metadata, by ExecuTorch's loader."""
    from runtimes.executorch import load_kernels, quiet_native

    load_kernels()
    from executorch.runtime import Runtime

    with quiet_native():
        prog = Runtime.get().load_program(str(pte))
    names = set(prog.method_names)
    consts = {}
    for c in CONSTANTS:
        if c in names:
            out = prog.load_method(c).execute([])
            consts[c] = [int(v) for v in out] if c == "get_eos_ids" else int(out[0])
    meta = {}
    for m in RUNNER_METHODS:
        if m in names:
            mm = prog.metadata(m)
            meta[m] = {"inputs": [list(mm.input_tensor_meta(i).sizes()) for i in range(mm.num_inputs())],
                       "outputs": [list(mm.output_tensor_meta(i).sizes()) for i in range(mm.num_outputs())]}
    return {"methods": sorted(names), "constants": consts, "meta": meta}


def check_program(art: ExecutorchArtifact, ckpt: Checkpoint) -> dict:
    try:
        facts = _program_facts(art.pte)
    except Exception as e:
        return {"check": "program", "status": "fail", "message": f"ExecuTorch cannot load {art.pte.name} "
                f"({e.__class__.__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})"}
    t = ckpt.spec.text
    problems = [f"no method {m}" for m in RUNNER_METHODS if m not in facts["methods"]]
    problems += [f"no constant method {c}" for c in CONSTANTS if c not in facts["constants"]]
    c = facts["constants"]
    want = {"get_vocab_size": t.vocab_size, "get_max_context_len": art.et.get("max_context"),
            "get_max_seq_len": art.et.get("max_seq_len"), "use_kv_cache": 1, "enable_dynamic_shape": 1}
    problems += [f"{k} is {c[k]}, expected {v}" for k, v in want.items() if k in c and v is not None and c[k] != v]
    dec = facts["meta"].get("text_decoder")
    if dec:
        ins, outs = dec["inputs"], dec["outputs"]
        if len(ins) != 2 or len(ins[0]) != 3 or ins[0][2] != t.hidden_size or len(ins[1]) != 1:
            problems.append(f"text_decoder takes {ins}, expected inputs_embeds [1, T, {t.hidden_size}] and cache_position [T]")
        if not outs or outs[0][-1] != t.vocab_size:
            problems.append(f"text_decoder returns {outs}, expected logits [1, {t.vocab_size}]")
    emb = facts["meta"].get("token_embedding")
    if emb and (not emb["outputs"] or emb["outputs"][0][-1] != t.hidden_size):
        problems.append(f"token_embedding returns {emb['outputs']}, expected [1, T, {t.hidden_size}]")
    if problems:
        return {"check": "program", "status": "fail", "message": problems[0], "details": problems}
    deleg = art.et.get("delegation", {}).get("text_decoder", {})
    msg = (f"methods {', '.join(m for m in facts['methods'] if not m.startswith('get_') and m not in CONSTANTS)}; "
           f"constants as the runner reads them (max_seq_len {c.get('get_max_seq_len')}, context "
           f"{c.get('get_max_context_len')}, eos {c.get('get_eos_ids')})")
    if deleg:
        msg += (f"; text_decoder: {deleg['delegated_nodes']} nodes in {deleg['n_delegates']} XNNPACK subgraphs, "
                f"{deleg['portable_nodes']} in portable kernels")
    return {"check": "program", "status": "pass", "message": msg}
