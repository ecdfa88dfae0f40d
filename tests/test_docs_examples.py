"""The worked examples of the docs are the code: docs/adding-a-task.md's copy task works
against the current API, and docs/adding-a-mixer.md quotes examples/plugins/ema.py as it is.

docs/adding-a-task.md's Python block (a complete ``copy`` task: config, generator, metric and task
class) is executed as written inside ``registry.scoped()``; a spec then trains on the
task, and the samples :func:`mixstack.tasks.make_task` builds are checked against the
labels recomputed here from the inputs alone. The block is also loaded the way the page
says to use it, as a ``--plugin`` file.
"""

from __future__ import annotations

import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import mixstack
from mixstack.dsl import registry
from mixstack.dsl.errors import SpecError
from mixstack.dsl.spec import Spec
from mixstack.tasks import make_task
from mixstack.tasks.base import IGNORE_INDEX
from mixstack.training.metrics import EvalMetrics

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "adding-a-task.md"
MIXER_PAGE = ROOT / "docs" / "adding-a-mixer.md"
EMA_PLUGIN = ROOT / "examples" / "plugins" / "ema.py"
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
MODULE = "docs_adding_a_task_copy"


def copy_task_code() -> str:
    """The page's Python block that defines the copy task."""
    blocks = PYTHON_BLOCK.findall(PAGE.read_text(encoding="utf-8"))
    found = [b for b in blocks if "class CopyTask" in b]
    assert len(found) == 1, f"{PAGE.name}: expected one Python block defining CopyTask"
    return found[0]


@pytest.fixture
def copy_module(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    """The block executed as a module (Pydantic resolves its annotations through
    ``sys.modules``); its registrations are undone when the test ends."""
    module = types.ModuleType(MODULE)
    monkeypatch.setitem(sys.modules, MODULE, module)
    with registry.scoped():
        exec(compile(copy_task_code(), str(PAGE), "exec"), module.__dict__)
        yield module


def tiny_spec(task: dict[str, Any]) -> Spec:
    model = {
        "vocab_size": 16,
        "max_seq_len": 32,
        "d_model": 8,
        "layers": {"pattern": "-", "symbols": {"-": {"type": "mlp", "hidden": 16}}},
    }
    return mixstack.load_spec({"model": model, "train": {"task": task, "max_steps": 1}})


def expected_labels(ids: list[int], n_tokens: int, vocab_size: int) -> list[int]:
    """The copy task's labels from its definition: ``n`` ids in ``1..V-1``, the separator
    0, the same ids again, then 0; the output at t (for n <= t < 2n) is the input at t + 1."""
    n = n_tokens
    assert all(1 <= t < vocab_size for t in ids[:n]), ids
    assert ids[n] == 0 and ids[n + 1 : 2 * n + 1] == ids[:n], ids
    assert all(t == 0 for t in ids[2 * n + 1 :]), ids
    return [ids[t + 1] if n <= t < 2 * n else IGNORE_INDEX for t in range(len(ids))]


def test_the_copy_task_of_the_page_trains_and_its_labels_are_right(copy_module) -> None:
    entry = registry.tasks.get("copy")
    assert entry.task_cls is copy_module.Copy and entry.config_cls is copy_module.CopyTask
    assert entry.metrics == ("copy_exact",) and registry.metric_direction("val/copy_exact") == "max"

    spec = tiny_spec({"type": "copy", "n_tokens": 5, "seq_len": 20, "val_size": 4})
    assert spec.train is not None and spec.train.task.vocab_size == 16  # null -> the model's
    task = make_task(spec.train, spec.model)
    assert isinstance(task, copy_module.Copy) and task.val_size == 4
    for split, step, index in [("train", 0, 0), ("train", 3, 1), ("val", 0, 2)]:
        sample = task.sample(split, step, index)
        ids, labels = sample["input_ids"], sample["labels"]
        assert ids.dtype == labels.dtype == torch.long and ids.shape == labels.shape == (20,)
        assert labels.tolist() == expected_labels(ids.tolist(), 5, 16)
        assert all(torch.equal(sample[k], task.sample(split, step, index)[k]) for k in sample)
    assert torch.equal(task.sample("val", 0, 1)["input_ids"], task.sample("val", 9, 1)["input_ids"])

    # The task's metric computes: perfect logits copy every row.
    labels = torch.stack([task.sample("val", 0, i)["labels"] for i in range(4)])  # (B, L)
    logits = torch.nn.functional.one_hot(labels.clamp(min=0), spec.model.total_vocab).float()
    metrics = EvalMetrics.for_spec(spec)
    metrics.update(logits, labels)
    assert metrics.compute()["copy_exact"] == 1.0


def test_the_docstring_example_follows_the_definition(copy_module) -> None:
    example = copy_module.copy_sample.__doc__.split("::")[1].split()
    inputs, labels = example[1:10], example[11:]
    assert example[0] == "inputs" and example[10] == "labels"
    got = [IGNORE_INDEX if t == "-" else int(t) for t in labels]
    assert got == expected_labels([int(t) for t in inputs], 3, 10)


def test_the_examples_load_and_a_sequence_too_short_is_refused(copy_module) -> None:
    for example in copy_module.CopyTask.examples():
        spec = tiny_spec(example.model_dump())
        assert spec.train is not None
        task = make_task(spec.train, spec.model)
        ids = task.sample("train", 0, 0)["input_ids"].tolist()
        vocab = spec.train.task.vocab_size
        assert task.sample("train", 0, 0)["labels"].tolist() == expected_labels(
            ids, example.n_tokens, vocab
        )
    with pytest.raises(SpecError, match=r"train\.task\.n_tokens"):
        tiny_spec({"type": "copy", "n_tokens": 10, "seq_len": 20})


def test_registrations_end_with_the_scope() -> None:
    with registry.scoped():
        module = types.ModuleType(MODULE)
        sys.modules[MODULE] = module
        try:
            exec(compile(copy_task_code(), str(PAGE), "exec"), module.__dict__)
            assert "copy" in registry.tasks.names()
        finally:
            del sys.modules[MODULE]
    assert "copy" not in registry.tasks.names()
    assert "copy_exact" not in registry.metrics.names()


def test_the_block_loads_as_a_plugin_file(tmp_path: Path) -> None:
    path = tmp_path / "copy_task.py"
    path.write_text(copy_task_code(), encoding="utf-8")
    try:
        with registry.scoped():
            registry.load_plugin_file(path)
            entry = registry.tasks.get("copy")
            assert entry.origin.kind == "plugin" and entry.origin.path == str(path.resolve())
            spec = tiny_spec({"type": "copy", "n_tokens": 2, "seq_len": 8})
            assert spec.train is not None
            sample = make_task(spec.train, spec.model).sample("train", 0, 0)
            ids = sample["input_ids"].tolist()
            assert sample["labels"].tolist() == expected_labels(ids, 2, 16)
    finally:
        sys.modules.pop("mixstack_plugin_copy_task", None)


def test_the_mixer_page_quotes_the_ema_plugin_verbatim() -> None:
    """Every Python block of docs/adding-a-mixer.md is a verbatim excerpt of the plugin."""
    source = EMA_PLUGIN.read_text(encoding="utf-8")
    blocks = PYTHON_BLOCK.findall(MIXER_PAGE.read_text(encoding="utf-8"))
    assert blocks, f"{MIXER_PAGE.name} quotes no code"
    stale = [block for block in blocks if block not in source]
    assert not stale, f"{MIXER_PAGE.name} quotes code that is not in {EMA_PLUGIN.name}:\n" + (
        "\n---\n".join(stale)
    )
