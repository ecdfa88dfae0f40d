"""A model directory saved by schema-v1 code keeps loading with the same logits.

``tests/fixtures/modeldir_v1`` was written by ``tests/fixtures/make_modeldir_v1.py`` at
commit 67cfe91 (schema_version 1) and is never regenerated: it pins what old exports
must keep doing. ``expected.safetensors`` holds the input ids and the fp32 logits that
code computed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

import mixstack

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "modeldir_v1"


def test_v1_model_directory_loads_with_the_same_logits() -> None:
    assert json.loads((FIXTURE / "config.json").read_text())["schema_version"] == 1
    expected = load_file(FIXTURE / "expected.safetensors")
    model = mixstack.from_pretrained(FIXTURE)
    with torch.no_grad():
        logits = model(expected["input_ids"]).float()
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-6, atol=1e-6)
