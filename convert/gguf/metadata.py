"""GGUF metadata (key/value pairs) for the decoder (`qwen35`) and the projector (`clip`).

Keys and values follow what llama.cpp's loader reads (src/models/qwen35.cpp,
tools/mtmd/clip.cpp) and what its own converter writes for MiniCPM-V 4.6.
"""

from __future__ import annotations

import gguf
from gguf import LlamaFileType as F

from ..checkpoint import Checkpoint
from ..errors import ConvertError

PRE_TOKENIZER = "qwen35"  # Qwen3.5's regex (with \p{M}); llama.cpp keys it by this name


def general(w: gguf.GGUFWriter, ckpt: Checkpoint, n_params: int, name: str | None, mmproj: bool) -> None:
    md = gguf.Metadata.load(None, ckpt.path, name, n_params)
    if md.name is None:
        md.name = ckpt.name
    if md.size_label is None and n_params > 0:
        md.size_label = gguf.size_label(n_params, n_params, 0, 0)
    w.add_type(gguf.GGUFType.MMPROJ if mmproj else gguf.GGUFType.MODEL)
    md.set_gguf_meta_model(w)


def decoder(w: gguf.GGUFWriter, ckpt: Checkpoint, file_type: F) -> None:
    t = ckpt.spec.text
    w.add_block_count(t.num_layers)
    w.add_context_length(t.max_position_embeddings)
    w.add_embedding_length(t.hidden_size)
    w.add_feed_forward_length(t.intermediate_size)
    w.add_head_count(t.num_heads)
    w.add_head_count_kv(t.num_kv_heads)
    sections = list(t.mrope_section) + [0] * (4 - len(t.mrope_section))
    w.add_rope_dimension_sections(sections[:4])  # the qwen35 loader requires it
    w.add_rope_freq_base(t.rope_theta)
    w.add_layer_norm_rms_eps(t.rms_norm_eps)
    w.add_key_length(t.head_dim)
    w.add_value_length(t.head_dim)
    w.add_file_type(file_type)
    w.add_ssm_conv_kernel(t.conv_kernel)
    w.add_ssm_state_size(t.linear_key_head_dim)
    w.add_ssm_group_count(t.linear_num_key_heads)
    w.add_ssm_time_step_rank(t.linear_num_value_heads)
    w.add_ssm_inner_size(t.linear_v_dim)
    # PyPI gguf has no add_recurrent_layers; the key is a plain bool array
    w.add_array(f"{w.arch}.attention.recurrent_layers", [lt == "linear_attention" for lt in t.layer_types])
    w.add_full_attention_interval(t.full_attention_interval)
    w.add_rope_dimension_count(t.rope_dim)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab(w, ckpt)


def vocab(w: gguf.GGUFWriter, ckpt: Checkpoint) -> None:
    """The tokenizer as llama.cpp's `gpt2` BPE: every id up to vocab_size, gaps as [PADi]."""
    tok = ckpt.tokenizer
    n = ckpt.spec.text.vocab_size
    vocab = tok.get_vocab()
    if max(vocab.values()) >= n:
        raise ConvertError(f"tokenizer has id {max(vocab.values())}, beyond the config's vocab_size {n}")
    rev = {i: s for s, i in vocab.items()}
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(n):
        s = rev.get(i)
        if s is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            a = added[i]
            if not a.normalized:
                s = tok.decode(tok.encode(s, add_special_tokens=False))
            special = a.special or (s.startswith("<|") and s.endswith("|>"))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
            tokens.append(s)
        else:
            tokens.append(s)
            types.append(gguf.TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(PRE_TOKENIZER)
    w.add_token_list(tokens)
    w.add_token_types(types)
    sv = gguf.SpecialVocab(ckpt.path, load_merges=True, n_vocab=n)
    if not sv.merges:
        raise ConvertError(f"{ckpt.path}: the tokenizer has no BPE merges (tokenizer.json missing or not BPE)")
    sv.add_to_gguf(w, quiet=True)


def mmproj(w: gguf.GGUFWriter, ckpt: Checkpoint, file_type: F, mode: str) -> None:
    spec, v = ckpt.spec, ckpt.spec.vision
    pp = ckpt.preprocessor_config
    res = pp.get("scale_resolution", 448)
    if isinstance(res, bool) or not isinstance(res, int) or not 0 < res < 1 << 31:
        raise ConvertError(f"{ckpt.path}: preprocessor_config.json: scale_resolution {res!r} is not a positive integer")
    mean, std = pp.get("image_mean", [0.5, 0.5, 0.5]), pp.get("image_std", [0.5, 0.5, 0.5])
    for key, x in (("image_mean", mean), ("image_std", std)):
        if not (isinstance(x, list) and len(x) == 3 and all(isinstance(c, (int, float)) and not isinstance(c, bool)
                                                            and abs(c) < 1e30 for c in x)):
            raise ConvertError(f"{ckpt.path}: preprocessor_config.json: {key} {x!r} is not a list of 3 numbers")
    w.add_file_type(file_type)
    w.add_clip_has_vision_encoder(True)
    w.add_vision_projection_dim(spec.text.hidden_size)
    # mtmd uses image_size as the slice size: the preprocessor's scale_resolution, not the
    # vision config's 980 (which only sizes the position grid)
    w.add_vision_image_size(res)
    w.add_vision_patch_size(v.patch_size)
    w.add_vision_embedding_length(v.hidden_size)
    w.add_vision_feed_forward_length(v.intermediate_size)
    w.add_vision_block_count(v.num_layers)
    w.add_vision_head_count(v.num_heads)
    w.add_vision_image_mean(mean)
    w.add_vision_image_std(std)
    w.add_clip_projector_type("minicpmv4_6")
    w.add_vision_projector_scale_factor(2 if mode == "4x" else 4)
    w.add_vision_wa_layer_indexes([v.insert_layer_id])  # carries the compressor's insertion layer
    w.add_vision_use_gelu(True)
    w.add_vision_attention_layernorm_eps(v.layer_norm_eps)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
