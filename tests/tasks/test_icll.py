"""The ICLL task: samples against the automaton (checked by walking it with
``Automaton.allows``, not the generator's state list), the finite training pool, unseen
validation automata, and the three metrics against hand-computed values."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import mixstack
from mixstack.dsl import registry
from mixstack.dsl.errors import MixstackError, SpecError
from mixstack.tasks import make_task
from mixstack.tasks.icll import (
    NEXT_PROBS,
    Automaton,
    allowed_accuracy,
    greedy_accuracy,
    total_variation,
)
from mixstack.training.data import collate
from mixstack.training.metrics import EvalMetrics


def spec(**task: Any) -> Any:
    model = {"vocab_size": 32, "max_seq_len": 96, "d_model": 8, "layers": {"pattern": "-"}}
    cfg = {"type": "icll", "seq_len": 64, "val_size": 6, **task}
    return mixstack.load_spec({"model": model, "train": {"task": cfg, "max_steps": 1}})


def task_of(seed: int = 0, **task: Any) -> Any:
    s = spec(**task)
    return make_task(s.train.model_copy(update={"seed": seed}), s.model)


def strings(ids: list[int], delimiter: int) -> list[list[int]]:
    out: list[list[int]] = [[]]
    for t in ids:
        if t == delimiter:
            out.append([])
        else:
            out[-1].append(t)
    return out


def check_against(automaton: Automaton, sample: dict, delimiter: int) -> None:
    """Every string is emitted by the automaton, and next_probs row t is uniform over
    exactly the symbols v with prefix + [v] allowed (zero when the label is the delimiter)."""
    tokens = [*sample["input_ids"].tolist(), int(sample["labels"][-1])]
    assert sample["labels"].tolist() == tokens[1:]
    assert all(automaton.allows(s) for s in strings(tokens, delimiter))
    probs = sample[NEXT_PROBS]
    prefix: list[int] = []
    for t, token in enumerate(tokens[:-1]):
        prefix = [] if token == delimiter else [*prefix, token]
        row = probs[t]
        if tokens[t + 1] == delimiter:
            assert row.abs().sum() == 0, f"position {t}: scored before a delimiter"
            continue
        allowed = [v for v in range(delimiter) if automaton.allows([*prefix, v])]
        assert allowed and torch.nonzero(row).flatten().tolist() == allowed, f"position {t}"
        assert torch.allclose(row[allowed], torch.full((len(allowed),), 1 / len(allowed)))


def test_validation_samples_follow_their_automaton_and_it_is_unseen() -> None:
    task = task_of(n_train_automata=200, max_states=4)
    pool = {task.train_automaton(m) for m in range(200)}
    for i in range(6):
        sample = task.sample("val", 0, i)
        automaton = task.val_automaton(i)
        assert automaton not in pool
        assert 2 <= automaton.n_states <= 4 and len(automaton.alphabet) == automaton.n_states
        check_against(automaton, sample, delimiter=16)


def test_training_samples_come_from_the_finite_pool() -> None:
    task = task_of(n_train_automata=3, n_symbols=12, max_states=6, max_string_len=5)
    pool = [task.train_automaton(m) for m in range(3)]
    used = set()
    for step in range(4):
        for i in range(5):
            sample = task.sample("train", step, i)
            tokens = [*sample["input_ids"].tolist(), int(sample["labels"][-1])]
            owners = [a for a in pool if all(a.allows(s) for s in strings(tokens, 12))]
            assert owners, "a training sample no pool automaton can emit"
            check_against(owners[0], sample, delimiter=12)
            used.add(owners[0])
            assert max(len(s) for s in strings(tokens, 12)) <= 5
    assert len(used) > 1
    # the pool is a pure function of the seed
    assert task_of(n_train_automata=3, n_symbols=12, max_states=6).train_automaton(1) == pool[1]
    assert task_of(7, n_train_automata=3, n_symbols=12, max_states=6).train_automaton(1) != pool[1]


def test_metrics_on_hand_made_logits() -> None:
    """Two scored positions: allowed {0, 1} (p = ½, ½) and {2} (p = 1); a third before a
    delimiter (id 3) is not scored."""
    probs = torch.tensor([[[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0] * 4]])
    labels = torch.tensor([[1, 2, 3]])
    # position 0: delimiter first, then symbol 2 (not allowed); position 1: symbol 2
    logits = torch.log(torch.tensor([[[0.1, 0.1, 0.3, 0.5], [0.1, 0.1, 0.7, 0.1], [0.25] * 4]]))
    acc, n = allowed_accuracy(logits, labels, probs)
    assert n == 2 and acc == pytest.approx(0.5)  # argmax without delimiter: 2 (no), 2 (yes)
    greedy, _ = greedy_accuracy(logits, labels, probs)
    assert greedy == pytest.approx(0.5)  # delimiter (no), 2 (yes)
    tvd, _ = total_variation(logits, labels, probs)
    q0 = torch.tensor([0.2, 0.2, 0.6])  # position 0 without the delimiter, renormalised
    q1 = torch.tensor([1 / 9, 1 / 9, 7 / 9])
    want = (
        0.5
        * (
            (q0 - torch.tensor([0.5, 0.5, 0])).abs().sum()
            + (q1 - torch.tensor([0, 0, 1.0])).abs().sum()
        )
        / 2
    )
    assert tvd == pytest.approx(float(want), rel=1e-6)
    # a wider model output: ids the task never emits count as wrong, never as allowed
    wide = torch.cat([logits, torch.full((1, 3, 2), 5.0)], dim=-1)
    assert allowed_accuracy(wide, labels, probs)[0] == 0


def test_metrics_are_registered_with_directions_and_need_the_batch() -> None:
    entry = registry.tasks.get("icll")
    assert entry.metrics == ("icll_accuracy", "icll_tvd", "icll_greedy_accuracy")
    assert registry.metric_direction("val/icll_accuracy") == "max"
    assert registry.metric_direction("val/icll_tvd") == "min"
    assert registry.metric_direction("val/icll_greedy_accuracy") == "max"
    s = spec()
    task = make_task(s.train, s.model)
    batch = collate([task.sample("val", 0, i) for i in range(3)])
    metrics = EvalMetrics.for_spec(s)
    logits = torch.log(batch[NEXT_PROBS] + 1e-9)  # the automaton's own distribution
    logits = torch.cat([logits, torch.full((*logits.shape[:2], 32 - 17), -30.0)], dim=-1)
    metrics.update(logits, batch["labels"], batch)
    values = metrics.compute()
    assert values["icll_accuracy"] == 1.0 and values["icll_tvd"] < 1e-6
    with pytest.raises(MixstackError, match="needs the samples' 'icll_next_probs'"):
        metrics.update(logits, batch["labels"])


def test_bad_configs_are_refused_with_the_field() -> None:
    with pytest.raises(SpecError, match="min_states"):
        spec(min_states=5, max_states=3)
    with pytest.raises(SpecError, match="n_symbols >= 20"):
        spec(max_states=20)
    with pytest.raises(SpecError, match="vocab_size"):
        spec(n_symbols=40, max_states=4)
