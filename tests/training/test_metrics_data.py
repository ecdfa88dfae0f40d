"""Validation metrics against explicit formulas; batch keys across processes and resumes."""

from __future__ import annotations

import math

import pytest
import torch

import mixstack
from mixstack.dsl import registry
from mixstack.dsl.errors import MixstackError
from mixstack.tasks.base import IGNORE_INDEX
from mixstack.training.data import (
    Position,
    StepBatchSampler,
    ValBatchSampler,
    micro_batch_size,
)
from mixstack.training.metrics import EvalMetrics


def _batches(sizes: list[int], vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n_scored in sizes:
        logits = torch.randn(2, 6, vocab, generator=g)
        labels = torch.randint(vocab, (2, 6), generator=g)
        flat = labels.view(-1)
        flat[n_scored:] = IGNORE_INDEX  # batches score different numbers of targets
        out.append((logits, labels))
    return out


def test_lm_metrics_are_token_weighted_and_ppl_is_exp_loss() -> None:
    batches = _batches([12, 3, 7], vocab=9)
    metrics = EvalMetrics(registry.task_metrics("text", "causal_lm"), 9)
    for logits, labels in batches:  # the text task's bits_per_byte reads target_bytes
        metrics.update(logits, labels, {"target_bytes": (labels != IGNORE_INDEX).long()})
    got = metrics.compute()
    nll, correct, count = 0.0, 0, 0
    for logits, labels in batches:
        for row, y in zip(logits.reshape(-1, 9).double(), labels.reshape(-1), strict=True):
            if int(y) == IGNORE_INDEX:
                continue
            nll += float(torch.logsumexp(row, 0) - row[int(y)])
            correct += int(row.argmax()) == int(y)
            count += 1
    assert got["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert got["accuracy"] == pytest.approx(correct / count)
    assert got["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(got["loss"]), rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(nll / (math.log(2) * count), rel=1e-5)
    metrics.reset()
    metrics.update(*batches[0], {"target_bytes": (batches[0][1] != IGNORE_INDEX).long()})
    assert metrics.compute()["accuracy"] != pytest.approx(got["accuracy"])


def test_classification_metrics() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [1.0, 0.0, 4.0], [0.0, 2.0, 1.0]])
    labels = torch.tensor([0, 1, 1, 2])
    metrics = EvalMetrics(registry.task_metrics("majority", "classifier"), 3)
    metrics.update(logits, labels)
    got = metrics.compute()
    assert "ppl" not in got
    assert got["accuracy"] == pytest.approx(0.5)
    expected = -torch.log_softmax(logits, -1)[torch.arange(4), labels].mean()
    assert got["loss"] == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize(("world", "accumulate"), [(1, 1), (2, 1), (1, 4), (2, 2), (4, 1)])
def test_processes_and_micro_batches_cover_the_global_batch_once(
    world: int, accumulate: int
) -> None:
    G, S = 16, 5
    micro = G // (world * accumulate)
    seen: dict[int, list[tuple[int, int]]] = {}
    for rank in range(world):
        sampler = StepBatchSampler(
            batch_size=G,
            micro=micro,
            accumulate=accumulate,
            rank=rank,
            world_size=world,
            steps_per_epoch=S,
            where=lambda: Position(epoch=1, step=S),
        )
        batches = list(sampler)
        assert len(batches) == len(sampler) == S * accumulate
        for n, batch in enumerate(batches):
            step = S + n // accumulate
            seen.setdefault(step, []).extend(batch)
            assert all(k[0] == step for k in batch)
    for step in range(S, 2 * S):  # epoch 1 covers steps S..2S-1
        assert sorted(seen[step]) == [(step, i) for i in range(G)]


def test_iteration_starts_at_the_restored_step() -> None:
    sampler = StepBatchSampler(
        batch_size=4,
        micro=2,
        accumulate=2,
        rank=0,
        world_size=1,
        steps_per_epoch=10,
        where=lambda: Position(epoch=0, step=7),
    )
    assert [b[0][0] for b in sampler] == [7, 7, 8, 8, 9, 9]
    assert next(iter(sampler)) == [(7, 0), (7, 1)]


def test_validation_is_split_over_processes_without_overlap() -> None:
    parts = [
        [k for batch in ValBatchSampler(size=11, batch_size=3, rank=r, world_size=3) for k in batch]
        for r in range(3)
    ]
    assert sorted(k for p in parts for k in p) == [(0, i) for i in range(11)]


def test_a_batch_that_does_not_split_is_refused() -> None:
    spec = mixstack.load_spec(
        {
            "model": {
                "vocab_size": 16,
                "max_seq_len": 16,
                "d_model": 8,
                "layers": {"pattern": "-"},
            },
            "train": {
                "task": {"type": "mqar", "seq_len": 16},
                "max_steps": 1,
                "batch_size": 6,
                "accumulate_grad_batches": 2,
            },
        }
    )
    assert micro_batch_size(spec.train, 1) == 3
    with pytest.raises(MixstackError, match=r"batch_size 6 does not split into .* 2 .* 2 process"):
        micro_batch_size(spec.train, 2)
