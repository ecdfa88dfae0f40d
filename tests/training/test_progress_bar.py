"""The progress bar speaks in optimizer steps (``step 150/600``), tokens per second and
the time left, not in Lightning's epochs (``Epoch 0/0``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from mixstack.training import callbacks
from mixstack.training.callbacks import ProgressBar, throughput


def test_description_counts_optimizer_steps() -> None:
    bar = ProgressBar()
    bar._trainer = SimpleNamespace(
        global_step=150, lightning_module=SimpleNamespace(total_steps=600)
    )
    assert bar._get_train_description(0).strip() == "step 150/600"
    assert "Epoch" not in bar._get_train_description(0)


def test_throughput_and_eta_from_wall_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: 110.0)
    # 10 s for 50 steps of 2,048 tokens; 450 steps left at 0.2 s per step: 90 s
    out = throughput(100.0, 50 * 2048, 50, 600, 150)
    assert out == {"tok/s": "10,240", "eta": "00:01:30"}
    assert throughput(100.0, 0, 0, 600, 100) == {}  # nothing measured yet
    assert "eta" not in throughput(100.0, 2048, 1, None, 1)
