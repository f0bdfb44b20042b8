import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from convert import Checkpoint, ConvertError


def test_reads_bf16_lazily_and_exactly(tiny_dir, tiny_ckpt):
    ref = load_file(str(tiny_dir / "model.safetensors"))
    assert set(ref) == set(tiny_ckpt.names())
    for name, t in ref.items():
        assert t.dtype == torch.bfloat16
        np.testing.assert_array_equal(tiny_ckpt.tensor(name), t.float().numpy())
    # raw() is a view on the file's mmap, not a copy
    assert not tiny_ckpt.raw(name).flags.owndata and not tiny_ckpt.raw(name).flags.writeable


def test_sharded_checkpoint(tmp_path, tiny_dir, tiny_ckpt):
    from transformers import MiniCPMV4_6ForConditionalGeneration

    m = MiniCPMV4_6ForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.float32)
    m.save_pretrained(tmp_path / "sharded", max_shard_size="1MB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    c = Checkpoint(tmp_path / "sharded")
    assert len({c.info(n).file for n in c.names()}) > 1
    for n in tiny_ckpt.names():
        np.testing.assert_array_equal(c.tensor(n), tiny_ckpt.tensor(n))


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(ConvertError, match="no such folder"):
        Checkpoint(tmp_path / "nope")
    with pytest.raises(ConvertError, match="no config.json"):
        Checkpoint(tmp_path)


def test_hub_id_not_in_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ConvertError, match="local Hugging Face cache.*never downloads"):
        Checkpoint("openbmb/not-a-cached-model")


def test_other_model_type(tmp_path, tiny_dir):
    d = shutil.copytree(tiny_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "qwen2_vl"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConvertError, match="model_type 'qwen2_vl'"):
        Checkpoint(d)


def test_truncated_and_corrupt_safetensors(tmp_path, tiny_dir):
    d = shutil.copytree(tiny_dir, tmp_path / "trunc")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ConvertError, match="truncated or corrupt"):
        Checkpoint(d)
    f.write_bytes(b"\xff" * 8 + data[8:])
    with pytest.raises(ConvertError, match="corrupt safetensors header"):
        Checkpoint(d)
    f.write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(ConvertError, match="corrupt safetensors header"):
        Checkpoint(d)
    f.write_bytes(b"")
    with pytest.raises(ConvertError, match="not a safetensors file"):
        Checkpoint(d)


def test_no_weights(tmp_path, tiny_dir):
    d = tmp_path / "empty"
    d.mkdir()
    shutil.copy(tiny_dir / "config.json", d)
    with pytest.raises(ConvertError, match="no \\*.safetensors"):
        Checkpoint(d)


def test_hub_id_from_local_cache(tmp_path, monkeypatch, tiny_dir):
    """A hub id already in the local HF cache (hub layout: refs/main -> snapshots/<commit>) opens offline."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--openbmb--MiniCPM-V-4_6"
    shutil.copytree(tiny_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    c = Checkpoint("openbmb/MiniCPM-V-4_6")
    assert c.path == repo / "snapshots" / commit and c.spec == Checkpoint(tiny_dir).spec
