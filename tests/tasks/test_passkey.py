"""Passkey: the key read back from the bytes by an independent parser, the needle's
depth, the read-twice layout against a construction written here, and the refusals."""

from __future__ import annotations

import re
from typing import Any

import pytest

import mixstack
from mixstack.dsl.errors import SpecError
from mixstack.tasks import make_task
from mixstack.tasks.base import IGNORE_INDEX, generator_for
from mixstack.tasks.passkey import passkey_sample

SENTENCES = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
ASK = "What is the pass key? The pass key is "
NEEDLE = re.compile(r"The pass key is (\d+)\. Remember it\. \1 is the pass key\. ")


def _sample(seed: int, **kw: Any) -> tuple[str, list[int]]:
    args = {"seq_len": 256, "n_digits": 5, "depth": None, "read_twice": False}
    args.update(kw)
    s = passkey_sample(generator=generator_for(seed), **args)
    ids = s["input_ids"].tolist()
    assert len(ids) == args["seq_len"] and s["labels"].shape == (args["seq_len"],)
    return bytes(ids).decode("ascii"), s["labels"].tolist()


def _scored_key(text: str, labels: list[int]) -> str:
    scored = [t for t, y in enumerate(labels) if y != IGNORE_INDEX]
    assert scored == list(range(scored[0], scored[0] + len(scored))) and scored[-1] == len(text) - 2
    return bytes(labels[t] for t in scored).decode()


@pytest.mark.parametrize("seq_len", [256, 512, 1024, 4096])
def test_the_key_is_recoverable_and_the_only_target(seq_len: int) -> None:
    keys = set()
    for seed in range(20):
        text, labels = _sample(seed, seq_len=seq_len)
        (match,) = NEEDLE.finditer(text)
        key = match.group(1)
        assert len(key) == 5 and text.endswith(ASK + key)
        assert _scored_key(text, labels) == key
        # everything else is the filler, cut from its repetition
        rest = text[: match.start()] + text[match.end() : len(text) - len(ASK) - 5]
        assert rest == (SENTENCES * (len(rest) // len(SENTENCES) + 1))[: len(rest)]
        keys.add(key)
    assert len(keys) == 20


def test_depth_zero_puts_the_needle_first_and_one_right_before_the_question() -> None:
    for seed in range(5):
        text, _ = _sample(seed, depth=0.0)
        assert NEEDLE.match(text)
        text, _ = _sample(seed, depth=1.0)
        (m,) = NEEDLE.finditer(text)
        assert text[m.end() :] == ASK + m.group(1)
        text, _ = _sample(seed, seq_len=1000, depth=0.5)
        (m,) = NEEDLE.finditer(text)
        filler = 1000 - len(m.group(0)) - len(ASK) - 5
        assert m.start() == round(0.5 * filler)


def test_a_free_depth_is_drawn_per_sample() -> None:
    starts = [next(NEEDLE.finditer(_sample(s, seq_len=2048)[0])).start() for s in range(200)]
    assert min(starts) < 200 and max(starts) > 1700 and len(set(starts)) > 150


@pytest.mark.parametrize("seq_len", [300, 301, 777])
def test_read_twice_is_context_question_context_question_key(seq_len: int) -> None:
    for seed in range(5):
        text, labels = _sample(seed, seq_len=seq_len, n_digits=4, depth=0.3, read_twice=True)
        once, _ = _sample(seed, seq_len=seq_len, n_digits=4, depth=0.3)
        key = once[-4:]
        # the construction written here: filler bytes per context, the needle at 0.3 of them
        needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
        free = seq_len - 4 - 2 * (len(needle) + len(ASK))
        filler = (SENTENCES * 50)[: free // 2]
        cut = round(0.3 * len(filler))
        context = filler[:cut] + needle + filler[cut:]
        assert text == context + ASK + " " * (free % 2) + context + ASK + key
        assert _scored_key(text, labels) == key


def _spec(task: dict[str, Any], vocab: int = 256) -> Any:
    model = {
        "vocab_size": vocab,
        "max_seq_len": 1024,
        "d_model": 8,
        "layers": {"pattern": "-", "symbols": {"-": {"type": "mlp", "hidden": 16}}},
    }
    train = {"task": {"type": "passkey", **task}, "max_steps": 1}
    return mixstack.load_spec({"model": model, "train": train})


def test_the_task_samples_by_seed_split_step_index() -> None:
    spec = _spec({"seq_len": 512, "depth": 0.25})
    task = make_task(spec.train, spec.model)
    a, b = task.sample("val", 0, 3), task.sample("val", 8, 3)
    assert a["input_ids"].equal(b["input_ids"])
    keys = {
        NEEDLE.search(bytes(task.sample("train", s, 1)["input_ids"].tolist()).decode())[1]
        for s in range(5)
    }
    assert len(keys) == 5  # training samples move on with the step


@pytest.mark.parametrize(
    ("task", "vocab", "path", "words"),
    [
        ({"seq_len": 256}, 128, "type", "byte-level (ids 0..255), the model's vocab_size is 128"),
        ({"seq_len": 100}, 256, "seq_len", "take 102 bytes, more than seq_len 100"),
        ({"seq_len": 198, "read_twice": True}, 256, "seq_len", "questions and key take 199"),
        ({"depth": 1.5}, 256, "depth", "1"),
    ],
)
def test_impossible_configurations_are_refused(
    task: dict[str, Any], vocab: int, path: str, words: str
) -> None:
    with pytest.raises(SpecError) as err:
        _spec(task, vocab)
    assert f"train.task.{path}" in str(err.value) and words in str(err.value)
