"""A model directory saved by schema-v1 code keeps loading with the same logits.

``tests/fixtures/modeldir_v1`` was written by ``tests/fixtures/make_modeldir_v1.py`` at
commit 67cfe91 (schema_version 1) and is never regenerated: it pins what old exports
must keep doing. ``expected.safetensors`` holds the input ids and the fp32 logits that
code computed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import mixstack
from mixstack.dsl.errors import CheckpointError
from mixstack.dsl.migrations import SCHEMA_VERSION
from mixstack.hub.modeldir import HASH_KEY

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "modeldir_v1"


def test_v1_model_directory_loads_with_the_same_logits() -> None:
    assert json.loads((FIXTURE / "config.json").read_text())["schema_version"] == 1
    expected = load_file(FIXTURE / "expected.safetensors")
    model = mixstack.from_pretrained(FIXTURE)
    with torch.no_grad():
        logits = model(expected["input_ids"]).float()
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-6, atol=1e-6)


def _v1_hash_by_hand(model: dict) -> str:
    """The v1 rule, written out: sha256 of the sorted compact JSON without the request."""
    data = json.loads(json.dumps(model))
    data["layers"].pop("requested", None)
    text = json.dumps({"schema_version": 1, "model": data}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _copy_with(tmp_path: Path, edit_model: Callable[[dict], None], rehash: bool) -> Path:
    """The fixture with ``edit_model`` applied to both spec files (and, if ``rehash``, the
    v1 hash recomputed everywhere, as v1 code would have written it)."""
    folder = Path(shutil.copytree(FIXTURE, tmp_path / "v1"))
    config = json.loads((folder / "config.json").read_text())
    spec_yaml = yaml.safe_load((folder / "spec.yaml").read_text())
    edit_model(config["model"])
    edit_model(spec_yaml["model"])
    if rehash:
        config["spec_hash"] = _v1_hash_by_hand(config["model"])
        weights = load_file(folder / "model.safetensors")
        save_file(weights, folder / "model.safetensors", {HASH_KEY: config["spec_hash"]})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec_yaml, sort_keys=False))
    return folder


def test_v1_hash_is_checked_with_the_v1_rule_before_migrating() -> None:
    config = json.loads((FIXTURE / "config.json").read_text())
    assert _v1_hash_by_hand(config["model"]) == config["spec_hash"]


def test_an_edited_v1_directory_is_refused(tmp_path: Path) -> None:
    folder = _copy_with(tmp_path, lambda m: m.update(dropout=0.5), rehash=False)
    with pytest.raises(CheckpointError, match="does not match its model section"):
        mixstack.from_pretrained(folder)


def test_v1_checkpointing_true_loads_the_same_model(tmp_path: Path) -> None:
    folder = _copy_with(tmp_path, lambda m: m.update(activation_checkpointing=True), rehash=True)
    expected = load_file(FIXTURE / "expected.safetensors")
    model = mixstack.from_pretrained(folder)
    with torch.no_grad():
        logits = model(expected["input_ids"]).float()
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-6, atol=1e-6)
    assert model.spec == mixstack.from_pretrained(FIXTURE).spec


def test_a_newer_schema_version_is_refused_naming_both(tmp_path: Path) -> None:
    folder = Path(shutil.copytree(FIXTURE, tmp_path / "v9"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "schema_version": 9}))
    with pytest.raises(CheckpointError) as info:
        mixstack.from_pretrained(folder)
    assert f"schema_version 9 is newer than this mixstack reads (1..{SCHEMA_VERSION})" in str(
        info.value
    )
