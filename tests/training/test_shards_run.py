"""A run over token shards (`train.task.shards`) stopped inside an epoch and resumed
equals the uninterrupted run: weights and the metric history."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mixstack.data.shards import prepare_shards
from mixstack.tasks import make_task
from mixstack.tasks.text import bundled_corpus


@pytest.mark.slow(budget_s=60)
def test_shard_run_resumes_inside_an_epoch(tiny_spec, fit_quietly, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(bundled_corpus()[:3000])
    shards = tmp_path / "shards"
    text = [
        f"train.task={{type: text, seq_len: 16, val_fraction: 0.2, val_size: 4, shards: {shards}}}",
        "model.vocab_size=256",
        "model.max_seq_len=16",
        "train.max_steps=null",
        "train.max_epochs=2",
        "train.batch_size=64",
        "train.accumulate_grad_batches=1",
        "train.val_every=4",
    ]
    spec = tiny_spec(*text)
    prepare_shards([corpus], shards, special_ids=spec.model.special_ids, documents="paragraph")
    per_epoch = math.ceil(make_task(spec.train, spec.model).epoch_size / 64)
    assert per_epoch >= 2
    whole = fit_quietly(spec, tmp_path / "whole")
    assert whole.step == 2 * per_epoch
    fit_quietly(tiny_spec(*text, f"run.stop_after={per_epoch + 1}"), tmp_path / "parts")
    fit_quietly(tiny_spec(*text), tmp_path / "parts", resume=True)
    wa = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    wb = load_file(tmp_path / "parts" / "model" / "model.safetensors")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-6
    history = [(tmp_path / run / "metrics.csv").read_text() for run in ("whole", "parts")]
    assert history[0] == history[1]
