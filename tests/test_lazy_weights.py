"""The harness's memory-lean references compute the same numbers as the plain float32 ones.

A lazy fp32 reference (weights held in the checkpoint's bfloat16, widened per part) against
transformers' float32 model, and the fake-quant reference as a variant of it (quantized bytes
dequantized per part) against the standalone fake-quant model: logits, greedy tokens and image
features bit for bit, on two checkpoints of different shapes, with every part lazy (min_params 0:
the token embedding's row gather, the tied lm_head, the vision embeddings) and with the default.
"""

from __future__ import annotations

import numpy as np
import pytest

from convert.checkpoint import Checkpoint
from convert.gguf.export import export_gguf
from runtimes import lazy_weights
from runtimes.reference import ReferenceRuntime
from validate.references import Reference

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module", params=["tiny", "tiny-alt"])
def case(request, tiny_dir, tiny_alt_dir, tmp_path_factory):
    ckpt = Checkpoint(tiny_dir if request.param == "tiny" else tiny_alt_dir)
    out = tmp_path_factory.mktemp(f"lazy-{request.param}")
    paths = export_gguf(ckpt, out, quant="Q4_K_M", mode="16x", quiet=True)
    plain = Reference.fp32(ckpt)
    tok = plain.tokenizer
    ids = list(tok.encode("Pack light: a rain shell, warm layers, 2 litres of water. 你好！", add_special_tokens=False))
    from PIL import Image

    img = Image.open("recipes/images/astronaut.jpg").convert("RGB").resize((448, 448))
    feats = plain.native_image(("astronaut", "16x"), img, "16x")
    segs = [ids[:4], feats[0], ids[4:]]
    return ckpt, paths, plain, segs, img, feats


def _every_part(monkeypatch):
    """Every part lazy, the lm_head computed in slices of 64 KiB of rows, a 1 MiB buffer pool: on
    the tiny models the paths a full-size one takes."""
    monkeypatch.setattr(lazy_weights, "MIN_UNIT_PARAMS", 0)
    monkeypatch.setattr(lazy_weights, "CHUNK_BYTES", 1 << 16)
    monkeypatch.setattr(lazy_weights, "POOL_BYTES", 1 << 20)


@pytest.mark.parametrize("min_params", [None, 0], ids=["default-units", "every-part"])
def test_lazy_fp32_equals_float32(case, min_params, monkeypatch):
    ckpt, _, plain, segs, img, feats = case
    if min_params is not None:
        _every_part(monkeypatch)
    lazy = Reference.fp32(ckpt, lazy=True)
    assert lazy.rt.lazy is not None and lazy.rt.lazy.units
    if min_params == 0:
        kinds = {type(u).__name__ for u in lazy.rt.lazy.units}
        assert {"Embedding", "Linear"} <= kinds, kinds  # the token embedding and the tied lm_head
        assert "forward" in vars(lazy.rt.model.lm_head)  # sliced
    # idle: every held weight is a float32 placeholder that owns no memory
    held = [p for u in lazy.rt.lazy.units for p in u.parameters()]
    assert all(p.dtype.is_floating_point and p.data.stride() == (0,) * p.dim() for p in held)
    lf = lazy.native_image(("astronaut", "16x"), img, "16x")
    assert all(np.array_equal(a, b) for a, b in zip(lf, feats))
    t1, l1 = plain.run(segs, 6)
    t2, l2 = lazy.run(segs, 6)
    assert t1 == t2 and l1.shape == l2.shape and np.array_equal(l1, l2)
    assert all(p.data.stride() == (0,) * p.dim() for p in held)  # dropped again after the run
    lazy.close()


@pytest.mark.parametrize("min_params", [None, 0], ids=["default-units", "every-part"])
def test_fake_quant_variant_equals_own_model(case, min_params, monkeypatch):
    ckpt, paths, plain, segs, _, _ = case
    if min_params is not None:
        _every_part(monkeypatch)
    own = Reference.fake_quant(ckpt, paths)
    base = Reference.fp32(ckpt, lazy=True)
    fq = Reference.fake_quant(ckpt, paths[:1], base=base)  # the decoder's tensors, on base's model
    assert fq.rt is base.rt and fq.variant
    teacher, ref = plain.run(segs, 6)
    t_own, l_own = own.run(segs, 6)
    t_var, l_var = fq.run(segs, 6)
    assert t_own == t_var and np.array_equal(l_own, l_var)
    _, l_own = own.run(segs, 6, teacher=teacher)
    _, l_var = fq.run(segs, 6, teacher=teacher)
    assert np.array_equal(l_own, l_var)
    assert not np.array_equal(l_var, ref)  # the variant really is quantized
    # the fp32 reference on the shared model is untouched by the variant, before and after its close
    assert np.array_equal(base.run(segs, 6)[1], ref)
    fq.close()
    assert np.array_equal(base.run(segs, 6)[1], ref)
    own.close()
    base.close()


def test_variants_one_at_a_time(tiny_ckpt):
    rt = ReferenceRuntime(tiny_ckpt, lazy=True)
    name = next(n for n, _ in rt.model.named_parameters() if "layers.0." in n and n.endswith("weight"))
    rt.lazy.add_variant("a", {name: lambda out: out.zero_()})
    rt.lazy.add_variant("b", {name: lambda out: out.fill_(1.0)})
    with rt.lazy.using("a"):
        with pytest.raises(RuntimeError, match="one at a time"):
            with rt.lazy.using("b"):
                pass
    with pytest.raises(ValueError, match="no parameter"):
        rt.lazy.add_variant("c", {"model.no_such.weight": lambda out: None})
    rt.close()
