"""MQAR's ``n_queries``: only some keys are asked. Unset, the samples are those of the
all-keys task bit for bit (recorded below from the generator before the field existed);
set, the asked keys are a random subset, checked against the key-value table, and the
read-twice layout shows exactly those keys between the two copies (a layout rebuilt here
from the parsed table and query positions, not from ``tasks.mqar.read_twice``)."""

from __future__ import annotations

from typing import Any

import pytest

import mixstack
from mixstack.dsl.errors import SpecError
from mixstack.tasks import make_task
from mixstack.tasks.base import IGNORE_INDEX

_ = IGNORE_INDEX


def _task(seq_len: int, n_pairs: int, vocab: int = 64, seed: int = 7, **kw: Any) -> Any:
    model = {
        "vocab_size": vocab,
        "max_seq_len": 256,
        "d_model": 8,
        "layers": {"pattern": "-", "symbols": {"-": {"type": "mlp", "hidden": 16}}},
    }
    task = {"type": "mqar", "n_pairs": n_pairs, "seq_len": seq_len, **kw}
    spec = mixstack.load_spec(
        {"model": model, "train": {"task": task, "max_steps": 1, "seed": seed}}
    )
    return make_task(spec.train, spec.model)


# Samples of mqar(n_pairs=3, vocab 16, seed 7) made by main at f371eb5, before n_queries.
_GOLDEN = {
    (False, ("train", 0, 0)): (
        [6, 8, 4, 9, 5, 15, 4, 15, 4, 9, 14, 9, 6, 11, 5, 6],
        [_, _, _, _, _, _, _, _, 9, _, _, _, 8, _, 15, _],
    ),
    (False, ("val", 2, 1)): (
        [1, 12, 3, 15, 5, 14, 3, 14, 7, 11, 15, 6, 1, 10, 5, 3],
        [_, _, _, _, _, _, 15, _, _, _, _, _, 12, _, 14, _],
    ),
}
_GOLDEN.update(
    {
        (True, key): (ids + ids + [0], [_] * 16 + labels + [_])
        for (twice, key), (ids, labels) in list(_GOLDEN.items())
    }
)


@pytest.mark.parametrize("explicit", [False, True])
@pytest.mark.parametrize(("twice", "key"), list(_GOLDEN))
def test_samples_without_n_queries_are_unchanged(twice: bool, key: Any, explicit: bool) -> None:
    extra = {"n_queries": None} if explicit else {}
    task = _task(33 if twice else 16, 3, vocab=16, read_twice=twice, **extra)
    sample = task.sample(*key)
    assert (sample["input_ids"].tolist(), sample["labels"].tolist()) == _GOLDEN[(twice, key)]


def _parse(ids: list[int], labels: list[int], n: int) -> tuple[dict[int, int], list[int]]:
    """The key -> value table and the scored positions of one reading."""
    table = dict(zip(ids[0 : 2 * n : 2], ids[1 : 2 * n : 2], strict=True))
    return table, [t for t, y in enumerate(labels) if y != IGNORE_INDEX]


@pytest.mark.parametrize("fill", [True, False])
def test_only_n_queries_keys_are_asked_a_random_subset(fill: bool) -> None:
    n, q = 6, 2
    task = _task(24, n, n_queries=q, random_non_queries=fill)
    asked_pairs: set[int] = set()
    for index in range(40):
        sample = task.sample("train", 1, index)
        ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
        table, scored = _parse(ids, labels, n)
        assert len(table) == n and len(set(table.values())) == n
        asked = [ids[t] for t in scored]
        assert len(scored) == q and len(set(asked)) == q and set(asked) <= set(table)
        assert all(t >= 2 * n and (t - 2 * n) % 2 == 0 for t in scored)
        assert [labels[t] for t in scored] == [table[k] for k in asked]
        if not fill:  # nothing but the asked keys after the pairs
            assert [t for t in range(2 * n, 24) if ids[t] != 0] == scored
        asked_pairs |= {list(table).index(k) for k in asked}
        # deterministic under (seed, split, step, index)
        again = task.sample("train", 1, index)
        assert again["input_ids"].tolist() == ids and again["labels"].tolist() == labels
    assert asked_pairs == set(range(n)), "the asked keys are drawn among all pairs"
    other = _task(24, n, n_queries=q, random_non_queries=fill, seed=8)
    assert (
        other.sample("train", 1, 0)["input_ids"].tolist()
        != task.sample("train", 1, 0)["input_ids"].tolist()
    )


def test_n_queries_equal_to_n_pairs_asks_every_key() -> None:
    task = _task(16, 4, n_queries=4)
    for index in range(5):
        sample = task.sample("val", 0, index)
        ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
        table, scored = _parse(ids, labels, 4)
        assert sorted(ids[t] for t in scored) == sorted(table)


@pytest.mark.parametrize(("seq_len", "fill"), [(48, False), (49, False), (48, True)])
def test_read_twice_shows_exactly_the_asked_keys_between_the_copies(
    seq_len: int, fill: bool
) -> None:
    n, q, half = 6, 2, seq_len // 2
    task = _task(seq_len, n, n_queries=q, read_twice=True, random_non_queries=fill)
    for key in [("train", 0, 0), ("train", 5, 3), ("val", 0, 2)]:
        sample = task.sample(*key)
        ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
        # parse the scored (second) reading: table, asked keys and where they are asked
        table, scored = _parse(ids[half : 2 * half], labels[half : 2 * half], n)
        asked = [ids[half + t] for t in scored]
        assert len(scored) == q and len(set(asked)) == q and set(asked) <= set(table)
        # rebuild the layout: pairs, the asked keys at their slots, twice; answers at the end
        reading = [t for k, v in table.items() for t in (k, v)] + [0] * (half - 2 * n)
        for t, k in zip(scored, asked, strict=True):
            reading[t] = k
        expected_labels = [IGNORE_INDEX] * (2 * half) + [IGNORE_INDEX] * (seq_len % 2)
        for t, k in zip(scored, asked, strict=True):
            expected_labels[half + t] = table[k]
        if fill:  # the noise is shared by both copies; compare the non-noise positions
            keep = [t for t in range(half) if t < 2 * n or t in scored]
            assert [ids[t] for t in keep] == [reading[t] for t in keep]
            assert [ids[half + t] for t in keep] == [reading[t] for t in keep]
            assert ids[:half] == ids[half : 2 * half]
        else:  # between the copies: exactly the asked keys, in the order asked at the end
            assert ids == reading + reading + [0] * (seq_len % 2)
            between = [k for k in ids[2 * n : half] if k != 0]
            end = [ids[t] for t in range(half, 2 * half) if labels[t] != IGNORE_INDEX]
            assert between == end
        assert labels == expected_labels


def test_more_queries_than_pairs_are_refused_where_they_are_set() -> None:
    with pytest.raises(SpecError) as err:
        _task(64, 3, n_queries=4)
    text = str(err.value)
    assert "train.task.n_queries" in text
    assert "4 queries need as many distinct keys, there are n_pairs = 3" in text


def test_too_short_for_pairs_and_queries_is_refused() -> None:
    _task(16, 6, n_queries=2)  # 2·6 + 2·2 = 16 fits once
    with pytest.raises(SpecError) as err:
        _task(31, 6, n_queries=2, read_twice=True)
    text = str(err.value)
    assert "train.task.n_queries" in text
    assert "need seq_len >= 2·(2·n_pairs + 2·n_queries) = 32, seq_len is 31" in text
