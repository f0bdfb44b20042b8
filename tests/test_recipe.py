"""Platform recipes as data (recipes/<platform>.toml) and their schema check."""

from __future__ import annotations

import pytest

from convert.errors import ConvertError
from convert.recipe import PLATFORMS, load_recipe


def test_platform_recipes_load():
    """The three apps' recipes: Q4_K_M decoder, F16 16x projector (what the apps load), the phone
    profiles their CPU libraries run on, and their memory tiers."""
    rs = {p: load_recipe(p) for p in PLATFORMS}
    for p, r in rs.items():
        assert r.platform == p and r.gguf["decoder"] == "Q4_K_M" and r.gguf["projector"] == "F16"
        assert r.gguf["modes"] == ["16x"] and r.devices
    assert rs["android"].phones == ("android-armv82", "android-armv86") and rs["harmonyos"].phones == ("harmonyos",)
    assert rs["ios"].phones == ()  # Metal: nothing to emulate here
    assert rs["harmonyos"].devices[0].memory_budget_mb == 1536
    assert [d.n_ctx for d in rs["ios"].devices] == [8192, 16384, 32768, 32768]


GOOD = """platform = "android"
description = "x"
phones = ["android-armv82"]
[gguf]
decoder = "Q4_K_M"
projector = "F16"
modes = ["16x"]
[validation]
scenarios = "quick"
phone_scenarios = "quick"
[[devices]]
name = "d"
memory_budget_mb = 2048
n_ctx = 4096
n_batch = 512
n_ubatch = 512
"""


@pytest.mark.parametrize("edit, message", [
    (("", "[bogus]\nx = 1\n"), "unknown section [bogus]"),
    (('decoder = "Q4_K_M"', 'decoder = "Q4_K_M"\nbits = 4'), "[gguf]: unknown key 'bits'"),
    (('decoder = "Q4_K_M"', 'decoder = "Q7_K"'), "decoder = 'Q7_K' is not one of"),
    (("n_ctx = 4096", 'n_ctx = "4096"'), "n_ctx must be a int, not str"),
    (("n_ctx = 4096", "n_ctx = 0"), "n_ctx must be positive"),
    (('modes = ["16x"]', 'modes = ["8x"]'), "modes = '8x' is not one of 16x, 4x"),
    (('phones = ["android-armv82"]', 'phones = ["pixel"]'), "unknown phone profile 'pixel'"),
    (('projector = "F16"\n', ''), "[gguf]: missing key 'projector'"),
    (('platform = "android"', 'platform = "symbian"'), "platform = 'symbian' is not one of"),
])
def test_bad_recipe_is_one_line(tmp_path, edit, message):
    f = tmp_path / "r.toml"
    old, new = edit
    f.write_text(GOOD + new if old == "" else GOOD.replace(old, new, 1))
    with pytest.raises(ConvertError) as e:
        load_recipe(f)
    assert message in str(e.value) and "\n" not in str(e.value) and str(f) in str(e.value)


def test_unknown_platform():
    with pytest.raises(ConvertError, match="unknown platform 'symbian'"):
        load_recipe("symbian")


def test_minimal_recipe_file_loads(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text(GOOD)
    r = load_recipe(f)
    assert r.onnx == {} and r.devices[0].n_ubatch == 512 and r.validation["scenarios"] == "quick"
