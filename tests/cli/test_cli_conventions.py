"""CLI conventions and what `info` shows: --version, ``python -m mixstack``, completion,
``show`` (authored vs resolved), grouped layer rows, the allow_missing warning, and
``info`` on a spec at the size limits without allocating (a subprocess under an
address-space limit)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import mixstack
from mixstack.cli.main import app, grouped_rows, index_ranges

runner = CliRunner()
ROOT = Path(mixstack.__file__).resolve().parent

STACK = """\
model:
  vocab_size: 16
  max_seq_len: 32
  d_model: 16
  layers:
    pattern: "(M-)3*-"
    symbols:
      M: {type: mamba2, headdim: 8, d_state: 4, chunk_size: 8}
      "*": {type: attention, n_heads: 2}
      "-": {type: mlp, hidden: 32}
"""


@pytest.fixture
def stack(tmp_path: Path) -> Path:
    path = tmp_path / "stack.yaml"
    path.write_text(STACK)
    return path


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT.parent), env.get("PYTHONPATH", "")])
    return env


def test_version_flag_and_python_dash_m(tmp_path: Path) -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"mixstack {mixstack.__version__}"
    proc = subprocess.run(
        [sys.executable, "-m", "mixstack", "--version"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_child_env(),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"mixstack {mixstack.__version__}"


def test_shell_completion_is_offered() -> None:
    result = runner.invoke(app, ["--help"])
    assert "--install-completion" in result.output and "--show-completion" in result.output


def test_show_prints_the_authored_spec_and_the_resolved_one(stack: Path) -> None:
    result = runner.invoke(app, ["show", str(stack), "model.d_model=24"])
    assert result.exit_code == 0, result.output
    authored = yaml.safe_load(result.output)
    expected = yaml.safe_load(STACK)
    expected["model"]["d_model"] = 24
    assert authored == expected  # as written plus the override: no defaults filled in
    result = runner.invoke(app, ["show", str(stack), "model.d_model=24", "--resolved"])
    assert result.exit_code == 0, result.output
    resolved = mixstack.load_spec(yaml.safe_load(result.output))
    assert resolved == mixstack.load_spec(str(stack), ["model.d_model=24"])
    assert "special_tokens" in result.output  # defaults are spelled out


def test_show_reports_a_bad_spec_like_validate(stack: Path) -> None:
    result = runner.invoke(app, ["show", str(stack), "model.d_model=.inf"])
    assert result.exit_code == 1
    assert "model.d_model" in result.output and "finite number" in result.output


def test_index_ranges() -> None:
    assert index_ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert index_ranges([3]) == "3"


def test_info_groups_identical_layers_and_all_lists_every_row(stack: Path) -> None:
    spec = mixstack.load_spec(str(stack))
    report = mixstack.build(spec, device="meta").report(32)
    groups = grouped_rows(report)
    assert [(idx, row.symbol) for idx, row in groups] == [
        ([0, 2, 4], "M"),
        ([1, 3, 5, 7], "-"),
        ([6], "*"),
    ]
    for indices, row in groups:  # a group only joins layers equal in every column
        for i in indices:
            other = report.rows[i]
            assert (other.symbol, other.settings, other.params) == (
                row.symbol,
                row.settings,
                row.params,
            )
    grouped = runner.invoke(app, ["info", str(stack)])
    assert grouped.exit_code == 0, grouped.output
    assert "0,2,4" in grouped.output and "3×" in grouped.output and "4×" in grouped.output
    every = runner.invoke(app, ["info", str(stack), "--all"])
    assert every.exit_code == 0
    assert "3×" not in every.output
    table = every.output.split("pattern:")[0]
    assert sum(1 for line in table.splitlines() if " mlp " in line) == 4


def test_info_warns_about_a_type_allowed_to_go_missing(tmp_path: Path) -> None:
    path = tmp_path / "ratios.yaml"
    path.write_text(
        "model:\n  d_model: 16\n  layers:\n    n_layers: 2\n"
        "    ratios: {'*': 0.1}\n    fill: '-'\n    allow_missing: true\n"
        "    symbols: {'*': {type: attention, n_heads: 2}, '-': {type: mlp}}\n"
    )
    result = runner.invoke(app, ["info", str(path)])
    assert result.exit_code == 0, result.output
    assert "warning: ratio 0.1 of '*' realized 0 of 2 layers" in result.output
    refused = runner.invoke(app, ["validate", str(path), "model.layers.allow_missing=false"])
    assert refused.exit_code == 1 and "rounds to 0 of 2 layers" in refused.output


HUGE = """\
model:
  d_model: 65536
  vocab_size: 16000000
  max_seq_len: 16000000
  layers:
    pattern: "(M-*-)16"
    symbols:
      M: {type: mamba2, d_state: 1024}
      "*": {type: attention, n_heads: 512}
      "-": {type: mlp, hidden: 1048576}
"""
ADDRESS_SPACE = 2 * 2**30


def _limit_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS is enforced on Linux only")
def test_info_on_a_spec_at_the_size_limits_allocates_nothing(tmp_path: Path) -> None:
    """8.3 T parameters (33 TB in fp32) reported under a 2 GB address-space limit."""
    path = tmp_path / "huge.yaml"
    path.write_text(HUGE)
    proc = subprocess.run(
        [sys.executable, "-m", "mixstack", "info", str(path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_child_env(),
        preexec_fn=_limit_address_space,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "8,337,153,130,496" in proc.stdout  # parameters, counted on the meta device
    assert "TiB" in proc.stdout
