"""The registration path: built-ins by scanning, entry points, plugin files (also in child
processes), origins, the scoped registry, metric directions, ``registry list``, schema."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import mixstack
from mixstack.cli.main import app
from mixstack.dsl.errors import MixstackError
from mixstack.dsl.registry import Origin, RegistryError

ROOT = Path(mixstack.__file__).parent
runner = CliRunner()

PLUGIN = """
from typing import Literal
import torch
from mixstack.dsl.base import LayerConfig
from mixstack.dsl.registry import MetricDef, register, register_task
from mixstack.mixers.base import Mixer
from mixstack.tasks.base import GeneratedTask, GeneratedTaskConfig

class ScaleConfig(LayerConfig):
    kind = "channel"
    type: Literal["test_scale"] = "test_scale"
    factor: float = 2.0

@register(ScaleConfig)
class Scale(Mixer):
    def forward(self, x, *, input_ids=None, seq_idx=None, state=None):
        return self.cfg.factor * x

class ZerosTask(GeneratedTaskConfig):
    type: Literal["test_zeros"] = "test_zeros"

def _mean(n_out):
    from torchmetrics import MeanMetric
    return MeanMetric()

@register_task(ZerosTask, metrics=[MetricDef("zeros_err", False, "how wrong", _mean)])
class Zeros(GeneratedTask):
    def sample(self, split, step, index):
        return {"input_ids": torch.zeros(self.cfg.seq_len, dtype=torch.long),
                "labels": torch.zeros(self.cfg.seq_len, dtype=torch.long)}
"""


@pytest.fixture
def plugin_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_plugin.py"
    path.write_text(PLUGIN)
    return path


def _child(code: str, env: dict[str, str] | None = None) -> str:
    """Run ``code`` in a fresh Python (this process's environment plus ``env``)."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_builtins_are_every_module_of_mixers_and_tasks(scoped_registry: Any) -> None:
    registry = scoped_registry
    for package in ("mixers", "tasks"):
        files = {p.stem for p in (ROOT / package).glob("*.py") if p.stem != "__init__"}
        assert {f"mixstack.{package}.{f}" for f in files} <= set(registry.builtin_modules())
    assert {"mqar", "selective_copy", "induction", "majority", "text"} <= set(
        registry.tasks.names()
    )
    assert all(e.origin == Origin("builtin") for e in registry.entries())
    assert registry.get("mamba2").module_cls.__module__ == "mixstack.mixers.mamba2"
    assert all(e.origin == Origin("builtin") for e in registry.metrics.all())
    # A built-in module imported before the registry loads is still built-in.
    code = """
        import mixstack.mixers.hyena
        from mixstack.dsl import registry
        print(registry.get("hyena").origin)
    """
    assert _child(code) == "built-in"


def test_scoped_registry_undoes_registrations(plugin_file: Path) -> None:
    from mixstack.dsl import registry

    with registry.scoped():
        registry.load_plugin_file(plugin_file)
        assert registry.has("test_scale") and "test_zeros" in registry.tasks.names()
        assert "zeros_err" in registry.metrics.names()
        assert str(plugin_file) in os.environ[registry.PLUGINS_ENV]
    assert not registry.has("test_scale") and "test_zeros" not in registry.tasks.names()
    assert "zeros_err" not in registry.metrics.names()
    assert str(plugin_file) not in os.environ.get(registry.PLUGINS_ENV, "")


def test_a_second_registration_of_a_name_is_refused(scoped_registry: Any) -> None:
    registry = scoped_registry
    mlp = registry.get("mlp")
    with pytest.raises(RegistryError, match="layer type 'mlp' is already registered by mixstack"):
        registry.register(mlp.config_cls)(type("OtherMlp", (), {}))
    with pytest.raises(RegistryError, match=r"unknown task type 'mqr'.*did you mean 'mqar'"):
        registry.tasks.get("mqr")
    accuracy = registry.metrics.get("accuracy").metric
    with pytest.raises(RegistryError, match="metric 'accuracy' is already registered by every"):
        registry.register_metric(accuracy, task="induction")  # one name, one definition


def test_metric_directions_come_from_the_registry(scoped_registry: Any) -> None:
    registry = scoped_registry
    assert registry.metric_direction("val/accuracy") == "max"
    assert registry.metric_direction("loss") == "min"
    assert registry.metric_direction("val/ppl") == "min"
    assert registry.metric_direction("val/exact_match") == "max"  # MQAR's own metric
    with pytest.raises(MixstackError, match="did you mean 'accuracy'"):
        registry.metric_direction("val/acuracy")
    names = [m.name for m in registry.task_metrics("majority", "classifier")]
    assert names == ["accuracy", "loss"]  # no ppl for a classifier


def test_plugin_files_reach_child_processes_with_their_origin(
    plugin_file: Path, scoped_registry: Any
) -> None:
    registry = scoped_registry
    registry.load_plugin_file(plugin_file)
    digest = hashlib.sha256(plugin_file.read_bytes()).hexdigest()
    expected = {"kind": "plugin", "path": str(plugin_file.resolve()), "sha256": digest}
    assert registry.plugin_origins() == [expected]
    # A child started now (as a grid starts its points) loads the same file on first use.
    code = """
        import json
        from mixstack.dsl import registry
        print(json.dumps([registry.get("test_scale").origin.to_dict(),
                          registry.tasks.get("test_zeros").origin.to_dict()]))
    """
    assert json.loads(_child(code)) == [expected, expected]
    missing = {registry.PLUGINS_ENV: "/nowhere/gone.py"}
    result = subprocess.run(
        [sys.executable, "-c", "from mixstack.dsl import registry; registry.names()"],
        capture_output=True,
        text=True,
        env={**os.environ, **missing},
        check=False,
    )
    assert "plugin file '/nowhere/gone.py' (listed in $MIXSTACK_PLUGINS" in result.stderr


def test_entry_points_register_with_distribution_and_version(tmp_path: Path) -> None:
    (tmp_path / "fake_ext.py").write_text(PLUGIN)
    info = tmp_path / "fake_mixstack_ext-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: fake-mixstack-ext\nVersion: 1.2.3\n"
    )
    (info / "entry_points.txt").write_text("[mixstack.tasks]\nzeros = fake_ext\n")
    code = """
        import json
        from mixstack.dsl import registry
        print(json.dumps([registry.tasks.get("test_zeros").origin.to_dict(),
                          str(registry.get("test_scale").origin), registry.plugin_origins()]))
    """
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    origin, text, plugins = json.loads(_child(code, {"PYTHONPATH": path}))
    expected = {"kind": "entry_point", "distribution": "fake-mixstack-ext", "version": "1.2.3"}
    assert origin == expected and plugins == [expected]
    assert text == "fake-mixstack-ext 1.2.3"


