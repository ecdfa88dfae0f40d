"""Task contract tests: every registered task × its ``examples()``.

A task is deterministic under its seed (same seed, same samples; another seed, other
samples), its validation set is fixed (independent of the step), its samples are
well-formed for the model, its metrics compute, and its labels agree with an
independent evaluator that recomputes them from the inputs. This file also registers a
task of its own (``test_parity``: one file holding config, generator and a metric, as
a plugin would), which runs through the same tests and through ``load_spec``.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, Literal

import pytest
import torch
from pydantic import Field

import mixstack
from mixstack.dsl import registry
from mixstack.dsl.registry import MetricDef, register_task
from mixstack.tasks import make_task
from mixstack.tasks.base import (
    IGNORE_INDEX,
    GeneratedTask,
    GeneratedTaskConfig,
    Sample,
    Split,
    Task,
)
from mixstack.training.data import collate
from mixstack.training.metrics import EvalMetrics

# -- a task registered from this test file ----------------------------------------------


class ParityTask(GeneratedTaskConfig):
    """Random bits; at the last position, predict the parity of all the others."""

    type: Literal["test_parity"] = "test_parity"
    seq_len: int = Field(16, ge=3)

    @classmethod
    def examples(cls) -> list[ParityTask]:
        return [cls(seq_len=9, val_size=6), cls(seq_len=33, val_size=6)]


def _last_position_right(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor]:
    return ((logits[:, -1].argmax(dim=-1) == labels[:, -1]).float(),)


def _mean(n_out: int) -> Any:
    from torchmetrics import MeanMetric

    return MeanMetric()


PARITY_HITS = MetricDef("parity_hits", True, "last-position accuracy", _mean, _last_position_right)


class Parity(GeneratedTask):
    def sample(self, split: Split, step: int, index: int) -> Sample:
        g = self.generator(split, step, index)
        bits = torch.randint(2, (self.cfg.seq_len,), generator=g)
        labels = torch.full_like(bits, IGNORE_INDEX)
        labels[-1] = int(bits[:-1].sum()) % 2
        return {"input_ids": bits, "labels": labels}


def register_parity() -> None:
    register_task(ParityTask, metrics=[PARITY_HITS])(Parity)


# -- independent evaluators: labels recomputed from the inputs --------------------------


def _scored(labels: list[int]) -> list[int]:
    return [t for t, y in enumerate(labels) if y != IGNORE_INDEX]


def check_mqar(cfg: Any, ids: list[int], labels: list[int], seq_idx: Any) -> None:
    n = cfg.n_pairs
    if cfg.read_twice:  # the first half again, scored the second time only
        half = len(ids) // 2
        assert ids[:half] == ids[half : 2 * half] and ids[2 * half :] in ([], [0])
        assert set(labels[:half] + labels[2 * half :]) == {IGNORE_INDEX}
        ids, labels = ids[half : 2 * half], labels[half : 2 * half]
    table = dict(zip(ids[0 : 2 * n : 2], ids[1 : 2 * n : 2], strict=True))  # key -> value
    queries = _scored(labels)
    asked = [ids[t] for t in queries]
    if cfg.n_queries is None:
        assert sorted(asked) == sorted(table), "every key is queried once"
    else:  # a subset of the keys, each asked once
        assert len(asked) == cfg.n_queries == len(set(asked)) and set(asked) <= set(table)
    assert all(t >= 2 * n and (t - 2 * n) % 2 == 0 for t in queries)
    assert [labels[t] for t in queries] == [table[ids[t]] for t in queries]


def check_selective_copy(cfg: Any, ids: list[int], labels: list[int], seq_idx: Any) -> None:
    context = ids[: cfg.seq_len - cfg.n_tokens]
    data = [t for t in context if t != 0]  # 0 is the blank
    assert labels == [IGNORE_INDEX] * len(context) + data


def check_induction(cfg: Any, ids: list[int], labels: list[int], seq_idx: Any) -> None:
    first = ids.index(0)  # the trigger
    assert labels == [IGNORE_INDEX] * (len(ids) - 1) + [ids[first + 1]]


def check_majority(cfg: Any, ids: list[int], labels: Any, seq_idx: Any) -> None:
    (top, count), *rest = Counter(ids).most_common()
    assert labels == top and all(c < count for _, c in rest), "a strict majority"


def check_text(cfg: Any, ids: list[int], labels: list[int], seq_idx: Any) -> None:
    docs = seq_idx.tolist()
    expected = [ids[t + 1] if docs[t + 1] == docs[t] else IGNORE_INDEX for t in range(len(ids) - 1)]
    assert labels[:-1] == expected


def check_icll(cfg: Any, ids: list[int], labels: list[int], seq_idx: Any) -> None:
    """Next-token labels; delimiter-separated, non-empty strings of at most max_string_len
    symbols (the last one may be cut), from an alphabet of at most alphabet_size symbols."""
    delimiter = cfg.n_symbols
    assert labels[:-1] == ids[1:], "every next token is a target"
    tokens = [*ids, labels[-1]]
    assert all(0 <= t <= delimiter for t in tokens)
    strings = [s.split() for s in " ".join(map(str, tokens)).split(str(delimiter))]
    assert all(strings[:-1]) and all(len(s) <= cfg.max_string_len for s in strings)
    assert len({t for t in tokens if t != delimiter}) <= (cfg.alphabet_size or cfg.max_states)


def _listops_depth(tokens: list[int], c: int) -> int:
    depth = deepest = 0
    for t in tokens:
        depth += (c <= t < c + 4) - (t == c + 4)
        deepest = max(deepest, depth)
    return deepest


def _listops_eval(tokens: list[int], c: int, max_args: int) -> int:
    """Parse ListOps tokens (values 0..C-1, [MAX [MIN [MED [SM = C..C+3, ] = C+4) back into
    a tree, recursively, and evaluate it."""

    def parse(i: int) -> tuple[Any, int]:  # (tree, next index)
        if tokens[i] < c:
            return tokens[i], i + 1
        assert c <= tokens[i] < c + 4, f"an operator or a value at {i}, got {tokens[i]}"
        op, args, i = tokens[i] - c, [], i + 1
        while tokens[i] != c + 4:
            arg, i = parse(i)
            args.append(arg)
        assert 2 <= len(args) <= max_args
        return (op, args), i + 1

    def value(tree: Any) -> int:
        if isinstance(tree, int):
            return tree
        op, args = tree
        vals = sorted(value(a) for a in args)
        if op == 2:  # MED as numpy: the mean of the middle two, truncated
            n = len(vals)
            return vals[n // 2] if n % 2 else int((vals[n // 2 - 1] + vals[n // 2]) / 2)
        return [max(vals), min(vals), None, sum(vals) % c][op]

    tree, end = parse(0)
    assert end == len(tokens), "one expression, nothing after it"
    assert not isinstance(tree, int) and len(tree[1]) >= 2, "an operator at the root"
    return value(tree)


def check_listops(cfg: Any, ids: list[int], labels: Any, seq_idx: Any) -> None:
    c = cfg.n_classes
    lm = isinstance(labels, list)
    body = [t for t in ids if t != c + 5]  # padding (on the left only)
    assert ids[len(ids) - len(body) :] == body, "left padding"
    if lm:
        assert body[-1] == c + 6 and labels[:-1] == [IGNORE_INDEX] * (len(ids) - 1)
        body, labels = body[:-1], labels[-1]
    assert cfg.min_length <= len(body) and _listops_depth(body, c) <= cfg.max_depth
    assert labels == _listops_eval(body, c, cfg.max_args)


def check_passkey(cfg: Any, ids: list[int], labels: list[int], seq_idx: Any) -> None:
    """The key is read back from the needle sentence(s) by a regular expression; the
    question comes last and the scored targets are the key's digits after it."""
    text = bytes(ids).decode("ascii")
    found = re.findall(r"The pass key is (\d+)\. Remember it\. (\d+) is the pass key\.", text)
    assert len(found) == (2 if cfg.read_twice else 1) and len({k for f in found for k in f}) == 1
    key = found[0][0]
    assert len(key) == cfg.n_digits and text.endswith(
        "What is the pass key? The pass key is " + key
    )
    assert text.count("What is the pass key?") == (2 if cfg.read_twice else 1)
    n = len(ids)
    assert labels == [IGNORE_INDEX] * (n - len(key) - 1) + list(key.encode()) + [IGNORE_INDEX]


def check_parity(cfg: Any, ids: list[int], labels: list[int], seq_idx: Any) -> None:
    assert labels == [IGNORE_INDEX] * (len(ids) - 1) + [sum(ids[:-1]) % 2]


EVALUATORS: dict[str, Callable[..., None]] = {
    "mqar": check_mqar,
    "selective_copy": check_selective_copy,
    "induction": check_induction,
    "majority": check_majority,
    "text": check_text,
    "icll": check_icll,
    "listops": check_listops,
    "passkey": check_passkey,
    "test_parity": check_parity,
}


# -- cases ------------------------------------------------------------------------------


def _cases() -> list[tuple[str, int]]:
    with registry.scoped():
        register_parity()
        return [
            (entry.name, i)
            for entry in registry.tasks.all()
            for i in range(len(entry.config_cls.examples()))
        ]


@pytest.fixture(autouse=True)
def parity_registered(scoped_registry: Any) -> Iterator[None]:
    register_parity()
    yield


def _task(name: str, index: int, seed: int = 0) -> tuple[Task, Any]:
    """The task built like a run builds it: from a spec validated against a tiny model."""
    cfg = registry.tasks.get(name).config_cls.examples()[index]
    arch = cfg.archs[0]
    model: dict[str, Any] = {
        "arch": arch,
        "vocab_size": 256,
        "max_seq_len": 512,
        "d_model": 8,
        "layers": {"pattern": "-", "symbols": {"-": {"type": "mlp", "hidden": 16}}},
    }
    if arch == "classifier":
        model["classifier"] = {"n_classes": getattr(cfg, "n_classes", None) or 2}
    train = {"task": cfg.model_dump(), "max_steps": 1, "seed": seed}
    spec = mixstack.load_spec({"model": model, "train": train})
    return make_task(spec.train, spec.model), spec


def _same(a: Sample, b: Sample) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


CASES = _cases()
IDS = [f"{name}-{i}" for name, i in CASES]


def test_the_test_task_is_registered_from_this_file() -> None:
    entry = registry.tasks.get("test_parity")
    assert entry.task_cls is Parity and entry.metrics == ("parity_hits",)
    assert entry.origin.kind == "code" and entry.origin.path == __name__
    assert "test_parity" in [name for name, _ in CASES]
    assert registry.metric_direction("val/parity_hits") == "max"


def test_every_registered_task_has_examples() -> None:
    missing = [e.name for e in registry.tasks.all() if not e.config_cls.examples()]
    assert not missing, f"tasks without examples() run no contract test: {missing}"


@pytest.mark.parametrize(("name", "index"), CASES, ids=IDS)
def test_same_seed_same_samples_other_seed_other_samples(name: str, index: int) -> None:
    a, _ = _task(name, index, seed=3)
    b, _ = _task(name, index, seed=3)
    c, _ = _task(name, index, seed=4)
    keys = [(split, step, i) for split in ("train", "val") for step in (0, 5) for i in range(3)]
    assert all(_same(a.sample(*k), b.sample(*k)) for k in keys)
    assert not all(_same(a.sample(*k), c.sample(*k)) for k in keys if k[0] == "train")


@pytest.mark.parametrize(("name", "index"), CASES, ids=IDS)
def test_validation_set_is_fixed_and_training_moves_on(name: str, index: int) -> None:
    task, _ = _task(name, index)
    assert task.val_size >= 1
    for i in range(min(task.val_size, 4)):
        assert _same(task.sample("val", 0, i), task.sample("val", 77, i))
    assert not all(_same(task.sample("train", 0, i), task.sample("train", 1, i)) for i in range(4))


@pytest.mark.parametrize(("name", "index"), CASES, ids=IDS)
def test_labels_match_an_independent_evaluator(name: str, index: int) -> None:
    assert name in EVALUATORS, f"task {name!r} has no independent evaluator in this file"
    task, spec = _task(name, index)
    for split, step, i in [
        (s, step, i) for s in ("train", "val") for step in (0, 9) for i in range(4)
    ]:
        sample = task.sample(split, step, i)  # type: ignore[arg-type]
        ids = sample["input_ids"]
        assert ids.dtype == torch.long and ids.shape == (task.cfg.seq_len,)
        assert int(ids.min()) >= 0 and int(ids.max()) < spec.model.total_vocab  # eos may follow
        labels = sample["labels"]
        assert labels.dtype == torch.long
        assert labels.shape == (() if task.kind == "classification" else ids.shape)
        EVALUATORS[name](task.cfg, ids.tolist(), labels.tolist(), sample.get("seq_idx"))


@pytest.mark.parametrize(("name", "index"), CASES, ids=IDS)
def test_metrics_are_registered_and_compute(name: str, index: int) -> None:
    task, spec = _task(name, index)
    declared = registry.tasks.get(name).metrics
    metrics = EvalMetrics.for_spec(spec)
    assert {"loss", "accuracy", *declared} <= set(metrics.definitions)
    for metric in metrics.definitions.values():
        assert metric.description and isinstance(metric.higher_is_better, bool)
    samples = [task.sample("val", 0, i) for i in range(min(task.val_size, 4))]
    labels = torch.stack([s["labels"] for s in samples])
    n_out = spec.model.classifier.n_classes if spec.model.classifier else spec.model.total_vocab
    logits = torch.randn(*labels.shape, n_out, generator=torch.Generator().manual_seed(0))
    metrics.update(logits, labels, collate(samples))
    assert all(math.isfinite(v) for v in metrics.compute().values())
