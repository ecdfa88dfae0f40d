"""The `mixstack` command through typer's CliRunner: outputs, error texts and exit codes."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from typer.testing import CliRunner

import mixstack
from mixstack.cli.main import app, human, write_atomic

runner = CliRunner()

TINY = """\
model:
  vocab_size: 16
  max_seq_len: 32
  d_model: 16
  layers:
    pattern: "(*-)2"
    symbols:
      "*": {type: attention, n_heads: 2}
      "-": {type: mlp, hidden: 32}
"""


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def test_validate_ok_prints_hash_and_pattern(tiny) -> None:
    result = runner.invoke(app, ["validate", str(tiny), "model.d_model=32"])
    assert result.exit_code == 0, result.output
    expected = mixstack.load_spec(str(tiny), overrides=["model.d_model=32"])
    lines = result.stdout.splitlines()
    assert lines[0] == "ok"
    assert lines[1] == f"spec hash: {expected.spec_hash}"
    assert "*-*-" in lines[2] and "(4 layers)" in lines[2]


def test_validate_error_is_one_clean_message_with_exit_1(tiny) -> None:
    tiny.write_text(TINY.replace("d_model: 16", "d_modle: 16"))
    result = runner.invoke(app, ["validate", str(tiny)])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith("error: invalid spec: 1 problem")
    assert f"{tiny}:4" in result.stderr  # file and line of the typo
    assert "d_modle" in result.stderr and "did you mean 'd_model'?" in result.stderr
    assert "Traceback" not in result.output


def test_debug_reraises_with_the_traceback(tiny) -> None:
    tiny.write_text(TINY.replace("d_model: 16", "d_modle: 16"))
    result = runner.invoke(app, ["--debug", "validate", str(tiny)])
    assert result.exit_code == 1
    assert isinstance(result.exception, mixstack.SpecError)


def test_bad_override_and_unknown_preset(tiny) -> None:
    result = runner.invoke(app, ["validate", str(tiny), "model.d_modl=3"])
    assert result.exit_code == 1
    assert "<override model.d_modl=3>" in result.stderr
    result = runner.invoke(app, ["info", "zoo:no-such-preset"])
    assert result.exit_code == 1 and "no-such-preset" in result.stderr


def test_usage_errors_exit_2() -> None:
    assert runner.invoke(app, ["validate"]).exit_code == 2
    assert runner.invoke(app, ["info", "zoo:hybrid-8b-shape", "--seq-len", "0"]).exit_code == 2


def test_info_hybrid_8b_shows_realized_and_requested_ratios() -> None:
    result = runner.invoke(app, ["info", "zoo:hybrid-8b-shape", "--seq-len", "4096"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if "/56" in line}
    assert set(rows) == {"M", "*", "-"}
    assert "24/56" in rows["M"] and "fill" in rows["M"]
    assert "4/56" in rows["*"] and "0.08" in rows["*"]
    assert "28/56" in rows["-"] and "0.5" in rows["-"]
    assert "M-M-M--M-M*-M-M-M-M--M*-M-M-M-M-M*--M-M-M-M-M*-M--M-M-M-" in out
    assert "8,654,517,248" in out  # parameters (see tests/archs/test_report.py)
    report = mixstack.build("zoo:hybrid-8b-shape", device="meta").report(4096)
    assert f"{report.total_state_bytes:,} B" in out
    assert f"{report.total_flops_per_token:,.0f}" in out
    assert "ngroups=8 chunk_size=128" in out  # key settings of the M layers


def test_info_layer_table_of_a_small_spec(tiny) -> None:
    result = runner.invoke(app, ["info", str(tiny), "--dtype", "fp32", "--seq-len", "8"])
    assert result.exit_code == 0, result.output
    report = mixstack.build(str(tiny), device="meta").report(8)
    assert "decode state (8 tokens, float32)" in result.stdout
    assert f"{report.total_params:,}" in result.stdout
    assert runner.invoke(app, ["info", str(tiny), "--dtype", "int4"]).exit_code == 1


def test_schema_is_json_with_the_registered_layers(tmp_path) -> None:
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert "attention" in json.dumps(schema)
    out = tmp_path / "schema.json"
    result = runner.invoke(app, ["schema", "--out", str(out)])
    assert result.exit_code == 0 and json.loads(out.read_text()) == schema
    assert [p.name for p in tmp_path.iterdir()] == ["schema.json"]  # no temp file left


def test_schema_out_to_a_missing_folder_is_a_clean_error(tmp_path) -> None:
    result = runner.invoke(app, ["schema", "--out", str(tmp_path / "nope" / "s.json")])
    assert result.exit_code == 1 and "FileNotFoundError" in result.stderr


def test_plugin_registers_a_layer_type(tmp_path, monkeypatch, scoped_registry) -> None:
    plugin = tmp_path / "scale_plugin.py"
    plugin.write_text(
        "from typing import Literal\n"
        "from mixstack.dsl.base import LayerConfig\n"
        "from mixstack.dsl.registry import register\n"
        "from mixstack.mixers.base import Mixer\n"
        "class ScaleConfig(LayerConfig):\n"
        "    kind = 'channel'\n"
        "    type: Literal['test_scale'] = 'test_scale'\n"
        "    factor: float = 2.0\n"
        "@register(ScaleConfig)\n"
        "class Scale(Mixer):\n"
        "    def forward(self, x, *, input_ids=None, seq_idx=None, state=None):\n"
        "        return self.cfg.factor * x\n"
    )
    spec = tmp_path / "spec.yaml"
    spec.write_text(TINY.replace('"-": {type: mlp, hidden: 32}', '"-": {type: test_scale}'))
    assert runner.invoke(app, ["validate", str(spec)]).exit_code == 1
    result = runner.invoke(app, ["--plugin", str(plugin), "validate", str(spec)])
    assert result.exit_code == 0, result.output
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    result = runner.invoke(app, ["--plugin", str(broken), "validate", str(spec)])
    assert result.exit_code == 1
    assert "broken.py' failed to import: RuntimeError: boom" in result.stderr
    monkeypatch.delitem(sys.modules, "mixstack_plugin_scale_plugin")


def test_helpers(tmp_path) -> None:
    assert human(7_029_886_976) == "7.03B" and human(512) == "512"
    assert human(3 * 2**30 / 2, "B") == "1.50 GiB" and human(10, "B") == "10 B"
    target = tmp_path / "a.txt"
    write_atomic(target, "one")
    write_atomic(target, "two")
    assert target.read_text() == "two" and len(list(tmp_path.iterdir())) == 1


def test_a_layer_refusal_is_one_message_with_exit_1(tmp_path, monkeypatch) -> None:
    """A CapabilityError raised by a layer while a command runs (here: the report asks a
    bidirectional Hydra layer for a decode state) prints one line and exits 1."""
    from mixstack.archs.models import MixStackModel

    path = tmp_path / "encoder.yaml"
    path.write_text(
        TINY.replace("model:\n", "model:\n  arch: encoder\n")
        .replace('pattern: "(*-)2"', 'pattern: "H-"')
        .replace('"*": {type: attention, n_heads: 2}', '"H": {type: hydra, d_state: 4, headdim: 8}')
    )

    def decode_state_report(self: MixStackModel, *args: object, **kwargs: object) -> None:
        self.layers[0].mixer.init_state(1, 8, device="meta", dtype=torch.float32)

    monkeypatch.setattr(MixStackModel, "report", decode_state_report)
    result = runner.invoke(app, ["info", str(path)])
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: hydra layer (Hydra) does not support decoding")
    assert "capability `decode`" in lines[0] and "Traceback" not in result.output
