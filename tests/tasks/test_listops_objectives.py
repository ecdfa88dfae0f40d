"""ListOps under the self-pretraining objectives: ``lm`` scores the next token inside the
expression, ``mlm`` the masked tokens (the encoder's corruption); no value is shown."""

from __future__ import annotations

from typing import Any

import pytest

import mixstack
from mixstack.dsl.errors import SpecError
from mixstack.tasks import make_task
from mixstack.tasks.base import IGNORE_INDEX
from mixstack.training.data import TaskDataset

PAD, QUERY, CLOSE = 15, 16, 14  # C = 10
TASK = {"type": "listops", "seq_len": 48, "max_depth": 3, "max_args": 4, "min_length": 12}


def _spec(arch: str, objective: str, **train: Any) -> Any:
    model: dict[str, Any] = {
        "arch": arch,
        "vocab_size": 17,
        "max_seq_len": 64,
        "d_model": 8,
        "layers": {"pattern": "-", "symbols": {"-": {"type": "mlp", "hidden": 16}}},
    }
    if arch == "classifier":
        model["classifier"] = {"n_classes": 10}
    task = {**TASK, "objective": objective}
    return mixstack.load_spec({"model": model, "train": {"task": task, "max_steps": 1, **train}})


def test_lm_scores_each_next_token_of_the_expression() -> None:
    spec = _spec("causal_lm", "lm")
    task = make_task(spec.train, spec.model)
    label = _spec("causal_lm", "label")
    for i in range(40):
        s = task.sample("train", i, 0)
        ids, labels = s["input_ids"].tolist(), s["labels"].tolist()
        body = [t for t in ids if t != PAD]
        start = len(ids) - len(body)
        assert QUERY not in ids and 10 <= body[0] <= 13 and body[-1] == CLOSE
        assert len(body) >= 12
        expected = [IGNORE_INDEX] * len(ids)
        for t in range(start, len(ids) - 1):
            expected[t] = ids[t + 1]
        assert labels == expected
    # the expressions of the label objective, without the '=' and its value
    other = make_task(label.train, label.model)
    for i in range(10):
        a = other.sample("val", 0, i)
        assert a["input_ids"][-1] == QUERY and a["labels"][-1] != IGNORE_INDEX
        assert QUERY not in task.sample("val", 0, i)["input_ids"].tolist()
    assert task.kind == "lm"


def test_mlm_masks_the_expression_for_an_encoder() -> None:
    spec = _spec("encoder", "mlm", mlm={"mask_id": QUERY, "mask_rate": 0.3})
    task = make_task(spec.train, spec.model)
    data = TaskDataset(task, "train", spec)
    masked = 0
    for i in range(20):
        clean = task.sample("train", i, 1)["input_ids"].tolist()
        got = data[(i, 1)]
        ids, labels = got["input_ids"].tolist(), got["labels"].tolist()
        assert QUERY not in clean
        for t, (x, y) in enumerate(zip(ids, labels, strict=True)):
            if y == IGNORE_INDEX:
                assert x == clean[t]
            else:
                assert (x, y) == (QUERY, clean[t])
                masked += 1
    assert 0.2 < masked / (20 * 48) < 0.4


@pytest.mark.parametrize(
    ("arch", "objective", "words"),
    [
        ("classifier", "lm", "objective lm trains arch causal_lm, the model is arch classifier"),
        ("causal_lm", "mlm", "objective mlm trains arch encoder, the model is arch causal_lm"),
        ("encoder", "lm", "allowed: objective mlm for arch encoder"),
    ],
)
def test_objectives_are_refused_for_other_archs(arch: str, objective: str, words: str) -> None:
    extra = {"mlm": {"mask_id": QUERY}} if arch == "encoder" else {}
    with pytest.raises(SpecError) as err:
        _spec(arch, objective, **extra)
    text = str(err.value)
    assert "train.task.objective" in text and words in text, text
