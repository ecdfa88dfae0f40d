"""ListOps against an independent recursive evaluator, in both archs, and its refusals."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch

import mixstack
from mixstack.dsl.errors import SpecError
from mixstack.tasks import make_task
from mixstack.tasks.base import IGNORE_INDEX

C = 10  # values 0..9; [MAX [MIN [MED [SM = 10..13, ] = 14, pad 15, '=' 16
OPS = {10: max, 11: min, 13: lambda v: sum(v) % C}


def _median(vals: list[int]) -> int:
    s = sorted(vals)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) // 2


def evaluate(tokens: list[int]) -> tuple[int, int, int]:
    """(value, depth, most arguments) of one expression, by a recursive descent parser."""
    pos = 0

    def expr() -> tuple[int, int, int]:
        nonlocal pos
        tok = tokens[pos]
        pos += 1
        if tok < C:
            return tok, 0, 0
        assert tok in (10, 11, 12, 13), tok
        vals, depth, width = [], 0, 0
        while tokens[pos] != 14:
            v, d, w = expr()
            vals.append(v)
            depth, width = max(depth, d), max(width, w)
        pos += 1
        value = _median(vals) if tok == 12 else OPS[tok](vals)
        return value, depth + 1, max(width, len(vals))

    out = expr()
    assert pos == len(tokens)
    return out


def _spec(arch: str, task: dict[str, Any], vocab: int = 32, classes: int = C) -> Any:
    model: dict[str, Any] = {
        "arch": arch,
        "vocab_size": vocab,
        "max_seq_len": 256,
        "d_model": 8,
        "layers": {"pattern": "-", "symbols": {"-": {"type": "mlp", "hidden": 16}}},
    }
    if arch == "classifier":
        model["classifier"] = {"n_classes": classes}
    return mixstack.load_spec({"model": model, "train": {"task": task, "max_steps": 1}})


@pytest.mark.parametrize("arch", ["classifier", "causal_lm"])
def test_labels_are_the_values_of_the_expressions(arch: str) -> None:
    cfg = {"type": "listops", "seq_len": 96, "max_depth": 4, "max_args": 5, "min_length": 30}
    spec = _spec(arch, cfg)
    task = make_task(spec.train, spec.model)
    assert task.kind == ("classification" if arch == "classifier" else "lm")
    labels_seen: Counter[int] = Counter()
    ops_seen: set[int] = set()
    lengths = []
    for i in range(200):
        s = task.sample("train", i // 8, i % 8)
        ids, labels = s["input_ids"].tolist(), s["labels"]
        assert len(ids) == 96
        body = [t for t in ids if t != 15]
        assert ids[: 96 - len(body)] == [15] * (96 - len(body))  # left padding only
        if arch == "causal_lm":
            assert body[-1] == 16 and ids[-1] == 16
            assert labels.tolist()[:-1] == [IGNORE_INDEX] * 95
            body, label = body[:-1], int(labels[-1])
        else:
            assert labels.shape == ()
            label = int(labels)
        value, depth, width = evaluate(body)
        assert label == value
        assert 1 <= depth <= 4 and width <= 5 and 30 <= len(body) <= 96
        labels_seen[label] += 1
        ops_seen |= {t for t in body if 10 <= t <= 13}
        lengths.append(len(body))
    assert set(labels_seen) == set(range(C))  # every class occurs
    assert ops_seen == {10, 11, 12, 13}
    assert len(set(lengths)) > 10  # the lengths vary


def test_median_of_an_even_list_rounds_down_like_lra() -> None:
    from mixstack.tasks.listops import _value

    assert _value(["MED", [1, 4]], C) == 2  # int(np.median([1, 4])) = int(2.5)
    assert _value(["MED", [3, 9, 0]], C) == 3
    assert _value(["SM", [7, 8, ["MAX", [2, 5]]]], C) == 0
    assert evaluate([12, 1, 4, 14])[0] == 2


def test_samples_are_pure_functions_of_seed_split_step_index() -> None:
    spec = _spec("classifier", {"type": "listops", "seq_len": 64})
    a, b = make_task(spec.train, spec.model), make_task(spec.train, spec.model)
    for key in [("train", 3, 1), ("val", 0, 5)]:
        sa, sb = a.sample(*key), b.sample(*key)
        assert torch.equal(sa["input_ids"], sb["input_ids"]) and sa["labels"] == sb["labels"]
    assert torch.equal(a.sample("val", 0, 2)["input_ids"], a.sample("val", 9, 2)["input_ids"])


@pytest.mark.parametrize(
    ("arch", "task", "vocab", "classes", "path", "words"),
    [
        ("classifier", {}, 32, 7, "n_classes", "the model's classifier 7"),
        ("causal_lm", {"n_classes": 10}, 16, C, "n_classes", "vocab_size >= 17"),
        (
            "classifier",
            {"max_depth": 1, "max_args": 3, "min_length": 6},
            32,
            C,
            "min_length",
            "longest expression: 5 tokens",
        ),
    ],
)
def test_impossible_configurations_are_refused(
    arch: str, task: dict[str, Any], vocab: int, classes: int, path: str, words: str
) -> None:
    with pytest.raises(SpecError) as err:
        _spec(arch, {"type": "listops", "seq_len": 32, **task}, vocab=vocab, classes=classes)
    assert f"train.task.{path}" in str(err.value) and words in str(err.value)


def test_the_label_objective_is_refused_for_an_encoder() -> None:
    """An encoder trains ListOps only under objective mlm (self-pretraining)."""
    with pytest.raises(SpecError) as err:
        _spec("encoder", {"type": "listops", "seq_len": 32})
    text = str(err.value)
    assert "train.task.objective" in text and "the model is arch encoder" in text
    assert "objective mlm for arch encoder" in text


def test_min_length_at_the_fullest_tree_is_reached() -> None:
    """max_depth 1, max_args 5: the longest expression is [OP v v v v v], 7 tokens."""
    cfg = {"type": "listops", "seq_len": 8, "max_depth": 1, "max_args": 5, "min_length": 7}
    spec = _spec("classifier", cfg)
    task = make_task(spec.train, spec.model)
    for i in range(30):
        s = task.sample("val", 0, i)
        ids = s["input_ids"].tolist()
        assert ids[0] == 15 and 10 <= ids[1] <= 13 and ids[-1] == 14
        assert int(s["labels"]) == evaluate(ids[1:])[0]
