"""The validation harness: every artifact against the PyTorch reference, scenario by scenario.

For each artifact (a decoder GGUF and its projectors):
  1. static checks in this process: manifest hashes, every tensor against the source after the
     documented transforms and the artifact's own quant type, every metadata key and the tokenizer;
  2. its runtime in a child process (validate/process.py) under the phone-like profile; each
     scenario's prompt is laid out the way that runtime lays it out, and the references (fp32
     and fake-quant, validate/references.py) see exactly the same positions;
  3. metrics per scenario against tolerances (recipes/tolerances.json) -> pass / fail /
     known-difference / skipped, with one message per failure naming scenario, metric, artifact.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from convert.checkpoint import Checkpoint
from convert.errors import ConvertError

from .artifacts import Artifact, check_same_model
from .metrics import compare_logits, cosine
from .process import RuntimeFailure, RuntimeProcess
from .references import Reference
from .scenarios import Scenario, TextPart, build_turns, load_media, media_specs
from .verdict import judge, lookup, summarize

EXIT_OK, EXIT_BAD_INPUT, EXIT_FAILED, EXIT_CRASHED = 0, 2, 3, 4
FAILING = ("fail", "crashed", "timeout")


@dataclass
class Profile:
    """The phone-like CPU profile every runtime runs under."""

    threads: int = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
    n_ctx: int = 4096
    memory_budget_mb: float = 3072.0
    timeout_s: float = 600.0
    runtime: str = "llama.cpp"
    n_batch: int | None = None  # llama.cpp's batch sizes (None: the runtime's defaults)
    n_ubatch: int | None = None
    phone: Any = None  # runtimes.phone.build.PhoneSetup: runtimes with an aarch64 build run under qemu

    @classmethod
    def for_phone(cls, setup, **overrides) -> "Profile":
        """A phone profile's settings (threads, context, batch, memory budget) and its emulator;
        the deadline grows by EMULATION_SLOWDOWN (qemu translates every instruction)."""
        p = setup.profile
        prof = cls(threads=p.threads, n_ctx=p.n_ctx, memory_budget_mb=p.memory_budget_mb, n_batch=p.n_batch,
                   n_ubatch=p.n_ubatch, phone=setup, timeout_s=cls.timeout_s * EMULATION_SLOWDOWN)
        for k, v in overrides.items():
            if v is not None:
                setattr(prof, k, v * EMULATION_SLOWDOWN if k == "timeout_s" else v)
        return prof

    def as_dict(self) -> dict:
        out = {"threads": self.threads, "n_ctx": self.n_ctx, "memory_budget_mb": self.memory_budget_mb,
               "timeout_s": self.timeout_s, "runtime": self.runtime}
        if self.n_batch:
            out.update(n_batch=self.n_batch, n_ubatch=self.n_ubatch)
        if self.phone is not None:
            out["phone"] = self.phone.describe()
        return out


EMULATION_SLOWDOWN = 20  # deadline factor under qemu; measured ~10-15x on the tiny model
PHONE_RUNTIMES = ("llama.cpp", "onnxruntime", "executorch")  # runtimes with an aarch64 build (runtimes/phone/build.py)
# of those, the ones whose exported-graph engine runs in the guest behind the app-side pipeline
# on this machine (runtimes/phone/remote.py); the others run whole in the guest
PHONE_ENGINES = ("onnxruntime", "executorch")


def tolerances() -> dict:
    from recipes import load

    return load("tolerances")


def _progress(quiet: bool, total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=quiet, leave=False, unit="scenario")


class Harness:
    def __init__(self, ckpt: Checkpoint, profile: Profile | None = None, *, quiet: bool = False,
                 imatrix: str | Path | None = None, fake_quant: bool = True, env: dict | None = None,
                 max_kl: float | None = None, speed: bool = True):
        self.ckpt = ckpt
        self.max_kl = max_kl
        self.speed = speed  # measure tokens/s and image-encode time (off: verdicts only)
        self.env = env  # extra environment for the runtime processes
        self.profile = profile or Profile()
        self.quiet = quiet
        self.imatrix = imatrix
        self.fake_quant = fake_quant
        self.tol = tolerances()
        self.scratch = Path(tempfile.mkdtemp(prefix="minicpmv-validate-"))
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # "falling back to the PyTorch implementation" notes, every run
        if quiet:
            hf_logging.disable_progress_bar()
        self._fp32: Reference | None = None
        self._fq: Reference | None = None
        self._fq_key = None
        self._images: dict[tuple, Path] = {}
        self._ref_cache: dict[tuple, tuple[list[int], Path]] = {}

    # -- references ------------------------------------------------------------------------------

    @property
    def fp32(self) -> Reference:
        if self._fp32 is None:
            self._fp32 = Reference.fp32(self.ckpt, threads=self.profile.threads, lazy=True)
        return self._fp32

    def _fake_quant(self, art) -> Reference | None:
        """The artifact's fake-quant reference. It depends only on the tensor types (and imatrix),
        so artifacts that share them share one; only one is held at a time, built after the
        previous one is released. A GGUF's is a weight variant of the fp32 reference's model (its
        quantized bytes, dequantized per layer as it runs: 0.3 GB, not 5 GB, at full size)."""
        key = art.fake_quant_key(self.imatrix)
        if key != self._fq_key:
            if self._fq is not None:
                self._fq.close()
            self._fq, self._fq_key = None, None
            self._fq = art.fake_quant_reference(self.ckpt, threads=self.profile.threads, imatrix=self.imatrix,
                                                base=self.fp32)
            self._fq_key = key
        return self._fq

    def _image_file(self, spec: dict) -> Path:
        key = json.dumps(spec, sort_keys=True)
        if key not in self._images:
            media = load_media(spec)
            if hasattr(media, "frames"):  # a video: a folder of its frames, read back in name order
                p = self.scratch / f"video-{len(self._images)}"
                p.mkdir()
                for k, f in enumerate(media.frames):
                    f.save(p / f"frame-{k:04d}.png")
            else:
                p = self.scratch / f"image-{len(self._images)}.png"
                media.save(p)
            self._images[key] = p
        return self._images[key]

    # -- one artifact ------------------------------------------------------------------------------

    def validate_artifact(self, art: Artifact, scenarios: list[Scenario], anchor: dict | None = None) -> dict:
        check_same_model(self.ckpt, art)
        t0 = time.monotonic()
        runtime = art.runtime or self.profile.runtime
        row: dict = {"name": art.name, "runtime": runtime, "files": art.describe(), "quant": art.label,
                     "projector_quant": {m: i.type_label for m, i in art.mmproj.items()},
                     "size_bytes": art.size_bytes, "status": "pass", "error": None,
                     "checks": art.static_checks(self.ckpt, imatrix=self.imatrix, quiet=self.quiet), "scenarios": []}
        fq = self._fake_quant(art) if self.fake_quant else None
        deadline = time.monotonic() + self.profile.timeout_s
        modes = sorted({s.mode for s in scenarios if s.needs_vision} | {"16x"}, key=lambda m: m != "16x")
        done: set[str] = set()
        peak = 0.0
        speed: dict = {}
        bar = _progress(self.quiet, len(scenarios), art.name[:40])
        phone = self.profile.phone
        if phone is not None and runtime not in PHONE_RUNTIMES:
            bar.close()
            reason = (f"not run under the phone profile {phone.profile.name}: no aarch64 build of the {runtime} "
                      f"runtime yet (phone runtimes: {', '.join(PHONE_RUNTIMES)})")
            row.update(status="skipped", error=reason)
            row["scenarios"] = [{"scenario": sc.name, "kind": sc.kind, "status": "skipped", "reason": reason}
                                for sc in scenarios]
            modes = []
        try:
            for mode in modes:
                todo = [s for s in scenarios if s.name not in done and (s.mode == mode or not s.needs_vision)]
                if not todo:
                    continue
                mm = art.mmproj.get(mode)
                kwargs = art.runtime_kwargs(mode, self.profile)
                guest, phone_kw = phone, kwargs
                if phone is not None and runtime in PHONE_ENGINES:
                    guest, phone_kw = None, {**kwargs, "phone": phone.profile.name}
                try:
                    # under a phone profile the same file also runs on this machine (x86) with the same
                    # settings: the third comparison, aarch64 kernels against x86 ones
                    with RuntimeProcess(runtime, phone_kw, deadline=deadline, env=self.env, phone=guest) as proc, \
                            (RuntimeProcess(runtime, kwargs, deadline=deadline, env=self.env) if phone
                             else contextlib.nullcontext()) as host:
                        row.setdefault("platform", proc.info.get("platform", {}))
                        if host is not None:
                            row.setdefault("host_platform", host.info.get("platform", {}))
                        try:
                            for sc in todo:
                                row["scenarios"].append(self._scenario(proc, sc, art, mm, fq, host))
                                done.add(sc.name)
                                bar.update(1)
                            if not speed and self.speed and phone is None:  # emulated time says nothing
                                speed = self._speed(proc, scenarios, mm)
                        finally:
                            peak = max(peak, proc.peak_rss_mb)
                except RuntimeFailure as e:
                    row["status"] = e.status if e.status != "error" else "fail"
                    row["error"] = str(e)
                    for sc in scenarios:
                        if sc.name not in done:
                            row["scenarios"].append({"scenario": sc.name, "kind": sc.kind, "status": "not-run",
                                                     "reason": f"not run: the runtime {e.status} ({e})"})
                            done.add(sc.name)
                    break
        finally:
            bar.close()
        row["peak_rss_mb"] = round(peak, 1)
        row["wall_s"] = round(time.monotonic() - t0, 2)
        row["speed"] = speed
        if anchor:
            row["size_ratio_f16"] = row["size_bytes"] / anchor["size_bytes"] if anchor.get("size_bytes") else None
            row["speed"]["ratio_f16"] = {k: (speed[k] / anchor["speed"][k]) for k in speed
                                         if anchor.get("speed", {}).get(k)}
        if peak > self.profile.memory_budget_mb and phone is not None:
            row["checks"].append({"check": "memory", "status": "skipped",
                                  "message": f"{art.name}: peak RSS {peak:.0f} MB is the emulated run's (qemu and the guest, or "
                                             f"the app-side pipeline on this machine), not a phone's: the budget "
                                             f"is not judged"})
        elif peak > self.profile.memory_budget_mb and not getattr(art, "device_memory", True):
            row["checks"].append({"check": "memory", "status": "skipped",
                                  "message": f"{art.name}: peak RSS {peak:.0f} MB is the {runtime} runtime's (PyTorch's), "
                                             f"not a phone's: the budget is not judged"})
        elif peak > self.profile.memory_budget_mb:
            row["checks"].append({"check": "memory", "status": "fail",
                                  "message": f"{art.name}: peak RSS {peak:.0f} MB exceeds the budget "
                                             f"{self.profile.memory_budget_mb:.0f} MB"})
        if row["status"] == "pass" and (any(c["status"] == "fail" for c in row["checks"]) or
                                        any(s["status"] == "fail" for s in row["scenarios"])):
            row["status"] = "fail"
        row["verdict"] = summarize(row)
        return row

    # -- scenarios ---------------------------------------------------------------------------------

    def _skip(self, sc: Scenario, reason: str) -> dict:
        return {"scenario": sc.name, "kind": sc.kind, "status": "skipped", "reason": reason}

    def _scenario(self, proc: RuntimeProcess, sc: Scenario, art: Artifact, mm, fq: Reference | None,
                  host: RuntimeProcess | None = None) -> dict:
        """One scenario in `proc`; `host` (a phone run's x86 twin) adds the aarch64-vs-x86 figures."""
        kind_needed = "video" if sc.kind == "video" else "image" if sc.kind == "image" else "text"
        if kind_needed not in proc.info["capabilities"]:
            return self._skip(sc, proc.info["unsupported"].get(kind_needed, f"no {kind_needed} support"))
        if sc.needs_vision and mm is None:
            return self._skip(sc, f"no {sc.mode} projector among the artifacts "
                                  f"({getattr(art, 'mode_hint', 'export with --mode both')})")
        tok = self.fp32.tokenizer
        turns = build_turns(sc, tok)
        out: dict = {"scenario": sc.name, "kind": sc.kind, "status": "pass", "failures": []}
        fail = out["failures"]

        # 1. tokenization: the runtime's own tokenizer on every text part
        texts = [p for turn in turns for p in turn if isinstance(p, TextPart)]
        got = proc.request("tokenize", texts=[p.text for p in texts])["ids"]
        for p, ids in zip(texts, got):
            if list(ids) != list(p.ids):
                k = next((i for i, (a, b) in enumerate(zip(ids, p.ids)) if a != b), min(len(ids), len(p.ids)))
                fail.append(f"{sc.name}: tokens: {art.name} tokenizes {p.text[:40]!r} differently from the reference "
                            f"at token {k} ({len(ids)} vs {len(p.ids)} tokens)")
                break

        # 2. images: the runtime's layout and embeddings; the references on the same pixels
        specs = media_specs(sc)
        images = [self._image_file(s) for s in specs]
        ref_chunks: dict[int, list] = {}
        fq_chunks: dict[int, list] = {}
        out["images"], out["layout"] = [], {"reference": {"tokens": []}, "artifact": {"tokens": []}}
        encode_s = 0.0
        proj_tol = lookup(self.tol["projector"], mm.type_label) if mm else {}
        known_diff = []
        for i, path in enumerate(images):
            layout = proc.request("layout", image=str(path))["chunks"]
            emb = proc.request("embeddings", image=str(path), out=str(self.scratch / f"emb-{sc.name}-{i}"))
            encode_s += emb["seconds"]
            art_embs = [np.load(f) for f in emb["files"]]
            native = self.fp32.native_image((str(path), sc.mode), load_media(specs[i]), sc.mode)
            # the runtime's pixels come from a numpy replica of its preprocessing, not from the
            # runtime: on a phone run, this machine's twin computes them
            pix = (host or proc).request("pixels", image=str(path), out=str(self.scratch / f"pix-{sc.name}-{i}"))["files"]
            if host is not None:
                x86 = host.request("embeddings", image=str(path), out=str(self.scratch / f"emb-x86-{sc.name}-{i}"))
                out.setdefault("x86", {}).setdefault("image_cosine", []).extend(
                    cosine(np.load(f), a) for f, a in zip(x86["files"], art_embs))
            if pix is None:  # the runtime preprocesses like transformers' processor
                ref_embs = native
            else:
                key = (str(path), str(mm.path))
                chunks = [np.load(f) for f in pix]
                ref_embs = self.fp32.runtime_pixels_image(key, chunks, self.ckpt.spec.vision.patch_size, sc.mode)
            counts_art = [c["n_tokens"] for c in layout if c["kind"] == "image"]
            if [e.shape[0] for e in ref_embs] != counts_art:
                fail.append(f"{sc.name}: layout: {art.name} lays image {i} out as {counts_art} tokens, its own pixels give "
                            f"{[e.shape[0] for e in ref_embs]} in the reference")
                return self._finish(out)
            got = [int(e.shape[0]) if e.ndim == 2 else -1 for e in art_embs]
            width = {int(e.shape[-1]) for e in art_embs} - {self.ckpt.spec.text.hidden_size}
            if got != counts_art or width:
                # the runtime contradicts itself: nothing below could compare like with like
                fail.append(f"{sc.name}: layout: {art.name} returns embeddings of {got} tokens"
                            f"{f' x {sorted(width)}' if width else ''} for its own layout of {counts_art} tokens "
                            f"(image {i})")
                return self._finish(out)
            out["layout"]["reference"]["tokens"].append([e.shape[0] for e in native])
            out["layout"]["artifact"]["tokens"].append(counts_art)
            for j, (a, r) in enumerate(zip(art_embs, ref_embs)):
                c = cosine(r, a)
                out["images"].append({"image": i, "chunk": j, "role": "overview" if j == 0 else "slice",
                                      "tokens_reference": r.shape[0], "tokens_artifact": a.shape[0], "cosine": c,
                                      "rel_err": float(np.linalg.norm(a - r) / np.linalg.norm(r)), "pixels": "runtime"})
                if c < proj_tol.get("cosine_min", 0):
                    fail.append(f"{sc.name}: image {i} chunk {j}: embedding cosine {c:.5f} < {proj_tol['cosine_min']} "
                                f"({art.name}, projector {mm.path.name})")
            if [e.shape[0] for e in native] != counts_art:
                known_diff.append(f"image {i}: transformers' processor gives {[e.shape[0] for e in native]} tokens per chunk, "
                                  f"the runtime {counts_art}")
            else:
                nat = [cosine(r, a) for r, a in zip(native, art_embs)]
                for j, c in enumerate(nat):
                    out["images"].append({"image": i, "chunk": j, "role": "overview" if j == 0 else "slice",
                                          "tokens_reference": native[j].shape[0], "tokens_artifact": art_embs[j].shape[0],
                                          "cosine": c, "pixels": "reference"})
                if min(nat) < min(cosine(r, a) for r, a in zip(ref_embs, art_embs)) - 0.01:
                    known_diff.append(f"image {i}: same token counts, but the runtime's pixels differ from the processor's "
                                      f"(min chunk cosine {min(nat):.3f} with transformers' own preprocessing)")
            ref_chunks[i] = _segments(layout, ref_embs)
            # the fake-quant reference's decoder takes the runtime's own image embeddings: identical
            # inputs isolate the decoder's conversion (its quantized matmuls turn input noise of 1e-6
            # into visible rounding flips); the projector is checked by the cosines above
            fq_chunks[i] = _segments(layout, art_embs)
        if encode_s:
            out["speed"] = {"image_encode_s": encode_s}

        # 3. logits at every text position and over the greedy steps (teacher-forced)
        def segs(chunks_by_image):
            s = []
            for turn in turns:
                for p in turn:
                    s += [list(p.ids)] if isinstance(p, TextPart) else chunks_by_image[p.index]
            return s

        ref_segs = segs(ref_chunks)
        ckey = (sc.name, tuple(str(p) for p in images), str(mm.path) if (mm and images) else None)
        if ckey not in self._ref_cache:
            # kept on disk, read back mapped: a full-size vocabulary makes each scenario's 100-200 MB
            toks, logits = self.fp32.run(ref_segs, sc.greedy)
            f = self.scratch / f"reference-{len(self._ref_cache)}.npy"
            np.save(f, logits)
            del logits
            self._ref_cache[ckey] = (toks, f)
        ref_toks, ref_file = self._ref_cache[ckey]
        ref_logits = np.load(ref_file, mmap_mode="r")
        wire = [[list(p.ids) if isinstance(p, TextPart) else {"image": str(images[p.index])} for p in turn] for turn in turns]
        res = proc.request("run", turns=wire, teacher=ref_toks[:-1], out=str(self.scratch / f"logits-{sc.name}.npy"))
        art_logits = np.load(res["file"], mmap_mode="r")
        n_text = sum(len(s) for s in ref_segs if not (isinstance(s, np.ndarray) and s.dtype.kind == "f"))
        out["positions"] = int(ref_logits.shape[0])
        if art_logits.shape != ref_logits.shape:
            fail.append(f"{sc.name}: logits: {art.name} returned {art_logits.shape[0]} rows for {ref_logits.shape[0]} "
                        f"positions ({n_text} prompt tokens)")
            return self._finish(out, known_diff, sc)
        bad = int(np.size(art_logits) - np.count_nonzero(np.isfinite(art_logits)))
        if bad:  # NaN compares false with every tolerance: judged here, not by the metrics
            rows = int(np.count_nonzero(~np.isfinite(art_logits).all(axis=-1)))
            fail.append(f"{sc.name}: logits: {art.name} returned {bad} non-finite values (NaN or inf) in {rows} of "
                        f"{art_logits.shape[0]} positions")
        summary, series = compare_logits(ref_logits, art_logits)
        out["metrics"] = {"fp32": summary}
        out["series"] = series
        if fq is not None:
            _, fq_logits = fq.run(segs(fq_chunks), sc.greedy, teacher=ref_toks)
            out["metrics"]["fake-quant"], out["series_fake_quant"] = compare_logits(fq_logits, art_logits)
            # the yardstick: what the artifact's types cost on these weights, by the same metrics
            out["metrics"]["fake-quant-vs-fp32"], yard = compare_logits(ref_logits, fq_logits)
            out["series_fake_quant"]["types_logit_err"] = yard["logit_err"]
        art_toks = [int(np.argmax(art_logits[len(art_logits) - sc.greedy + k])) for k in range(sc.greedy)]
        if host is not None:
            x86 = np.load(host.request("run", turns=wire, teacher=ref_toks[:-1],
                                       out=str(self.scratch / f"logits-x86-{sc.name}.npy"))["file"], mmap_mode="r")
            out.setdefault("x86", {}).update(_isa_comparison(x86, art_logits, sc.greedy))
        div = next((k for k, (a, b) in enumerate(zip(ref_toks, art_toks)) if a != b), None)
        # the artifact's tokens are its argmax at each step with the reference's tokens fed (teacher
        # forcing), so they equal free-running greedy decoding up to and including the first divergence
        out["greedy"] = {"steps": sc.greedy, "teacher_forced": True, "reference": ref_toks, "artifact": art_toks,
                         "first_divergence": div,
                         "reference_text": tok.decode(ref_toks), "artifact_text": tok.decode(art_toks)}
        rules = self.rules_label(art.label, art.runtime or self.profile.runtime)
        fails, out["verdict"] = judge(sc.name, art.name, rules, out["metrics"], out.get("series_fake_quant", series),
                                      self.tol, self.budget(art.label))
        fail += fails
        return self._finish(out, known_diff, sc)

    def rules_label(self, label: str, runtime: str) -> str:
        """The conversion rules' key for a type: on a phone CPU with fp16 vector arithmetic, the
        tolerances' "aarch64-fp16-<type>" entry when there is one. There llama.cpp's ARM kernels
        (built with +fp16) and ONNX Runtime's ARM64 fp16 kernels sum float16 matmuls in float16,
        where the fake-quant reference sums in float32."""
        phone = self.profile.phone
        if (phone is not None and "asimdhp" in phone.features
                and (runtime != "llama.cpp" or "+fp16" in phone.profile.arm_arch)):
            key = f"aarch64-fp16-{label}"
            if key in self.tol["conversion"].get("by_type", {}):
                return key
        return label

    def budget(self, label: str) -> float | None:
        """The quality budget (max KL mean vs fp32) for a decoder type: --max-kl, else the
        tolerances' per-type `quality_budget`, else none (quality is reported, not judged)."""
        if self.max_kl is not None:
            return self.max_kl
        b = lookup(self.tol.get("quality_budget", {}), label) if self.tol.get("quality_budget") else None
        return None if b is None else float(b)

    def _finish(self, out: dict, known_diff: list[str] | None = None, sc: Scenario | None = None) -> dict:
        if out["failures"]:
            out["status"] = "fail"
        elif known_diff:
            if sc is not None and sc.preprocessing == "differs":
                out["status"] = "known-difference"
                out["reason"] = "; ".join(known_diff)
            else:
                out["status"] = "fail"
                out["failures"] = [f"{out['scenario']}: preprocessing: {d}" for d in known_diff]
        return out

    SPEED_DECODE_STEPS = 64
    SPEED_REPEATS = 3

    def _speed(self, proc: RuntimeProcess, scenarios: list[Scenario], mm) -> dict:
        """Prefill and decode tokens/s on the text-chat prompt and the encode time of a 448x448
        image, each the best of SPEED_REPEATS runs (the minimum is the least noisy estimate on a
        shared machine; the tiny model's runs take milliseconds)."""
        from .scenarios import load_scenarios

        text = next((s for s in scenarios if s.kind == "text"), None) or load_scenarios("text-chat")[0]
        ids = [t for p in build_turns(text, self.fp32.tokenizer)[0] if isinstance(p, TextPart) for t in p.ids]
        best: dict[str, float] = {}
        for _ in range(self.SPEED_REPEATS):
            tm = proc.request("greedy", tokens=ids, n=self.SPEED_DECODE_STEPS)["timings"]
            for k, n in (("prefill", "n_prefill"), ("decode", "n_decode")):
                if tm.get(f"{k}_s"):
                    best[f"{k}_tok_s"] = max(best.get(f"{k}_tok_s", 0.0), tm[n] / tm[f"{k}_s"])
            if mm is not None and "image" in proc.info["capabilities"]:
                path = self._image_file({"file": "astronaut.jpg", "size": [448, 448]})
                t = proc.request("embeddings", image=str(path), out=str(self.scratch / "speed"))["seconds"]
                best["image_encode_s"] = min(best.get("image_encode_s", float("inf")), t)
        return best

    def close(self) -> None:
        import shutil

        for ref in (self._fq, self._fp32):  # a variant before the model it lives on
            if ref is not None:
                ref.close()
        shutil.rmtree(self.scratch, ignore_errors=True)


def _isa_comparison(x86: np.ndarray, arm: np.ndarray, greedy: int) -> dict:
    """The same file's logits on the phone (aarch64 under qemu) against this machine's (x86)."""
    if x86.shape != arm.shape:
        return {"error": f"{arm.shape[0]} rows on aarch64, {x86.shape[0]} on x86"}
    summary, _ = compare_logits(x86, arm)
    gx = [int(np.argmax(x86[len(x86) - greedy + k])) for k in range(greedy)]
    ga = [int(np.argmax(arm[len(arm) - greedy + k])) for k in range(greedy)]
    return {"metrics": summary, "greedy_x86": gx, "greedy_agreement": sum(a == b for a, b in zip(gx, ga)) / max(1, greedy)}


def _segments(layout: list[dict], embs: list[np.ndarray]) -> list:
    """One image's reference segments in the runtime's layout: its wrapper tokens and the
    reference's embeddings of each chunk."""
    out, k = [], 0
    for c in layout:
        if c["kind"] == "text":
            out.append(list(c["tokens"]))
        else:
            out.append(np.asarray(embs[k], dtype=np.float32))
            k += 1
    return out


def _anchor_artifact(h: Harness, artifacts: list[Artifact], scenarios: list[Scenario]) -> dict | None:
    """Speed and size of an F16 export of the same checkpoint, measured in this run: the F16
    artifact under validation if there is one, else a temporary export (speed probes only)."""
    from convert.gguf.export import export_gguf

    from .artifacts import discover

    modes = sorted({m for a in artifacts for m in a.mmproj}) or ["16x"]
    out = h.scratch / "anchor-f16"
    export_gguf(h.ckpt, out, quant="f16", mode="both" if len(modes) > 1 else modes[0], quiet=True)
    art = discover(out)[0]
    kwargs = art.runtime_kwargs(modes[0], h.profile)
    try:
        with RuntimeProcess(h.profile.runtime, kwargs, deadline=time.monotonic() + h.profile.timeout_s,
                            env=h.env) as proc:
            speed = h._speed(proc, scenarios, art.mmproj.get(modes[0]))
    except RuntimeFailure:
        return None
    return {"name": art.name + " (temporary anchor)", "size_bytes": art.size_bytes, "speed": speed}


def run_validation(ckpt: Checkpoint, artifacts: list[Artifact], scenarios: list[Scenario], *,
                   profile: Profile | None = None, scenario_set: str = "default", quiet: bool = False,
                   imatrix: str | Path | None = None, speed_anchor: bool = True, env: dict | None = None,
                   max_kl: float | None = None, speed: bool = True) -> dict:
    """Validate every artifact; the report dict (JSON-ready) with overall status and exit code."""
    for a in artifacts:
        check_same_model(ckpt, a)  # bad input before any work
    if any(s.needs_vision for s in scenarios) and not any(a.mmproj for a in artifacts):
        names = ", ".join(s.name for s in scenarios if s.needs_vision)
        raise ConvertError(f"the scenarios {names} need a projector: pass --mmproj FILE (or choose --scenarios text)")
    phone = profile.phone if profile else None
    if phone is not None and not any((a.runtime or profile.runtime) in PHONE_RUNTIMES for a in artifacts):
        rts = sorted({a.runtime or profile.runtime for a in artifacts})
        raise ConvertError(f"--phone {phone.profile.name}: these artifacts run in {', '.join(rts)}, which has no "
                           f"aarch64 build yet (the phone profiles run {', '.join(PHONE_RUNTIMES)})")
    t0 = time.monotonic()
    h = Harness(ckpt, profile, quiet=quiet, imatrix=imatrix, env=env, max_kl=max_kl, speed=speed)
    try:
        f16 = [a for a in artifacts if a.label == "F16"]
        order = f16[:1] + [a for a in artifacts if a not in f16[:1]]
        rows: dict[str, dict] = {}
        anchor = None
        for a in order:
            # the anchor is an F16 GGUF in llama.cpp: no yardstick for a checkpoint run by transformers
            if anchor is None and speed_anchor and a.label != "F16" and isinstance(a, Artifact) and h.profile.phone is None:
                anchor = _anchor_artifact(h, artifacts, scenarios)
            row = h.validate_artifact(a, scenarios, anchor)
            if anchor is None and a.label == "F16":
                anchor = {"name": a.name, "size_bytes": row["size_bytes"], "speed": dict(row.get("speed", {}))}
                row["size_ratio_f16"] = 1.0
                row["speed"]["ratio_f16"] = {k: 1.0 for k in row["speed"] if k != "ratio_f16"}
            rows[a.name] = row
    finally:
        h.close()
    arts = [rows[a.name] for a in artifacts]
    crashed = any(r["status"] in ("crashed", "timeout") for r in arts)
    failed = any(r["status"] in FAILING for r in arts)
    code = EXIT_CRASHED if crashed else EXIT_FAILED if failed else EXIT_OK
    from convert.manifest import TOOL, versions

    return {"tool": TOOL, "version": versions().get(TOOL, "?"),
            "model": {"path": str(ckpt.path), "name": ckpt.name}, "scenario_set": scenario_set,
            "profile": h.profile.as_dict(), "anchor": anchor["name"] if anchor else None,
            "status": "fail" if failed else "pass", "exit_code": code, "wall_s": round(time.monotonic() - t0, 2),
            "artifacts": arts}
