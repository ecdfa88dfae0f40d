"""Runs over token shards (`train.task.shards`) prepared from two mixed sources (a text
file by paragraphs and a JSON lines file, weights 0.7 / 0.3, validation carved by
hash): stopped inside an epoch and resumed equals the uninterrupted run, and two DDP
processes equal one process on the same global batch (weights and metric history)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from safetensors.torch import load_file

import mixstack
from mixstack.data.corpus import prepare_corpus
from mixstack.tasks import make_task
from mixstack.tasks.text import bundled_corpus
from tests.support.ddp import assert_same_training, train_two_processes


def _mixed(tmp_path: Path) -> dict[str, Any]:
    """The text task over shards of two sources (written here) and the shards."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(bundled_corpus()[:3000])
    lines = tmp_path / "more.jsonl"
    rows = [{"text": p} for p in bundled_corpus()[3000:6000].decode(errors="ignore").split(". ")]
    lines.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    shards = tmp_path / "shards"
    return {
        "type": "text",
        "seq_len": 16,
        "documents": "paragraph",
        "val_fraction": 0.2,
        "val_size": 4,
        "sources": [{"path": str(corpus), "weight": 0.7}, {"path": str(lines), "weight": 0.3}],
        "shards": str(shards),
    }


def _prepare(spec: Any) -> None:
    task = spec.train.task
    prepare_corpus(task, task.shards, tokenizer="byte", special_ids=spec.model.special_ids)


@pytest.mark.slow(budget_s=60)
def test_shard_run_resumes_inside_an_epoch(tiny_spec, fit_quietly, tmp_path: Path) -> None:
    task = _mixed(tmp_path)
    text = [
        f"train.task={json.dumps(task)}",
        "model.vocab_size=256",
        "model.max_seq_len=16",
        "train.max_steps=null",
        "train.max_epochs=2",
        "train.batch_size=64",
        "train.accumulate_grad_batches=1",
        "train.val_every=4",
    ]
    spec = tiny_spec(*text)
    _prepare(spec)
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


@pytest.mark.slow(budget_s=60)
def test_two_processes_over_mixed_shards_match_one(
    tiny_data: dict, fit_quietly, tmp_path: Path
) -> None:
    """As tests/training/test_cli_train.py's DDP test, over the mixed shards: one process
    with 4 micro-batches against a `mixstack train` subprocess on two CPU processes
    with 2 micro-batches each."""
    data = copy.deepcopy(tiny_data)
    data["model"].update({"vocab_size": 256, "max_seq_len": 16, "special_tokens": ["eos"]})
    data["train"].update({"task": _mixed(tmp_path), "max_steps": 2, "val_every": 2})
    spec_file = tmp_path / "mixed.yaml"
    spec_file.write_text(yaml.safe_dump(data))
    spec = mixstack.load_spec(spec_file)
    _prepare(spec)
    single = fit_quietly(
        mixstack.load_spec(spec_file, ["train.accumulate_grad_batches=4"]), tmp_path / "single"
    )
    train_two_processes(spec_file, tmp_path / "ddp")
    assert_same_training(single.run_dir, tmp_path / "ddp", steps=2)
