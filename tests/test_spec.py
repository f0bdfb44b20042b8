import copy

import pytest

from convert import ConvertError, ModelSpec
from convert.synth.presets import REAL_CONFIG


def test_real_config_values():
    s = ModelSpec.from_config(copy.deepcopy(REAL_CONFIG))
    t, v = s.text, s.vision
    assert (t.num_layers, t.hidden_size, t.intermediate_size, t.vocab_size) == (24, 1024, 3584, 248094)
    assert t.full_layers == (3, 7, 11, 15, 19, 23) and len(t.linear_layers) == 18
    assert (t.num_heads, t.num_kv_heads, t.head_dim, t.rope_dim) == (8, 2, 256, 64)
    assert (t.linear_qk_dim, t.linear_v_dim, t.linear_conv_dim) == (2048, 2048, 6144)
    assert t.mrope_section == (11, 11, 10) and t.rope_theta == 1e7 and t.tie_word_embeddings
    assert (v.hidden_size, v.num_layers, v.num_positions, v.insert_layer_id) == (1152, 27, 4900, 6)
    assert (v.window_hidden_size, v.window_intermediate_size, s.merger_hidden_size) == (4608, 17216, 4608)
    assert s.image_token_id == 248056 and s.downsample_mode == "16x"


def test_layer_types_default_from_interval():
    cfg = copy.deepcopy(REAL_CONFIG)
    del cfg["text_config"]["layer_types"]
    cfg["text_config"]["full_attention_interval"] = 3
    cfg["text_config"]["num_hidden_layers"] = 6
    assert ModelSpec.from_config(cfg).text.full_layers == (2, 5)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(model_type="llava"), "model_type 'llava'"),
    (lambda c: c.update(merger_times=2), "merger_times=2"),
    (lambda c: c.update(downsample_mode="8x"), "downsample_mode"),
    (lambda c: c.pop("vision_config"), "vision_config"),
    (lambda c: c["text_config"].pop("hidden_size"), "hidden_size"),
    (lambda c: c["text_config"].update(layer_types=["linear_attention"] * 3), "layer_types has 3"),
    (lambda c: c["text_config"].update(layer_types=["sliding_attention"] * 24), "unsupported layer type"),
    (lambda c: c["text_config"].update(linear_num_value_heads=20), "multiple of"),
    (lambda c: c["text_config"].update(linear_value_head_dim=64), "linear_value_head_dim"),
    (lambda c: c["vision_config"].update(window_kernel_size=[3, 3]), "window_kernel_size"),
    (lambda c: c.update(insert_layer_id=40), "insert_layer_id 40"),
])
def test_rejects_what_it_cannot_convert(edit, message):
    cfg = copy.deepcopy(REAL_CONFIG)
    edit(cfg)
    with pytest.raises(ConvertError) as e:
        ModelSpec.from_config(cfg)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_rejects_mrope_sections_llamacpp_would_abort_on():
    cfg = copy.deepcopy(REAL_CONFIG)
    cfg["text_config"]["head_dim"] = 16  # the default sections [11, 11, 10] need head_dim >= 32
    with pytest.raises(ConvertError, match="mrope_section"):
        ModelSpec.from_config(cfg)
