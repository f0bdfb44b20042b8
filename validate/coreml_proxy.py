"""The `coreml-proxy` runtime: a Core ML folder's own weights (read back from its packages' files, int4 /
int8 decompressed by coremltools as Core ML does) in the PyTorch export modules the packages were
converted from, computing in float16 with float16 states, through the same call schedule and app-side
pipeline as the real Core ML runtime (runtimes/coreml.py). Weights from the package, executed in PyTorch,
not by Core ML: what it proves is the package's weights and the program's design, not Core ML's kernels.
It lives beside the harness because it runs the export modules (runtimes/ does not import convert/).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from convert.errors import ConvertError
from runtimes.coreml import CoremlEngine, CoremlRuntime


class CoremlProxyEngine(CoremlEngine):
    """The package's weights in the PyTorch export modules, float16 compute and states."""

    def __init__(self, folder: Path, info: dict, packages: dict, n_threads: int | None = None, source=None):
        import torch

        if "decoder" not in packages:
            raise ConvertError(f"{folder}: no decoder package (export with --parts vision,decoder)")
        if n_threads:
            torch.set_num_threads(int(n_threads))
        modes = (info["vision"]["mode"],) if "vision" in packages else ()
        super().__init__(info, modes)
        self.torch = torch
        model, spec = package_model(folder, packages, source)
        from convert.coreml.decoder import StatefulDecoder
        from convert.modules import VisionEncoder

        self.decoder = StatefulDecoder(model, spec.text, self.max_context).eval()
        self.embedding = model.get_input_embeddings().weight
        self.vision = {m: VisionEncoder(model, spec, m).eval() for m in modes}

    def _call(self, function, embeds, positions):
        with self.torch.no_grad():
            out = self.decoder(self.torch.from_numpy(embeds).half(), self.torch.from_numpy(positions))
        return out.float().numpy()

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return self.embedding.detach()[self.torch.from_numpy(ids)].float().numpy()

    def encode(self, pixels: np.ndarray, mode: str) -> np.ndarray:
        with self.torch.no_grad():
            out = self.vision[mode](self.torch.from_numpy(np.ascontiguousarray(pixels)).half())
        return out.float().numpy()


class CoremlProxyRuntime(CoremlRuntime):
    name = "coreml-proxy"

    def make_engine(self, folder: Path, found: dict, *, n_threads=None, source=None, **_ignored) -> CoremlEngine:
        return CoremlProxyEngine(folder, found["info"], found["packages"], n_threads, source)


def package_state(folder: Path, packages: dict, source: str | Path | None) -> tuple:
    """(config, spec, state dict): every weight the packages hold, by HF name; a parameter the export
    modules use that no package holds is an error, not a silent default. `source` (the checkpoint) only
    locates the few parameters Core ML folded into derived constants (convert/coreml/read.py FOLDS):
    their values are still the package's."""
    import torch
    from transformers import MiniCPMV4_6Config, MiniCPMV4_6ForConditionalGeneration

    from convert.coreml.read import decoder_names, package_weights
    from convert.coreml.vision import weight_names
    from convert.spec import ModelSpec

    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        spec = ModelSpec.from_config(config)
        cfg = MiniCPMV4_6Config.from_dict(config)
    except Exception as e:
        raise ConvertError(f"{folder}: no usable config.json ({e.__class__.__name__}: {str(e)[:160]})") from None
    with torch.device("meta"):
        skeleton = MiniCPMV4_6ForConditionalGeneration(cfg)
    lookup = None
    if source is not None:
        from convert.checkpoint import Checkpoint

        ckpt = Checkpoint(source)
        tied = "model.language_model.embed_tokens.weight"
        lookup = lambda n: ckpt.tensor(tied if n == "lm_head.weight" and n not in ckpt else n)  # noqa: E731
    names = decoder_names(skeleton, spec)
    weights, _ = package_weights(packages["decoder"], names, lookup)
    if "vision" in packages:
        mode = json.loads((folder / "manifest.json").read_text())["source"]["coreml"]["vision"]["mode"]
        weights.update(package_weights(packages["vision"], weight_names(skeleton, spec, mode), lookup)[0])
    embed = "model.language_model.embed_tokens.weight"
    if embed not in weights and "lm_head.weight" in weights:
        weights[embed] = weights["lm_head.weight"]  # tied: the names resolve to the head's
    missing = sorted(set(names.values()) - set(weights))
    if missing:
        how = "" if source is not None else " by name (the source checkpoint locates folded constants)"
        raise ConvertError(f"{packages['decoder'].name}: holds no weight for {missing[0]}{how} "
                           f"({len(missing)} parameters of the decoder missing)")
    # float16 like every weight of a package (a folded parameter's inverse, c - 1 or log(-c), gives back the
    # package's constant when the model applies its transform again: exactly for 1 + w, within a rounding for exp)
    return cfg, spec, {k: torch.from_numpy(v.astype(np.float16)) for k, v in weights.items()}


def untie_if_apart(model, sd: dict) -> None:
    """A tied lm_head whose package weights differ from the embedding's (quantized apart) gets its own."""
    import torch

    head = model.lm_head
    if "lm_head.weight" in sd and head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr() and \
            not torch.equal(sd["lm_head.weight"], sd["model.language_model.embed_tokens.weight"]):
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)


def package_model(folder: Path, packages: dict, source: str | Path | None):
    """transformers' model (float16) from the folder's config.json carrying only the packages' weights."""
    import torch
    from transformers import MiniCPMV4_6ForConditionalGeneration

    from runtimes.reference import hf_quiet

    cfg, spec, sd = package_state(folder, packages, source)
    with hf_quiet(True):  # parameters no package holds (a 4x export's unused compressor) were checked above
        model = MiniCPMV4_6ForConditionalGeneration.from_pretrained(None, config=cfg, state_dict=dict(sd),
                                                                    dtype=torch.float16).eval()
    untie_if_apart(model, sd)
    if "lm_head.weight" in sd:
        with torch.no_grad():
            model.lm_head.weight.copy_(sd["lm_head.weight"])
    return model, spec
