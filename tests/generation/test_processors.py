"""Score processors and sampling against a reference written here on fixed logits
(plain Python loops over one row at a time, in the order of transformers' generate)."""

from __future__ import annotations

import math

import pytest
import torch

from mixstack.dsl.errors import MixstackError
from mixstack.generation.processors import (
    Sampling,
    choose,
    process,
    repetition_penalty,
    top_k_filter,
    top_p_filter,
)

NEG = float("-inf")
LOGITS = torch.tensor(
    [
        [2.0, -1.0, 0.5, 3.0, -0.25, 1.5, 0.0, -2.0],
        [-0.5, 0.75, 0.1, -3.0, 2.5, 2.25, -1.5, 1.0],
        [0.3, 0.2, 0.1, 0.0, -0.1, -0.2, -0.3, -0.4],
    ],
    dtype=torch.float64,
)
HISTORY = [[0, 1, 1, 6], [4, 3], [7, 7, 0, 2, 5]]


def ref_penalty(row: list[float], seen: list[int], penalty: float) -> list[float]:
    out = list(row)
    for token in set(seen):
        out[token] = out[token] / penalty if out[token] > 0 else out[token] * penalty
    return out


def ref_top_k(row: list[float], k: int) -> list[float]:
    threshold = sorted(row, reverse=True)[k - 1]
    return [v if v >= threshold else NEG for v in row]


def ref_top_p(row: list[float], p: float) -> list[float]:
    finite = [v for v in row if v != NEG]
    top = max(finite)
    weights = [math.exp(v - top) if v != NEG else 0.0 for v in row]
    total = sum(weights)
    order = sorted(range(len(row)), key=lambda i: -row[i])
    keep, mass = set(), 0.0
    for i in order:
        keep.add(i)
        mass += weights[i] / total
        if mass >= p:
            break
    return [v if i in keep else NEG for i, v in enumerate(row)]


def ref_process(row, seen, *, penalty=None, temperature=1.0, k=None, p=None):
    if penalty is not None:
        row = ref_penalty(row, seen, penalty)
    row = [v / temperature for v in row]
    if k is not None:
        row = ref_top_k(row, k)
    if p is not None:
        row = ref_top_p(row, p)
    return row


def rows_equal(got: torch.Tensor, want: list[list[float]]) -> None:
    want_t = torch.tensor(want, dtype=got.dtype)
    assert torch.equal(torch.isinf(got), torch.isinf(want_t)), (got, want_t)
    finite = ~torch.isinf(want_t)
    torch.testing.assert_close(got[finite], want_t[finite], rtol=1e-12, atol=1e-12)


def history_tensor() -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(h) for h in HISTORY)
    ids = torch.tensor([h + [0] * (width - len(h)) for h in HISTORY])
    valid = torch.tensor([[True] * len(h) + [False] * (width - len(h)) for h in HISTORY])
    return ids, valid


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_ignores_padding(penalty: float) -> None:
    ids, valid = history_tensor()
    got = repetition_penalty(LOGITS, ids, penalty, valid)
    rows_equal(
        got, [ref_penalty(r, h, penalty) for r, h in zip(LOGITS.tolist(), HISTORY, strict=True)]
    )


@pytest.mark.parametrize("k", [1, 3, 8])
def test_top_k(k: int) -> None:
    rows_equal(top_k_filter(LOGITS, k), [ref_top_k(r, k) for r in LOGITS.tolist()])


def test_top_k_keeps_ties_at_the_threshold() -> None:
    row = torch.tensor([[1.0, 2.0, 2.0, 0.0]])
    assert top_k_filter(row, 2).tolist() == [[NEG, 2.0, 2.0, NEG]]
    assert top_k_filter(row, 1).tolist() == [[NEG, 2.0, 2.0, NEG]]


@pytest.mark.parametrize("p", [0.05, 0.5, 0.8, 0.95, 1.0])
def test_top_p(p: float) -> None:
    rows_equal(top_p_filter(LOGITS, p), [ref_top_p(r, p) for r in LOGITS.tolist()])


@pytest.mark.parametrize(
    ("penalty", "temperature", "k", "p"),
    [(None, 0.7, None, None), (1.2, 1.5, 4, None), (1.2, 0.5, 5, 0.7), (0.8, 2.0, None, 0.9)],
)
def test_process_applies_the_processors_in_order(penalty, temperature, k, p) -> None:
    ids, valid = history_tensor()
    sampling = Sampling(temperature=temperature, top_k=k, top_p=p, repetition_penalty=penalty)
    got = process(LOGITS, sampling, history=ids, history_valid=valid)
    want = [
        ref_process(r, h, penalty=penalty, temperature=temperature, k=k, p=p)
        for r, h in zip(LOGITS.tolist(), HISTORY, strict=True)
    ]
    rows_equal(got, want)


def test_greedy_applies_only_the_penalty_and_the_ban() -> None:
    ids, valid = history_tensor()
    sampling = Sampling(temperature=0.0, top_k=1, top_p=0.1, repetition_penalty=2.0)
    got = process(LOGITS, sampling, history=ids, history_valid=valid, banned=[3])
    want = [ref_penalty(r, h, 2.0) for r, h in zip(LOGITS.tolist(), HISTORY, strict=True)]
    for row in want:
        row[3] = NEG
    rows_equal(got, want)
    assert choose(got, sampling, None).tolist() == [max(range(8), key=r.__getitem__) for r in want]


def test_sampling_draws_from_the_softmax_with_the_given_generator() -> None:
    sampling = Sampling(temperature=0.8, top_k=5, top_p=0.9)
    scores = process(LOGITS, sampling)
    want_scores = torch.tensor(
        [ref_process(r, [], temperature=0.8, k=5, p=0.9) for r in LOGITS.tolist()]
    )
    draws = [choose(scores, sampling, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    ref = torch.multinomial(
        torch.softmax(want_scores, dim=-1), 1, generator=torch.Generator().manual_seed(7)
    )[:, 0]
    assert torch.equal(draws[0], ref)
    # every draw lands on a kept token; the empirical frequencies follow the softmax
    g = torch.Generator().manual_seed(0)
    many = torch.stack([choose(scores, sampling, g) for _ in range(4000)])  # (4000, 3)
    probs = torch.softmax(want_scores, dim=-1)
    for row in range(3):
        freq = torch.bincount(many[:, row], minlength=8).double() / 4000
        assert bool((freq[probs[row] == 0] == 0).all())
        assert (freq - probs[row]).abs().max() < 0.04


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -1.0}, r"temperature must be >= 0 \(0 = greedy\), got -1.0"),
        ({"top_k": 0}, r"top_k must be an int >= 1 \(or None\), got 0"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\] \(or None\), got 1.5"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"repetition_penalty": 0.0}, r"repetition_penalty must be > 0 \(or None\), got 0.0"),
    ],
)
def test_bad_sampling_arguments(kwargs, message) -> None:
    with pytest.raises(MixstackError, match=message):
        Sampling(**kwargs).check()
