"""`mixstack train` / `mixstack eval` through typer, and two CPU processes under DDP."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mixstack.cli.main import app
from tests.support.ddp import assert_same_training, train_two_processes

runner = CliRunner()


@pytest.fixture
def spec_file(tmp_path: Path, tiny_data: dict) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_data))
    return path


def _val(run_dir: Path, name: str) -> float:
    with (run_dir / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r[name]]
    return float(rows[-1][name])


def test_train_stop_resume_and_eval(spec_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", str(spec_file), "run.stop_after=3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "mixstack train: stopped" in result.stdout
    assert f"mixstack train {out} --resume" in result.stdout.replace("\n", "")
    checkpoint = out / "checkpoints" / "last.ckpt"
    intact = checkpoint.read_bytes()
    checkpoint.write_bytes(intact[:500])
    result = runner.invoke(app, ["train", str(out), "--resume"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"cannot resume from {checkpoint}" in result.stderr.replace("\n", "")
    checkpoint.write_bytes(intact)
    result = runner.invoke(app, ["train", str(out), "--resume"])  # the run directory as SPEC
    assert result.exit_code == 0, result.output
    assert "mixstack train: finished" in result.stdout and "6 / 6" in result.stdout
    accuracy = _val(out, "val/accuracy")
    assert f"{accuracy:.4f}" in result.stdout and str(out / "model") in result.stdout
    result = runner.invoke(app, ["train", str(out), "--resume"])  # finished: nothing to do
    assert result.exit_code == 1 and "has finished (step 6)" in result.stderr
    result = runner.invoke(app, ["eval", str(out / "model")])
    assert result.exit_code == 0, result.output
    assert f"{_val(out, 'val/loss'):.4f}" in result.stdout
    assert f"{accuracy:.4f}" in result.stdout and "task: mqar" in result.stdout


def test_train_errors_are_one_clean_message(
    spec_file: Path, tmp_path: Path, tiny_data: dict
) -> None:
    bare = tmp_path / "bare.yaml"
    bare.write_text(yaml.safe_dump({"model": tiny_data["model"]}))
    result = runner.invoke(app, ["train", str(bare), "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and "has no train: section" in result.stderr
    example = result.stderr.split("e.g. ", 1)[1].split(", or give", 1)[0]
    assert yaml.safe_load(" ".join(example.split())) == {
        "train": {"task": {"type": "mqar"}, "max_steps": 1000}
    }  # the suggested section is valid YAML
    result = runner.invoke(app, ["train", str(spec_file), "train.optimizer.type=adamx"])
    assert result.exit_code == 1
    assert "unknown optimizer type 'adamx'" in result.stderr and "did you mean" in result.stderr
    assert "Traceback" not in result.output
    result = runner.invoke(
        app,
        [
            "train", str(spec_file), "run.trainer.accelerator=cpu", "run.trainer.strategy=fsdp",
            "--out", str(tmp_path / "fsdp"),
        ],
    )  # fmt: skip
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "Lightning cannot set up run.trainer {accelerator: cpu" in result.stderr
    assert "requires a GPU accelerator" in result.stderr and not (tmp_path / "fsdp").exists()
    model_only = tmp_path / "loose"
    model_only.mkdir()
    result = runner.invoke(app, ["eval", str(model_only)])
    assert result.exit_code == 1 and "no config.json" in result.stderr


@pytest.mark.slow(budget_s=30)
def test_two_processes_match_one_on_the_same_global_batch(
    spec_file: Path, tmp_path: Path, tiny_spec, fit_quietly
) -> None:
    """DDP on two CPU processes (a `mixstack train` subprocess: Lightning's ddp re-runs
    the command line), 2 micro-batches each, against one process with 4 micro-batches:
    the same global batches and dropout masks, so the global-batch losses of steps 0 and
    1 and the weights after the two (gradient-averaged) updates agree."""
    single = fit_quietly(
        tiny_spec("train.max_steps=2", "train.accumulate_grad_batches=4"), tmp_path / "single"
    )
    done = train_two_processes(spec_file, tmp_path / "ddp", "train.max_steps=2")
    assert done.stdout.count("mixstack train: finished") == 1  # one summary, from rank 0
    assert_same_training(single.run_dir, tmp_path / "ddp", steps=2)