def test_registry_list_shows_every_kind_with_its_origin(
    plugin_file: Path, scoped_registry: Any
) -> None:
    result = runner.invoke(app, ["--plugin", str(plugin_file), "registry", "list"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    for title in ("mixers and layers", "tasks", "metrics (val/<name>)", "kernel providers"):
        assert title in out
    digest = hashlib.sha256(plugin_file.read_bytes()).hexdigest()[:12]
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if "│" in line}
    assert "built-in" in rows["mamba2"] and "built-in" in rows["mqar"]
    assert "…" not in out  # origins wrap in their cells, never elided
    flat = out.replace("│", "").replace(" ", "").replace("\n", "")  # long paths wrap
    assert "mixstack_plugin_my_plugin.Scale" in rows["test_scale"] and digest in flat
    assert "lower" in rows["zeros_err"] and "test_zeros" in rows["zeros_err"]
    assert "higher" in rows["exact_match"] and "mqar" in rows["exact_match"]
    assert "reference" in rows and "torch" in rows


def test_schema_types_the_train_section(plugin_file: Path, scoped_registry: Any) -> None:
    scoped_registry.load_plugin_file(plugin_file)
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0, result.output
    schema = json.loads(result.stdout)
    train = schema["$defs"]["TrainFile"]
    assert schema["properties"]["train"]["anyOf"][0] == {"$ref": "#/$defs/TrainFile"}
    mapping = train["properties"]["task"]["discriminator"]["mapping"]
    assert sorted(mapping) == scoped_registry.tasks.names()  # plugin task included
    assert "test_zeros" in mapping and train["required"] == ["task"]
    mqar = schema["$defs"]["MQARTask"]["properties"]
    assert mqar["n_pairs"]["minimum"] == 1 and "power_a" in mqar
    optimizer = train["properties"]["optimizer"]
    assert {"#/$defs/AdamWConfig", "#/$defs/SGDConfig"} <= {
        ref["$ref"] for ref in optimizer["oneOf"]
    }
    assert set(schema["$defs"]["ScheduleConfig"]["properties"]) >= {"type", "warmup_steps"}
