"""This project's GGUFs against llama.cpp's own converter (llama-cpp-python 0.3.36 source package).

Key by key and tensor by tensor, on the tiny model and on a second shape (n_k != n_v linear heads
with a 3x ratio, a 3-layer attention interval, a hidden size that is not a multiple of 256).
"""

import pytest

from convert import Checkpoint, ConvertError
from convert.gguf.export import export_gguf
from validate.gguf_diff import diff


@pytest.fixture(scope="module")
def upstream():
    from validate.upstream import llamacpp_tree, upstream_convert_many

    try:
        llamacpp_tree()
    except ConvertError as e:  # only when PyPI is unreachable
        pytest.skip(str(e))
    return upstream_convert_many


QUANTS = ("f32", "f16", "bf16", "q8_0")


@pytest.mark.parametrize("preset", ["tiny", "tiny-alt"])
def test_same_as_llamacpp_converter(tmp_path, request, upstream, preset):
    model = request.getfixturevalue("tiny_dir" if preset == "tiny" else "tiny_alt_dir")
    jobs, ours = [], []
    for q in QUANTS:  # one upstream process for every file: torch's import is the slow part
        ours += export_gguf(Checkpoint(model), tmp_path / "ours" / q, quant=q, mmproj_quant=q, mode="both", quiet=True)
        jobs += [(model, tmp_path / f"{q}-dec.gguf", q, False, "16x"), (model, tmp_path / f"{q}-mm16.gguf", q, True, "16x"),
                 (model, tmp_path / f"{q}-mm4.gguf", q, True, "4x")]
    theirs = upstream(jobs)
    for a, b in zip(ours, theirs):
        d = diff(a, b)
        assert d.is_identical(), f"{a.name} vs {b.name}: {d.summary()}"
