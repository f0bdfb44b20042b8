"""llama.cpp runtime: a decoder GGUF (arch `qwen35`) and optionally a vision projector GGUF
(`clip`, projector `minicpmv4_6`) through llama-cpp-python's ctypes bindings.

Only the low-level C API is used (not `llama_cpp.Llama`): it lets every call start from a cleared
memory (KV cache *and* the Gated-DeltaNet recurrent state), ask for logits at every position
without an n_ctx x n_vocab score buffer, and feed mtmd's image embeddings into the same context.

What llama.cpp does with this hybrid model (measured, see tests/test_runtime_llamacpp.py):
  * `llama_memory_clear(mem, True)` resets both the attention KV cache and the recurrent state;
    a partial rollback (`llama_memory_seq_rm` of a suffix) is not possible for the recurrent part,
    so every fresh call clears everything and re-evaluates from position 0.
  * Logits for every position work; a batch whose tokens all request output is split into ubatches
    sequentially (`split_seq`), so n_batch / n_ubatch splits give the same rows up to float noise.
  * Feeding tokens one at a time uses the recurrent (not the chunked) delta-rule kernel: rows agree
    with a batched evaluation to ~1e-5 relative, not bit for bit.
  * Against transformers in float32 (f32 GGUF): ~4e-7 relative with an f32 KV cache and flash
    attention off (the defaults here); CPU flash attention or an f16 KV cache, llama.cpp's own
    defaults, give ~5e-5.

mtmd (libmtmd) turns "text <__media__> text" plus images into chunks. For MiniCPM-V 4.6 an image is
    text "<image>" | image (overview) | text "</image>" [ "<slice>" | image | "</slice>" ... "\\n" ... ]
i.e. the overview and each slice are separate image chunks, and the wrapper tokens are text chunks
(adjacent text is merged into one chunk). A 448x448 image gives a single 64-token overview chunk.
Where mtmd and transformers' processor differ (measured, runtimes/mtmd_preproc.py reproduces mtmd):
  * slices: mtmd resizes the image for the slice grid keeping its aspect ratio and pads with black
    (PAD_CEIL, centred) where transformers stretches it, so slice pixels differ whenever the image's
    aspect ratio is not the grid's (the overview is resized the same way in both);
  * small images (both sides <= 448) in 16x: mtmd stretches them to one 448x448 overview (64
    tokens) where transformers keeps the aspect ratio (300x200: 70 tokens);
  * thin images: mtmd slices when one side exceeds 448, transformers decides from the area alone
    (500x100: mtmd 18+65+65 tokens, transformers one 72-token chunk).
"""

from __future__ import annotations

import collections
import ctypes
import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from convert.errors import ConvertError

from .base import Chunk, Part, Prefill, Runtime, RuntimeUnavailableError

if TYPE_CHECKING:
    from PIL.Image import Image

__all__ = ["LlamaCppRuntime", "MtmdChunk", "MultimodalEval", "LLAMA_CPP_PYTHON_VERSION"]

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # the ctypes struct layouts below are those of this release
_INSTALL_HINT = f"install llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} (pip install -e '.[llama]')"

_GGML_TYPE_F32, _GGML_TYPE_F16 = 0, 1
_LLAMA_FLASH_ATTN = {None: -1, False: 0, True: 1}  # auto / disabled / enabled
_CHUNK_KINDS = {0: "text", 1: "image", 2: "audio"}


# ---------------------------------------------------------------------------------------------
# lazy imports and process-wide logging


_ll: Any = None  # llama_cpp.llama_cpp
_mtmd: Any = None  # llama_cpp.mtmd_cpp


