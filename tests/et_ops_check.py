"""Check libminicpmv_et (runtimes/phone/et: the C ABI runner + the project's llama:: kernels) on x86
against the ExecuTorch pybindings runtime (runtimes.executorch.EtEngine, upstream llama ops).

Not a pytest file: tests run it in a subprocess and read the JSON it prints.

    python tests/et_ops_check.py PTE_FOLDER [--lib libminicpmv_et.so | --build-dir DIR] [--threads N]

The two runtimes never share a process (registering the llama:: ops twice aborts one), so the parent
builds the library, then runs `--role ref` (pybindings) and `--role native` (ctypes, imports no
executorch) as subprocesses over the same inputs. The reference runs first; its token embeddings
and vision features are the decoder inputs of both sides, so the decoder figures isolate the decoder.
Exit status 0 when everything ran (the figures are in the JSON; judging them is the caller's job).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ET_DTYPES = {6: np.float32, 4: np.int64, 7: np.float64, 3: np.int32, 11: np.bool_, 1: np.int8, 0: np.uint8}
N_CHUNK = 3  # tokens of the second decoder call (the prefill takes the rest but one)


def pte_of(folder: Path) -> Path:
    m = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    return folder / m["source"]["executorch"]["file"]


# ------------------------------------------------------------------------------------ native side
class NativeEt:
    """A thin ctypes view of libminicpmv_et's C ABI."""

    def __init__(self, lib: Path, pte: Path, n_threads: int):
        L = self.L = ctypes.CDLL(str(lib))
        vp, cp, i64p = ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int64)
        ip = ctypes.POINTER(ctypes.c_int)
        L.mcv_et_open.restype, L.mcv_et_open.argtypes = vp, [cp, ctypes.c_int, cp, ctypes.c_size_t]
        L.mcv_et_method_names.argtypes = [vp, cp, ctypes.c_size_t]
        L.mcv_et_int.argtypes = [vp, cp, i64p]
        L.mcv_et_run.argtypes = [vp, cp, ctypes.c_int, ip, ip, i64p, ctypes.POINTER(vp)]
        L.mcv_et_last_error.restype, L.mcv_et_last_error.argtypes = cp, [vp]
        L.mcv_et_n_outputs.argtypes = [vp]
        L.mcv_et_output.argtypes = [vp, ctypes.c_int, ip, ip, i64p]
        L.mcv_et_copy_output.argtypes = [vp, ctypes.c_int, vp, ctypes.c_size_t]
        L.mcv_et_info.restype, L.mcv_et_info.argtypes = cp, [vp]
        L.mcv_et_close.argtypes = [vp]
        err = ctypes.create_string_buffer(1024)
        self.h = L.mcv_et_open(str(pte).encode(), n_threads, err, len(err))
        if not self.h:
            raise RuntimeError(f"mcv_et_open: {err.value.decode(errors='replace')}")

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise RuntimeError(f"{what}: {self.L.mcv_et_last_error(self.h).decode(errors='replace')} (rc {rc})")

    def method_names(self) -> list[str]:
        buf = ctypes.create_string_buffer(4096)
        self._check(self.L.mcv_et_method_names(self.h, buf, len(buf)), "method_names")
        return buf.value.decode().split(",")

    def int(self, method: str) -> int:
        out = ctypes.c_int64()
        self._check(self.L.mcv_et_int(self.h, method.encode(), ctypes.byref(out)), method)
        return out.value

    def run(self, method: str, *arrays: np.ndarray) -> list[np.ndarray]:
        codes = {np.dtype(v): k for k, v in ET_DTYPES.items()}
        arrays = [np.ascontiguousarray(a) for a in arrays]
        n = len(arrays)
        dtype = (ctypes.c_int * n)(*(codes[a.dtype] for a in arrays))
        ndim = (ctypes.c_int * n)(*(a.ndim for a in arrays))
        dims = [d for a in arrays for d in a.shape]
        shapes = (ctypes.c_int64 * max(1, len(dims)))(*dims)
        data = (ctypes.c_void_p * n)(*(a.ctypes.data for a in arrays))
        self._check(self.L.mcv_et_run(self.h, method.encode(), n, dtype, ndim, shapes, data), method)
        outs = []
        for i in range(self.L.mcv_et_n_outputs(self.h)):
            dt, nd, shape = ctypes.c_int(), ctypes.c_int(), (ctypes.c_int64 * 8)()
            self._check(self.L.mcv_et_output(self.h, i, ctypes.byref(dt), ctypes.byref(nd), shape), f"{method} output {i}")
            a = np.empty(tuple(shape[:nd.value]), ET_DTYPES[dt.value])
            self._check(self.L.mcv_et_copy_output(self.h, i, a.ctypes.data, a.nbytes), f"{method} output {i}")
            outs.append(a)
        return outs

    def info(self) -> str:
        return self.L.mcv_et_info(self.h).decode()

    def close(self) -> None:
        self.L.mcv_et_close(self.h)
        self.h = None


