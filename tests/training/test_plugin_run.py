"""A run with a layer from a ``--plugin`` file records where the layer came from."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import mixstack

HALF_MLP_PLUGIN = """
from typing import Literal
from mixstack.dsl.registry import register
from mixstack.mixers.mlp import Mlp, MlpConfig

class HalfMlpConfig(MlpConfig):
    type: Literal["test_half_mlp"] = "test_half_mlp"

@register(HalfMlpConfig)
class HalfMlp(Mlp):
    def forward(self, x, **kwargs):
        return 0.5 * super().forward(x, **kwargs)
"""


def test_run_json_records_plugin_files_with_sha256(
    tmp_path: Path, scoped_registry: Any, tiny_data: dict[str, Any], fit_quietly: Any
) -> None:
    plugin = tmp_path / "half_plugin.py"
    plugin.write_text(HALF_MLP_PLUGIN)
    scoped_registry.load_plugin_file(plugin)
    tiny_data["model"]["layers"]["symbols"]["-"] = {"type": "test_half_mlp", "hidden": 32}
    tiny_data["train"].update(max_steps=2, val_every=2)
    result = fit_quietly(mixstack.load_spec(tiny_data), tmp_path / "run")
    assert result.status == "finished"
    plugins = json.loads((tmp_path / "run" / "run.json").read_text())["plugins"]
    digest = hashlib.sha256(plugin.read_bytes()).hexdigest()
    assert plugins == [{"kind": "plugin", "path": str(plugin.resolve()), "sha256": digest}]
