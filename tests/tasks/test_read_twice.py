"""Read-twice (JRT) MQAR: context, queries, context, queries -> answers, checked against a
layout built here from the single-read task, and against the key-value table."""

from __future__ import annotations

from typing import Any

import pytest

import mixstack
from mixstack.dsl.errors import SpecError
from mixstack.tasks import make_task
from mixstack.tasks.base import IGNORE_INDEX


def _task(seq_len: int, read_twice: bool, n_pairs: int = 4, **kw: Any) -> Any:
    model = {
        "vocab_size": 64,
        "max_seq_len": 256,
        "d_model": 8,
        "layers": {"pattern": "-", "symbols": {"-": {"type": "mlp", "hidden": 16}}},
    }
    task = {"type": "mqar", "n_pairs": n_pairs, "seq_len": seq_len, "read_twice": read_twice}
    spec = mixstack.load_spec(
        {"model": model, "train": {"task": {**task, **kw}, "max_steps": 1, "seed": 7}}
    )
    return make_task(spec.train, spec.model)


@pytest.mark.parametrize(("seq_len", "fill"), [(64, True), (65, True), (40, False)])
def test_layout_is_two_readings_with_answers_scored_in_the_second(seq_len: int, fill: bool) -> None:
    twice = _task(seq_len, True, random_non_queries=fill)
    once = _task(seq_len // 2, False, random_non_queries=fill)
    half = seq_len // 2
    for key in [("train", 0, 0), ("train", 3, 2), ("val", 0, 5)]:
        a, b = twice.sample(*key), once.sample(*key)
        ids, labels = a["input_ids"].tolist(), a["labels"].tolist()
        one, one_labels = b["input_ids"].tolist(), b["labels"].tolist()
        # the construction: the single reading, twice; a 0 when seq_len is odd
        assert ids == one + one + [0] * (seq_len % 2)
        assert labels == [IGNORE_INDEX] * half + one_labels + [IGNORE_INDEX] * (seq_len % 2)
        # the first reading shows the queries without answers: no value follows a key there
        table = dict(zip(ids[0:8:2], ids[1:8:2], strict=True))
        assert ids[half : half + 8] == ids[0:8]
        scored = [t for t, y in enumerate(labels) if y != IGNORE_INDEX]
        assert len(scored) == 4 and all(t >= half + 8 for t in scored)
        assert [labels[t] for t in scored] == [table[ids[t]] for t in scored]
        assert sorted(ids[t] for t in scored) == sorted(table)
        first_queries = [t - half for t in scored]
        assert [ids[t] for t in first_queries] == [ids[t] for t in scored]


def test_too_many_pairs_to_read_twice_are_refused() -> None:
    _task(32, False, n_pairs=8)  # fits once
    with pytest.raises(SpecError) as err:
        _task(32, True, n_pairs=8)
    assert "train.task.n_pairs" in str(err.value)
    assert "read twice need seq_len >= 8·n_pairs = 64" in str(err.value)