def decoder_inputs(ref: dict) -> list[tuple[np.ndarray, int]]:
    """(embeds, start) of the three decoder calls, built from the reference's outputs: a prefill of
    text + image features + text, a multi-token chunk at start_pos > 0, and a one-token step."""
    emb, feats = ref["embedding"], ref["vision"]
    n = emb.shape[1] - N_CHUNK - 1  # text tokens of the prefill, split around the image
    prefill = np.concatenate([emb[:, :n // 2], feats[None], emb[:, n // 2:n]], axis=1).astype(np.float32)
    chunk = emb[:, n:n + N_CHUNK]
    step = emb[:, n + N_CHUNK:]
    p = prefill.shape[1]
    return [(prefill, 0), (chunk, p), (step, p + N_CHUNK)]


def role_native(a) -> dict:
    inputs = dict(np.load(a.inputs))
    ref = dict(np.load(a.ref))
    t0 = time.perf_counter()
    et = NativeEt(Path(a.lib), pte_of(Path(a.folder)), a.threads)
    res = {"open_s": time.perf_counter() - t0, "info": et.info(), "methods": et.method_names(),
           "max_seq_len": et.int("get_max_seq_len"), "max_context": et.int("get_max_context_len")}
    out = {"embedding": et.run("token_embedding", inputs["ids"])[0].astype(np.float32)}
    t0 = time.perf_counter()
    out["vision"] = et.run("vision_encoder", inputs["pixels"])[0][0].astype(np.float32)
    res["vision_s"] = time.perf_counter() - t0
    for name, (embeds, start) in zip(("prefill", "chunk", "step"), decoder_inputs(ref)):
        t0 = time.perf_counter()
        pos = np.arange(start, start + embeds.shape[1], dtype=np.int64)
        out[f"logits_{name}"] = et.run("text_decoder", embeds, pos)[0].reshape(1, -1).astype(np.float32)
        res[f"{name}_s"] = time.perf_counter() - t0
    et.close()
    np.savez(a.out, **out)
    return res


# --------------------------------------------------------------------------------- reference side
def role_ref(a) -> dict:
    sys.path.insert(0, str(REPO))
    from runtimes.executorch import EtEngine

    inputs = dict(np.load(a.inputs))
    folder = Path(a.folder)
    modes = json.loads((folder / "manifest.json").read_text())["source"]["executorch"].get("modes") or ["16x"]
    eng = EtEngine(pte_of(folder), list(modes), a.threads)
    res = {"max_seq_len": eng.max_seq_len, "max_context": eng.max_context}
    out = {"embedding": eng.embed(inputs["ids"])}
    t0 = time.perf_counter()
    out["vision"] = eng.encode(inputs["pixels"], modes[0])
    res["vision_s"] = time.perf_counter() - t0
    np.savez(a.out, **out)  # the decoder inputs of both sides come from these
    for name, (embeds, start) in zip(("prefill", "chunk", "step"), decoder_inputs(out)):
        t0 = time.perf_counter()
        out[f"logits_{name}"] = eng.decode(embeds, start)
        res[f"{name}_s"] = time.perf_counter() - t0
    eng.close()
    np.savez(a.out, **out)
    return res


# ----------------------------------------------------------------------------------------- parent
def _sub(args: list[str], what: str) -> dict:
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=REPO)
    try:
        res = json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        res = None
    if r.returncode != 0 or not isinstance(res, dict):
        why = res.get("error") if isinstance(res, dict) else None
        tail = " | ".join((r.stderr.strip().splitlines() or [""])[-3:])
        raise RuntimeError(f"{what} failed (status {r.returncode}): {why or tail}")
    return res


def diff(ref: np.ndarray, got: np.ndarray, logits: bool = False) -> dict:
    if ref.shape != got.shape:
        return {"shape_ref": list(ref.shape), "shape": list(got.shape), "max_abs": None}
    d = float(np.max(np.abs(ref.astype(np.float64) - got))) if ref.size else 0.0
    m = float(np.max(np.abs(ref))) if ref.size else 0.0
    r = {"shape": list(ref.shape), "max_abs": d, "max_ref": m, "rel": d / m if m else d}
    if logits:  # [1, V]: same top token, KL(ref || got) in nats
        r["argmax_equal"] = bool(np.argmax(ref) == np.argmax(got))
        lp, lq = (x.astype(np.float64) - np.logaddexp.reduce(x.astype(np.float64), axis=-1) for x in (ref, got))
        r["kl"] = float(np.sum(np.exp(lp) * (lp - lq)))
    return r


def parent(a) -> dict:
    sys.path.insert(0, str(REPO))
    folder = Path(a.folder).resolve()
    lib = Path(a.lib) if a.lib else None
    work = Path(tempfile.mkdtemp(prefix="et-ops-check-"))
    t0 = time.perf_counter()
    if lib is None:
        from runtimes.phone.et.build_lib import build_host_lib

        lib = build_host_lib(Path(a.build_dir) if a.build_dir else work / "build")
    build_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1000, size=(1, a.prefill + N_CHUNK + 1), dtype=np.int64)
    pixels = rng.standard_normal((1, 3, a.side, a.side)).astype(np.float32)
    np.savez(work / "inputs.npz", ids=ids, pixels=pixels)
    common = ["--folder", str(folder), "--inputs", str(work / "inputs.npz"), "--threads", str(a.threads)]
    ref_info = _sub(["--role", "ref", *common, "--out", str(work / "ref.npz")], "reference (pybindings)")
    nat_info = _sub(["--role", "native", *common, "--lib", str(lib), "--ref", str(work / "ref.npz"),
                     "--out", str(work / "native.npz")], "native (libminicpmv_et)")
    ref, got = dict(np.load(work / "ref.npz")), dict(np.load(work / "native.npz"))
    res = {"lib": str(lib), "build_s": round(build_s, 2), "pte": str(pte_of(folder)), "threads": a.threads,
           "pixels": list(pixels.shape), "native": nat_info, "reference": ref_info}
    for key in ("embedding", "vision", "logits_prefill", "logits_chunk", "logits_step"):
        res[key] = diff(ref[key], got[key], logits=key.startswith("logits"))
    res["decoder_rel_max"] = max(res[k]["rel"] for k in ("logits_prefill", "logits_chunk", "logits_step"))
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", nargs="?", help="a folder written by `python -m convert executorch`")
    ap.add_argument("--folder", dest="folder_opt")
    ap.add_argument("--lib", help="a built libminicpmv_et.so (default: build one for this host)")
    ap.add_argument("--build-dir", help="where to build the library (default: a temporary dir)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=6, help="text tokens in the first decoder call")
    ap.add_argument("--side", type=int, default=56, help="pixel side of the vision input (multiple of 56)")
    ap.add_argument("--role", choices=("ref", "native"), help=argparse.SUPPRESS)
    ap.add_argument("--inputs", help=argparse.SUPPRESS)
    ap.add_argument("--ref", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.folder = a.folder_opt or a.folder
    if not a.folder:
        ap.error("give the .pte folder")
    try:
        res = {"ref": role_ref, "native": role_native}.get(a.role, parent)(a)
    except Exception as e:  # one JSON line either way, so the caller can report it
        print(json.dumps({"ok": False, "error": f"{e.__class__.__name__}: {e}"}))
        return 1
    print(json.dumps({"ok": True, **res}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