class _Log:
    """The one log sink for llama.cpp, ggml, mtmd and clip (their loggers are process-wide).

    Lines are dropped unless `verbose`; recent warnings/errors are kept for error messages
    (`clear()` before a native call, `reason()` after it failed)."""

    verbose = False
    recent: collections.deque[tuple[int, str]] = collections.deque(maxlen=20)
    # MiB per "<who> <kind>" (llama_context compute, llama_kv_cache KV, alloc_compute_meta compute, ...):
    # the buffers llama.cpp and mtmd allocate, as they report them (memory estimates use them)
    buffers: dict[str, float] = {}
    _BUFFER = re.compile(r"^(\w+):\s+\S+\s+(compute|model|KV|RS|output) buffer size =\s*([\d.]+) MiB")
    _last_level = 0
    WARN, ERROR, CONT = 3, 4, 5  # enum ggml_log_level

    @classmethod
    def callback(cls, level: int, text: bytes | None, _user_data: Any) -> None:
        if level == cls.CONT:  # continuation of the previous line
            level = cls._last_level
        cls._last_level = level
        s = (text or b"").decode("utf-8", errors="replace")
        if level >= cls.WARN and s.strip():
            cls.recent.append((level, s.strip()))
        m = cls._BUFFER.match(s.strip())
        if m:
            key = f"{m.group(1)} {m.group(2)}"
            cls.buffers[key] = round(cls.buffers.get(key, 0.0) + float(m.group(3)), 2)
        if cls.verbose:
            sys.stderr.write(s)

    @classmethod
    def clear(cls) -> None:
        cls.recent.clear()

    @classmethod
    def reason(cls) -> str:
        """' (llama.cpp: <first error since clear(), else last warning>)' or ''."""
        errors = [s for level, s in cls.recent if level == cls.ERROR]
        warnings = [s for level, s in cls.recent if level == cls.WARN]
        pick = errors[0] if errors else warnings[-1] if warnings else None
        return f" (llama.cpp: {pick})" if pick else ""


_log_cb: Any = None  # the ctypes callback object; must stay alive while installed


def _import_llama() -> Any:
    global _ll, _log_cb
    if _ll is not None:
        return _ll
    try:
        import llama_cpp
        import llama_cpp.llama_cpp as ll
    except (ImportError, OSError) as e:  # OSError: the shared library failed to load
        raise RuntimeUnavailableError(f"the llama.cpp runtime needs llama-cpp-python: {_INSTALL_HINT} [{e}]") from None
    version = getattr(llama_cpp, "__version__", "?")
    if version != LLAMA_CPP_PYTHON_VERSION:
        raise RuntimeUnavailableError(
            f"the llama.cpp runtime is written against llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}, found {version}: "
            f"{_INSTALL_HINT}")
    _log_cb = ll.llama_log_callback(_Log.callback)
    ll.llama_log_set(_log_cb, None)  # also routes ggml's log
    ll.llama_backend_init()
    _ll = ll
    return ll


def _import_mtmd() -> Any:
    global _mtmd
    if _mtmd is None:
        _import_llama()
        try:
            import llama_cpp.mtmd_cpp as mtmd
        except (ImportError, OSError) as e:
            raise RuntimeUnavailableError(f"llama-cpp-python was built without libmtmd: {_INSTALL_HINT} [{e}]") from None
        mtmd.mtmd_helper_log_set(_log_cb, None)  # mtmd, clip and the helpers
        _mtmd = mtmd
    return _mtmd


# ---------------------------------------------------------------------------------------------
# results


# mtmd's names for the interface's types (kept for callers of earlier versions)
MtmdChunk = Chunk
MultimodalEval = Prefill


# ---------------------------------------------------------------------------------------------


