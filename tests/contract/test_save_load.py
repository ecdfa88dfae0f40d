"""Contract: spec -> build -> save -> load gives the same model, for every example of every
registered layer, saved as shards (shared / tied tensors stored once; the single-file
layout is the same writer with one shard, tested in tests/hub)."""

from __future__ import annotations

from pathlib import Path

import torch

import mixstack
from mixstack.hub import integrity
from mixstack.hub.modeldir import save_model_dir


def _model_spec(case) -> dict:
    example = case.example
    layer = example.config.model_dump(mode="json")
    spec = {
        "arch": example.arch,
        "vocab_size": 16,
        "max_seq_len": example.max_seq_len,
        "d_model": example.d_model,
        "layers": {"pattern": "X-", "symbols": {"X": layer, "-": {"type": "mlp"}}},
    }
    if example.arch == "classifier":
        spec["classifier"] = {"n_classes": 3}
    return {"model": spec}


def test_save_then_load_is_the_same_model(case, tmp_path: Path) -> None:
    model = mixstack.build(_model_spec(case), seed=1).eval()
    ids = torch.randint(0, 16, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids)
    folder = save_model_dir(model, tmp_path / "model", max_shard_size=1500)
    assert len(integrity.find_weights(folder, ()).headers) > 1
    loaded = mixstack.from_pretrained(folder)
    assert loaded.spec == model.spec
    with torch.no_grad():
        assert torch.equal(loaded(ids), want), case.id
    saved, _ = integrity.expected_tensors(model)
    state = loaded.state_dict()
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name
