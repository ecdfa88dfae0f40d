"""Synthetic tasks against their definitions, checked by naive decoders of each sample."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from mixstack.tasks.base import IGNORE_INDEX, derive_seed, generator_for
from mixstack.tasks.induction import TRIGGER, induction_sample
from mixstack.tasks.majority import majority_sample
from mixstack.tasks.mqar import mqar_sample
from mixstack.tasks.selective_copy import BLANK, MARKER, selective_copy_sample


def _mqar(seed: int, **kw):
    args = {"n_pairs": 4, "seq_len": 32, "vocab_size": 64, "power_a": 0.01}
    args.update(kw)
    return mqar_sample(
        random_non_queries=args.pop("random_non_queries", True),
        generator=generator_for(seed),
        **args,
    )


@pytest.mark.parametrize("random_fill", [True, False])
@pytest.mark.parametrize(("n_pairs", "seq_len", "vocab"), [(4, 32, 64), (3, 13, 10), (8, 64, 256)])
def test_mqar_answers_are_the_values_of_the_queried_keys(
    random_fill: bool, n_pairs: int, seq_len: int, vocab: int
) -> None:
    for seed in range(40):
        s = _mqar(
            seed, n_pairs=n_pairs, seq_len=seq_len, vocab_size=vocab, random_non_queries=random_fill
        )
        ids, labels = s["input_ids"].tolist(), s["labels"].tolist()
        assert len(ids) == len(labels) == seq_len
        keys, values = ids[0 : 2 * n_pairs : 2], ids[1 : 2 * n_pairs : 2]
        assert len(set(keys)) == n_pairs and len(set(values)) == n_pairs
        assert all(1 <= k < vocab // 2 for k in keys)
        assert all(vocab // 2 <= v < vocab for v in values)
        table = dict(zip(keys, values, strict=True))
        scored = [t for t, y in enumerate(labels) if y != IGNORE_INDEX]
        assert len(scored) == n_pairs
        assert sorted(ids[t] for t in scored) == sorted(keys)  # every key queried once
        for t in scored:
            assert t >= 2 * n_pairs and (t - 2 * n_pairs) % 2 == 0
            assert labels[t] == table[ids[t]]
        rest = [ids[t] for t in range(2 * n_pairs, seq_len) if t not in scored]
        if not random_fill:
            assert set(rest) <= {0}
        assert all(0 <= i < vocab for i in ids)


def test_mqar_query_gaps_follow_the_power_law() -> None:
    """One pair: the query gap g is drawn with probability ∝ a·(g+1)^(a-1) (zoology)."""
    a, slots, n = 0.3, 6, 3000
    counts = Counter()
    for seed in range(n):
        s = _mqar(seed, n_pairs=1, seq_len=2 + 2 * slots, power_a=a)
        t = int((s["labels"] != IGNORE_INDEX).nonzero())
        counts[(t - 2) // 2] += 1
    weights = [a * (g + 1) ** (a - 1) for g in range(slots)]
    for g in range(slots):
        expected = n * weights[g] / sum(weights)
        assert abs(counts[g] - expected) < 4 * expected**0.5 + 5, (g, counts[g], expected)


def test_samples_are_pure_functions_of_seed_step_and_index() -> None:
    one = mqar_sample(
        n_pairs=4,
        seq_len=32,
        vocab_size=64,
        power_a=0.01,
        random_non_queries=True,
        generator=generator_for(7, "train", 3, 5),
    )
    again = mqar_sample(
        n_pairs=4,
        seq_len=32,
        vocab_size=64,
        power_a=0.01,
        random_non_queries=True,
        generator=generator_for(7, "train", 3, 5),
    )
    assert torch.equal(one["input_ids"], again["input_ids"])
    assert torch.equal(one["labels"], again["labels"])
    seeds = {derive_seed(7, "train", step, i) for step in range(20) for i in range(20)}
    assert len(seeds) == 400
    assert derive_seed(7, "train", 3, 5) != derive_seed(8, "train", 3, 5)


def test_selective_copy_targets_are_the_data_tokens_in_order() -> None:
    n, L, V = 5, 24, 12
    for seed in range(40):
        s = selective_copy_sample(
            n_tokens=n, seq_len=L, vocab_size=V, generator=generator_for(seed)
        )
        ids, labels = s["input_ids"].tolist(), s["labels"].tolist()
        context = ids[: L - n]
        data = [t for t in context if t != BLANK]
        assert len(data) == n and all(2 <= t < V for t in data)
        assert ids[L - n :] == [MARKER] * n
        assert labels[: L - n] == [IGNORE_INDEX] * (L - n)
        assert labels[L - n :] == data


def test_induction_target_is_the_token_after_the_first_trigger() -> None:
    L, V = 20, 9
    positions = set()
    for seed in range(60):
        s = induction_sample(seq_len=L, vocab_size=V, generator=generator_for(seed))
        ids, labels = s["input_ids"].tolist(), s["labels"].tolist()
        triggers = [t for t, i in enumerate(ids) if i == TRIGGER]
        assert len(triggers) == 2 and triggers[1] == L - 1 and triggers[0] <= L - 3
        positions.add(triggers[0])
        assert labels[:-1] == [IGNORE_INDEX] * (L - 1)
        assert labels[-1] == ids[triggers[0] + 1] != TRIGGER
        assert all(0 <= i < V for i in ids)
    assert len(positions) > 10  # the first trigger moves around


def test_majority_label_is_the_strictly_most_frequent_id() -> None:
    classes = Counter()
    for seed in range(200):
        s = majority_sample(seq_len=11, n_classes=3, generator=generator_for(seed))
        counts = Counter(s["input_ids"].tolist())
        label = int(s["labels"])
        assert s["labels"].shape == ()
        assert all(counts[label] > c for k, c in counts.items() if k != label)
        classes[label] += 1
    assert min(classes.values()) > 40  # classes drawn uniformly