class LlamaCppRuntime(Runtime):
    """A decoder GGUF and an optional mmproj GGUF loaded into one llama.cpp context (sequence 0).

    `logits`, `greedy` and `eval_multimodal` start from a cleared memory; `extend` continues the
    current one (multi-turn). `kv_f32` keeps the attention KV cache in float32 (llama.cpp's default
    is f16) so the comparison with the float32 reference measures the artifact, not the cache.
    Runs on the CPU unless `n_gpu_layers` says otherwise. Logging is process-wide in llama.cpp:
    the last runtime constructed decides whether it is printed.
    """

    name = "llama.cpp"
    capabilities = frozenset({"text", "image"})

    def unsupported(self, kind: str) -> str:
        if kind == "video":
            # mtmd's video path is Qwen-VL's temporal merge; MiniCPM-V frames would go in as
            # separately sliced images, not the model's video layout
            return "llama.cpp's mtmd (llama-cpp-python 0.3.36) has no video input for the minicpmv4_6 projector"
        if kind == "image" and not self._mctx:
            return "no mmproj GGUF loaded"
        return super().unsupported(kind)

    def system_info(self) -> dict:
        """ggml's CPU backend's own feature report (its run-time detection, e.g. DOTPROD = 1) and
        the buffers llama.cpp and mtmd allocated (MiB, as they log them)."""
        return {"llama_cpp": _ll.llama_print_system_info().decode("utf-8", "replace").strip(),
                "buffers_mib": dict(_Log.buffers)}

    def __init__(self, decoder: str | os.PathLike[str], mmproj: str | os.PathLike[str] | None = None, *,
                 n_ctx: int = 4096, n_threads: int | None = None, n_batch: int = 512, n_ubatch: int | None = None,
                 kv_f32: bool = True, flash_attn: bool | None = False, n_gpu_layers: int = 0,
                 verbose: bool = False):
        self._model = self._ctx = self._mctx = None
        self._batch: Any = None
        self._closed = False
        decoder = Path(decoder)
        mmproj = Path(mmproj) if mmproj is not None else None
        for p, what in ((decoder, "decoder GGUF"), (mmproj, "mmproj GGUF")):
            if p is not None and not p.is_file():
                raise ConvertError(f"{what} {p}: no such file")
        if n_ctx < 1 or n_batch < 1 or (n_ubatch is not None and n_ubatch < 1):
            raise ValueError("n_ctx, n_batch and n_ubatch must be positive")

        ll = _import_llama()
        _Log.verbose = verbose
        _Log.clear()
        _Log.buffers.clear()  # this runtime's allocations only
        self.decoder_path, self.mmproj_path = decoder, mmproj
        if n_threads is None:
            n_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.n_threads = n_threads

        mparams = ll.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        self._model = ll.llama_model_load_from_file(str(decoder).encode(), mparams)
        if not self._model:
            raise ConvertError(f"llama.cpp could not load {decoder}{_Log.reason()}")
        self._vocab = ll.llama_model_get_vocab(self._model)
        self.n_vocab = int(ll.llama_vocab_n_tokens(self._vocab))
        self.n_embd = int(ll.llama_model_n_embd_inp(self._model))  # width of the embeddings mtmd feeds in

        self.n_batch = min(n_batch, n_ctx)
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = self.n_batch
        cparams.n_ubatch = min(n_ubatch or self.n_batch, self.n_batch)
        cparams.n_seq_max = 1
        cparams.n_threads = cparams.n_threads_batch = self.n_threads
        cparams.flash_attn_type = _LLAMA_FLASH_ATTN[flash_attn]
        if kv_f32:
            cparams.type_k = cparams.type_v = _GGML_TYPE_F32
        cparams.no_perf = True
        _Log.clear()
        self._ctx = ll.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            self.close()
            raise ConvertError(f"llama.cpp could not create a context for {decoder}{_Log.reason()}")
        self.n_ctx = int(ll.llama_n_ctx(self._ctx))
        self._mem = ll.llama_get_memory(self._ctx)
        self._batch = ll.llama_batch_init(self.n_batch, 0, 1)
        self._n_past = 0
        self.last_timings: dict[str, float] = {}

        if mmproj is not None:
            mtmd = _import_mtmd()
            mp = mtmd.mtmd_context_params_default()
            mp.use_gpu = n_gpu_layers != 0
            mp.print_timings = False
            mp.n_threads = self.n_threads
            mp.flash_attn_type = _LLAMA_FLASH_ATTN[flash_attn]
            mp.warmup = False
            _Log.clear()
            self._mctx = mtmd.mtmd_init_from_file(str(mmproj).encode(), self._model, mp)
            if not self._mctx:
                self.close()
                raise ConvertError(f"llama.cpp (mtmd) could not load {mmproj}{_Log.reason()}")
            if not mtmd.mtmd_support_vision(self._mctx):
                self.close()
                raise ConvertError(f"{mmproj}: the projector has no vision encoder")

    # -- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        ll = _ll
        if self._mctx:
            _mtmd.mtmd_free(self._mctx)  # before the model it borrows the vocab from
            self._mctx = None
        if self._batch is not None:
            ll.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            ll.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            ll.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this LlamaCppRuntime is closed")

    # -- text -----------------------------------------------------------------------------------

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        """llama_tokenize without BOS/EOS; `special` parses special-token text into ids."""
        self._check_open()
        data = text.encode("utf-8")
        cap = len(data) + 16
        for _ in range(2):
            buf = (_ll.llama_token * cap)()
            n = _ll.llama_tokenize(self._vocab, data, len(data), buf, cap, False, special)
            if n >= 0:
                return list(buf[:n])
            cap = -n
        raise RuntimeError("llama_tokenize failed")

    def detokenize(self, ids: Sequence[int], *, special: bool = True) -> str:
        """llama_detokenize; `special` renders special tokens as their text."""
        self._check_open()
        arr = (_ll.llama_token * max(len(ids), 1))(*ids)
        cap = 8 * len(ids) + 64
        for _ in range(2):
            buf = ctypes.create_string_buffer(cap)
            n = _ll.llama_detokenize(self._vocab, arr, len(ids), buf, cap, False, special)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", errors="replace")
            cap = -n
        raise RuntimeError("llama_detokenize failed")

    @property
    def eos_token(self) -> int:
        return int(_ll.llama_vocab_eos(self._vocab))

    # -- decoding -------------------------------------------------------------------------------

    @property
    def n_past(self) -> int:
        """Positions in the current memory; `extend` appends at this position."""
        return self._n_past

    def reset(self) -> None:
        """Clear the KV cache and the recurrent state (buffers zeroed too)."""
        self._check_open()
        _ll.llama_memory_clear(self._mem, True)
        self._n_past = 0

    def _decode(self, tokens: Sequence[int], *, all_logits: bool) -> np.ndarray | None:
        """Append `tokens` at n_past, n_batch at a time. Returns [len, n_vocab] if all_logits."""
        n = len(tokens)
        if self._n_past + n > self.n_ctx:
            raise ValueError(f"{self._n_past + n} positions exceed the context ({self.n_ctx}); pass a larger n_ctx")
        bad = [t for t in tokens if not 0 <= t < self.n_vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is out of range [0, {self.n_vocab})")
        out = np.empty((n, self.n_vocab), dtype=np.float32) if all_logits else None
        b = self._batch
        for start in range(0, n, self.n_batch):
            part = tokens[start:start + self.n_batch]
            m = len(part)
            b.n_tokens = m
            for i, t in enumerate(part):
                b.token[i] = t
                b.pos[i] = self._n_past + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
                b.logits[i] = all_logits or (start + i == n - 1)
            _Log.clear()
            rc = _ll.llama_decode(self._ctx, b)
            if rc != 0:
                self._n_past = int(_ll.llama_memory_seq_pos_max(self._mem, 0)) + 1  # what did get in
                raise RuntimeError(f"llama_decode failed with code {rc}{_Log.reason()}")
            self._n_past += m
            if out is not None:
                # outputs of one llama_decode are contiguous and in batch order
                out[start:start + m] = np.ctypeslib.as_array(_ll.llama_get_logits(self._ctx), shape=(m, self.n_vocab))
        return out

    def _last_logits(self) -> np.ndarray:
        ptr = _ll.llama_get_logits_ith(self._ctx, -1)
        if not ptr:  # e.g. the memory ends with an image chunk, whose decode outputs no logits
            raise RuntimeError("no logits for the last position; continue with at least one text token")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """float32 [len(tokens), n_vocab]: logits at every position, from a cleared memory."""
        self.reset()
        if not tokens:
            return np.empty((0, self.n_vocab), dtype=np.float32)
        out = self._decode(list(tokens), all_logits=True)
        assert out is not None
        return out

    def extend(self, tokens: Sequence[int]) -> np.ndarray:
        """Append `tokens` to the current memory (KV cache and recurrent state carried over, e.g.
        the next turn of a chat) and return their logits, float32 [len(tokens), n_vocab]."""
        self._check_open()
        if not tokens:
            return np.empty((0, self.n_vocab), dtype=np.float32)
        out = self._decode(list(tokens), all_logits=True)
        assert out is not None
        return out

    def greedy(self, tokens: Sequence[int], n: int, *, fresh: bool = True) -> list[int]:
        """The `n` tokens greedy decoding appends to `tokens` (no stop at EOS; ties go to the
        lowest id, like numpy/torch argmax). With fresh=False the prompt continues the current
        memory. Afterwards the memory holds the prompt and all n generated tokens."""
        if fresh:
            self.reset()
        self._check_open()
        if not tokens and self._n_past == 0:
            raise ValueError("greedy needs at least one prompt token")
        t0 = time.perf_counter()
        if tokens:
            self._decode(list(tokens), all_logits=False)
        t1 = time.perf_counter()
        out: list[int] = []
        for _ in range(n):
            nxt = int(np.argmax(self._last_logits()))
            out.append(nxt)
            self._decode([nxt], all_logits=False)
        self.last_timings = {"prefill_s": t1 - t0, "n_prefill": len(tokens), "decode_s": time.perf_counter() - t1,
                             "n_decode": n}
        return out

    # -- multimodal -----------------------------------------------------------------------------

    @property
    def media_marker(self) -> str:
        """The text mtmd replaces with an image (`<__media__>`)."""
        mtmd = _import_mtmd()
        marker = mtmd.mtmd_get_marker(self._mctx) if self._mctx else None
        return (marker or mtmd.mtmd_default_marker()).decode()

    def _need_mmproj(self) -> None:
        self._check_open()
        if not self._mctx:
            raise ConvertError("this runtime was loaded without an mmproj GGUF; pass mmproj=...")

    def _tokenize_mm(self, text: str, images: Sequence["Image"]) -> Any:
        """mtmd_tokenize -> an owned mtmd_input_chunks pointer (caller frees)."""
        self._need_mmproj()
        mtmd = _mtmd
        n_markers = text.count(self.media_marker)
        if n_markers != len(images):
            raise ValueError(f"the prompt has {n_markers} media markers ({self.media_marker}) for {len(images)} images")
        bitmaps = []
        try:
            for img in images:
                rgb = img.convert("RGB")
                data = rgb.tobytes()
                bmp = mtmd.mtmd_bitmap_init(rgb.width, rgb.height, (ctypes.c_uint8 * len(data)).from_buffer_copy(data))
                if not bmp:
                    raise RuntimeError("mtmd_bitmap_init failed")
                bitmaps.append(bmp)
            chunks = mtmd.mtmd_input_chunks_init()
            raw = text.encode("utf-8")
            inp = mtmd.mtmd_input_text(raw, len(raw), False, True)  # no BOS; parse special tokens
            arr = (mtmd.mtmd_bitmap_p_ctypes * max(len(bitmaps), 1))(*bitmaps)
            _Log.clear()
            rc = mtmd.mtmd_tokenize(self._mctx, chunks, ctypes.byref(inp), arr, len(bitmaps))
            if rc != 0:
                mtmd.mtmd_input_chunks_free(chunks)
                raise ValueError(f"mtmd_tokenize failed with code {rc}{_Log.reason()}")
            return chunks
        finally:
            for bmp in bitmaps:
                mtmd.mtmd_bitmap_free(bmp)

    def _chunk_list(self, chunks: Any) -> list[tuple[Any, MtmdChunk]]:
        mtmd = _mtmd
        out = []
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            c = mtmd.mtmd_input_chunks_get(chunks, i)
            kind = _CHUNK_KINDS.get(mtmd.mtmd_input_chunk_get_type(c), "?")
            toks: tuple[int, ...] = ()
            if kind == "text":
                n = ctypes.c_size_t(0)
                ptr = mtmd.mtmd_input_chunk_get_tokens_text(c, ctypes.byref(n))
                toks = tuple(ptr[: n.value]) if n.value else ()
            out.append((c, MtmdChunk(kind, int(mtmd.mtmd_input_chunk_get_n_tokens(c)),
                                     int(mtmd.mtmd_input_chunk_get_n_pos(c)), toks)))
        return out

    def mtmd_chunks(self, text: str, images: Sequence["Image"]) -> list[MtmdChunk]:
        """How mtmd splits `text` (with one media marker per image) into text and image chunks;
        no encoding is run."""
        chunks = self._tokenize_mm(text, images)
        try:
            return [info for _, info in self._chunk_list(chunks)]
        finally:
            _mtmd.mtmd_input_chunks_free(chunks)

    def image_layout(self, image: "Image") -> list[MtmdChunk]:
        """The chunks of one image on its own: wrapper tokens as text chunks, overview and slices as
        image chunks (`[c.n_tokens for c in layout if c.kind == "image"]` are the per-slice counts)."""
        return self.mtmd_chunks(self.media_marker, [image])

    def image_embeddings(self, image: "Image") -> list[np.ndarray]:
        """mtmd's projector output for `image`: float32 [n_tokens, n_embd] per image chunk, in mtmd
        order (overview first, then the slices row by row). Leaves the decoder memory untouched."""
        chunks = self._tokenize_mm(self.media_marker, [image])
        try:
            out = []
            for c, info in self._chunk_list(chunks):
                if info.kind != "image":
                    continue
                out.append(self._encode(c, info))
            return out
        finally:
            _mtmd.mtmd_input_chunks_free(chunks)

    def image_pixels(self, image: "Image") -> list[np.ndarray]:
        """mtmd's preprocessed chunks (overview, then slices), replicated in numpy (mtmd_preproc.py)."""
        self._need_mmproj()
        from .mtmd_preproc import MtmdVisionParams, preprocess

        if getattr(self, "_vision_params", None) is None:
            self._vision_params = MtmdVisionParams.from_gguf(self.mmproj_path)
        return preprocess(image.convert("RGB"), self._vision_params)

    def _encode(self, c: Any, info: MtmdChunk) -> np.ndarray:
        _Log.clear()
        rc = _mtmd.mtmd_encode_chunk(self._mctx, c)
        if rc != 0:
            raise RuntimeError(f"mtmd_encode_chunk failed with code {rc}{_Log.reason()}")
        ptr = _mtmd.mtmd_get_output_embd(self._mctx)
        return np.ctypeslib.as_array(ptr, shape=(info.n_tokens, self.n_embd)).copy()

    def _eval_chunks(self, listed: list[tuple[Any, Chunk]], toks: list[int], pos: list[int],
                     rows: list[np.ndarray]) -> None:
        """Decode mtmd chunks at n_past: text with logits at every position, images through
        mtmd's helper (`mtmd_helper_eval_chunk_single`: encode, then decode the embeddings)."""
        for c, info in listed:
            if info.kind == "text":
                self._text_part(list(info.tokens), toks, pos, rows)
                continue
            new_past = _ll.llama_pos(0)
            _Log.clear()
            rc = _mtmd.mtmd_helper_eval_chunk_single(self._mctx, self._ctx, c, self._n_past, 0, self.n_batch,
                                                     False, ctypes.byref(new_past))
            if rc != 0:
                raise RuntimeError(f"mtmd_helper_eval_chunk_single failed with code {rc}{_Log.reason()}")
            self._n_past = int(new_past.value)

    def _text_part(self, tokens: list[int], toks: list[int], pos: list[int], rows: list[np.ndarray]) -> None:
        if not tokens:
            return
        pos.extend(range(self._n_past, self._n_past + len(tokens)))
        toks.extend(tokens)
        rows.append(self._decode(tokens, all_logits=True))

    def _result(self, chunks: list[Chunk], toks: list[int], pos: list[int], rows: list[np.ndarray]) -> Prefill:
        logits = np.concatenate(rows) if rows else np.empty((0, self.n_vocab), dtype=np.float32)
        return Prefill(chunks, toks, np.asarray(pos, dtype=np.int64), logits, self._n_past)

    def prefill(self, parts: Sequence[Part], *, fresh: bool = True) -> Prefill:
        """Token-id parts are decoded as given (so both sides of a comparison use the same ids);
        each image is laid out by mtmd as `image_layout` shows (its wrapper tokens included)."""
        if fresh:
            self.reset()
        self._check_open()
        chunks: list[Chunk] = []
        toks: list[int] = []
        pos: list[int] = []
        rows: list[np.ndarray] = []
        for part in parts:
            if isinstance(part, (list, tuple, np.ndarray)):
                ids = [int(t) for t in part]
                self._text_part(ids, toks, pos, rows)
                if ids:
                    chunks.append(Chunk("text", len(ids), len(ids), tuple(ids)))
                continue
            mc = self._tokenize_mm(self.media_marker, [part])
            try:
                listed = self._chunk_list(mc)
                need = self._n_past + sum(info.n_pos for _, info in listed)
                if need > self.n_ctx:
                    raise ValueError(f"{need} positions exceed the context ({self.n_ctx}); pass a larger n_ctx")
                self._eval_chunks(listed, toks, pos, rows)
                chunks.extend(info for _, info in listed)
            finally:
                _mtmd.mtmd_input_chunks_free(mc)
        return self._result(chunks, toks, pos, rows)

    def eval_multimodal(self, text: str, images: Sequence["Image"], *, fresh: bool = True) -> MultimodalEval:
        """Evaluate a prompt with media markers: image chunks through mtmd's helper
        (`mtmd_helper_eval_chunk_single`: encode, then decode the embeddings at their positions, as
        `mtmd_helper_eval_chunks` does), text chunks here with logits at every text position.
        With fresh=False the prompt continues the current memory (a later chat turn); `extend`
        and `greedy(fresh=False)` can follow either way."""
        if fresh:
            self.reset()
        chunks = self._tokenize_mm(text, images)
        try:
            listed = self._chunk_list(chunks)
            total = sum(info.n_pos for _, info in listed)
            if self._n_past + total > self.n_ctx:
                raise ValueError(f"{self._n_past + total} positions exceed the context ({self.n_ctx}); pass a larger n_ctx")
            toks: list[int] = []
            pos: list[int] = []
            rows: list[np.ndarray] = []
            self._eval_chunks(listed, toks, pos, rows)
            return self._result([info for _, info in listed], toks, pos, rows)
        finally:
            _mtmd.mtmd_input_chunks_free(chunks)
