"""Two-process DDP through a ``mixstack train`` subprocess (Lightning's ``ddp`` re-executes
``sys.argv``, so it cannot run inside pytest), compared with one uninterrupted process."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file


def train_two_processes(
    spec_file: Path, out: Path, *overrides: str
) -> subprocess.CompletedProcess[str]:
    """``mixstack train SPEC OVERRIDES`` on 2 CPU processes (``ddp``) into ``out``; asserts it
    finished as one segment of world size 2."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    command = [
        sys.executable, "-m", "mixstack.cli.main", "train", str(spec_file), *overrides,
        "run.trainer.accelerator=cpu", "run.trainer.devices=2", "run.trainer.strategy=ddp",
        "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, env=env, cwd=out.parent, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    segments = json.loads((out / "run.json").read_text())["segments"]
    assert [s["world_size"] for s in segments] == [2]
    return done


def assert_same_training(single: Path, ddp: Path, steps: int) -> None:
    """Both run directories logged ``steps`` equal training losses and ended with equal
    weights (within 1e-5)."""

    def losses(run_dir: Path) -> list[float]:
        with (run_dir / "metrics.csv").open() as f:
            return [float(r["train/loss"]) for r in csv.DictReader(f) if r["train/loss"]]

    one, two = losses(single), losses(ddp)
    assert len(one) == len(two) == steps
    assert two == pytest.approx(one, abs=1e-5)
    wa = load_file(single / "model" / "model.safetensors")
    wb = load_file(ddp / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-5
