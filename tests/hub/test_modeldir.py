"""Model directories: export, strict loading, clear errors that leave the files alone."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import mixstack
from mixstack.dsl.errors import CheckpointError
from mixstack.dsl.migrations import SCHEMA_VERSION
from mixstack.hub.modeldir import save_model_dir

SPEC = yaml.safe_load("""
model:
  vocab_size: 16
  max_seq_len: 16
  d_model: 16
  layers:
    pattern: "*-"
    symbols: {"*": {type: attention, n_heads: 2}, "-": {type: mlp, hidden: 32}}
""")


@pytest.fixture
def exported(tmp_path: Path) -> tuple[Path, mixstack.archs.models.MixStackModel]:
    model = mixstack.build(SPEC, seed=5)
    return save_model_dir(model, tmp_path / "model", metrics={"val/accuracy": 0.5}), model


def _fingerprint(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _refused(folder: Path, *fragments: str) -> None:
    before = _fingerprint(folder)
    with pytest.raises(CheckpointError) as info:
        mixstack.from_pretrained(folder)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
    assert _fingerprint(folder) == before  # loading never writes


def test_round_trip_gives_the_same_model(exported) -> None:
    folder, model = exported
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "spec.yaml",
    ]
    loaded = mixstack.from_pretrained(folder)
    assert loaded.spec == model.spec
    ids = torch.randint(0, 20, (2, 9))
    assert torch.equal(loaded(ids), model.eval()(ids))
    assert loaded.lm_head.weight is loaded.embedding.weight  # still tied
    config = json.loads((folder / "config.json").read_text())
    assert (
        config["spec_hash"] == model.spec.spec_hash
        and config["schema_version"] == SCHEMA_VERSION == 3
    )
    assert config["model"] == model.spec.canonical() and "mixstack_version" in config
    assert mixstack.load_spec(str(folder / "spec.yaml")).model == model.spec
    card = (folder / "README.md").read_text()
    assert model.spec.spec_hash in card and "`*-`" in card and "val/accuracy | 0.5" in card
    assert "lm_head.weight" not in load_file(folder / "model.safetensors")  # tied: stored once


def test_export_replaces_a_model_directory_but_nothing_else(exported, tmp_path: Path) -> None:
    folder, model = exported
    other = mixstack.build(SPEC, seed=6)
    save_model_dir(other, folder)
    assert torch.equal(mixstack.from_pretrained(folder).norm_f.weight, other.norm_f.weight)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(CheckpointError, match="not a model directory; refusing to replace"):
        save_model_dir(model, mine)
    assert (mine / "notes.txt").read_text() == "keep"


def _rewrite_weights(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_renamed_tensor_is_named(exported) -> None:
    folder, _ = exported
    name = "layers.0.mixer.q_proj.weight"
    _rewrite_weights(folder, lambda t: t.__setitem__("layers.0.mixer.query.weight", t.pop(name)))
    _refused(folder, "missing (1): " + name, "unexpected (1): layers.0.mixer.query.weight")


def test_missing_and_misshaped_tensors_are_named(exported) -> None:
    folder, _ = exported

    def edit(t):
        del t["norm_f.weight"]
        t["layers.1.mixer.up_proj.weight"] = torch.zeros(31, 16)

    _rewrite_weights(folder, edit)
    _refused(
        folder,
        "missing (1): norm_f.weight",
        "mis-shaped (1): layers.1.mixer.up_proj.weight (file [31, 16], model [32, 16])",
    )


def test_no_safetensors_is_refused_and_pickles_are_never_read(exported) -> None:
    folder, model = exported
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    _refused(folder, "no model.safetensors", "pytorch_model.bin: pickled weights are never loaded")


def test_config_and_spec_yaml_must_agree(exported) -> None:
    folder, _ = exported
    data = yaml.safe_load((folder / "spec.yaml").read_text())
    data["model"]["layers"]["symbols"]["-"]["hidden"] = 48
    (folder / "spec.yaml").write_text(yaml.safe_dump(data))
    _refused(
        folder,
        "spec.yaml and config.json describe different models",
        "model.layers.symbols.-.hidden",
    )


def test_spec_hash_is_checked(exported) -> None:
    folder, _ = exported
    config = json.loads((folder / "config.json").read_text())
    config["spec_hash"] = "0" * 64
    (folder / "config.json").write_text(json.dumps(config))
    _refused(folder, "spec_hash 0000", "does not match its model section")


def test_weights_of_another_spec_are_refused(exported, tmp_path: Path) -> None:
    folder, _ = exported
    bigger = json.loads(json.dumps(SPEC))
    bigger["model"]["layers"]["symbols"]["-"]["hidden"] = 48
    other = save_model_dir(mixstack.build(bigger, seed=0), tmp_path / "other")
    (folder / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    _refused(folder, "the weights were saved for spec")


def test_not_a_model_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="is not a directory"):
        mixstack.from_pretrained(tmp_path / "absent")
    (tmp_path / "x.txt").write_text("")
    _refused(tmp_path, "no config.json (found: x.txt)")
