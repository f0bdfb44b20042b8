"""The export modules (convert/modules) equal transformers in eager fp32, before any export."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from convert import Checkpoint
from convert.modules import TextDecoder, TokenEmbedding, VisionEncoder, state_specs, unpack

TOL = 1e-5  # max relative error (max |a-b| / max |b|)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.fixture(scope="module", params=["tiny", "tiny-alt"])
def ref(request, tiny_dir, tiny_alt_dir):
    from runtimes.reference import ReferenceRuntime

    return ReferenceRuntime(Checkpoint(tiny_dir if request.param == "tiny" else tiny_alt_dir))


@pytest.mark.parametrize("mode", ["16x", "4x"])
def test_vision_encoder_equals_transformers(ref, mode):
    from PIL import Image

    from recipes import HERE

    img = Image.open(HERE / "images" / "rocket.jpg").convert("RGB")
    enc = VisionEncoder(ref.model, ref.ckpt.spec, mode).eval()
    grids = set()
    for size in [(448, 448), (900, 300), (640, 480)]:  # one slice; a wide overview + 3 slices; 3 grids
        im = img.resize(size)
        inp = ref.image_inputs(im, mode)
        want = ref.image_embeddings(im, mode)
        chunks = unpack(inp["pixel_values"], inp["target_sizes"].tolist())
        assert len(chunks) == len(want)
        for x, w in zip(chunks, want):
            grids.add(tuple(x.shape[2:]))
            with torch.no_grad():
                got = enc(x).numpy()
            assert got.shape == w.shape
            assert rel(got, w) <= TOL
    assert len(grids) >= 3


def test_decoder_prefill_then_decode_equals_recompute(ref):
    spec = ref.ckpt.spec.text
    emb, dec = TokenEmbedding(ref.model), TextDecoder(ref.model, spec).eval()
    ids = torch.randint(0, spec.vocab_size, (1, 216), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = ref.model(input_ids=ids, use_cache=False).logits[0].numpy()
        assert rel(emb(ids).numpy()[0], ref.model.get_input_embeddings()(ids)[0].numpy()) == 0
        # 200-token prefill in one call, then 16 single steps on the carried state
        out = dec(emb(ids[:, :200]), torch.ones(1, 200, dtype=torch.long), torch.arange(200)[None], *dec.empty_state())
        assert out[0].shape == (1, 200, spec.vocab_size)
        assert rel(out[0][0].numpy(), full[:200]) <= TOL
        state, rows = list(out[1:]), []
        for t in range(200, 216):
            o = dec(emb(ids[:, t:t + 1]), torch.ones(1, t + 1, dtype=torch.long), torch.tensor([[t]]), *state)
            state, rows = list(o[1:]), rows + [o[0][0, 0].numpy()]
        assert rel(np.stack(rows), full[200:]) <= TOL
        # a prompt continued by a second multi-token call (chunked rule from a non-zero state)
        a = dec(emb(ids[:, :120]), torch.ones(1, 120, dtype=torch.long), torch.arange(120)[None], *dec.empty_state())
        b = dec(emb(ids[:, 120:216]), torch.ones(1, 216, dtype=torch.long), torch.arange(120, 216)[None], *a[1:])
        assert rel(b[0][0].numpy(), full[120:]) <= TOL
    # the state's names and shapes are what the decoder returns
    specs = state_specs(spec)
    assert len(specs) == len(state) == 2 * spec.num_layers
    for s, t in zip(specs, state):
        want = list(s.shape)
        if s.seq_axis is not None:
            want[s.seq_axis] = 216
        assert list(t.shape) == want, s.input_name
