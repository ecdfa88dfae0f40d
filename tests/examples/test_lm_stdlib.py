"""The lm_stdlib example: its specs validate, its questions are what they claim (the
right choice is the next line, the others share its indentation), and lm-eval reads its
task folder."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import mixstack

EXAMPLE = Path(__file__).resolve().parent.parent.parent / "examples" / "lm_stdlib"


def _module():
    spec = importlib.util.spec_from_file_location(
        "lm_stdlib_make_corpus", EXAMPLE / "make_corpus.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_specs_validate() -> None:
    lm = mixstack.load_spec(str(EXAMPLE / "lm.yaml"))
    held = mixstack.load_spec(str(EXAMPLE / "heldout.yaml"))
    assert held.model == lm.model  # one model, two texts
    assert lm.train.task.shards == "runs/lm_stdlib/shards" and held.train.task.shards is None
    assert held.train.task.files == ["runs/lm_stdlib/heldout.txt"]
    assert lm.train.task.tokenizer == held.train.task.tokenizer == "runs/lm_stdlib/tok"


def _modules() -> list[str]:
    out = []
    for m in range(4):
        lines = [f"def f{m}_{i}(x):\n    return x + {m * 100 + i} - y\n" for i in range(6)]
        out.append("".join(lines) + f"class C{m}:\n    attribute_{m} = 'some text here'\n")
    return out


def test_questions_continue_their_module(tmp_path: Path) -> None:
    make = _module()
    held = _modules()
    docs = make.questions(held, 10, seed=0)
    assert len(docs) == 10
    for doc in docs:
        right = doc["choices"][doc["label"]]
        assert len(set(doc["choices"])) == 4
        assert any(doc["context"] + right + "\n" in text for text in held)
        # the others are the same words in another order, indentation kept
        for choice in doc["choices"]:
            assert sorted(choice.split()) == sorted(right.split())
            assert (
                choice[: len(choice) - len(choice.lstrip())]
                == right[: len(right) - len(right.lstrip())]
            )
        assert doc["context"].count("\n") == make.CONTEXT_LINES
    # lm-eval reads the task folder as make_corpus.py writes it
    from lm_eval.tasks import TaskManager

    for name in ("stdlib_next_line.yaml", "stdlib_next_line.py"):
        shutil.copyfile(EXAMPLE / "tasks" / name, tmp_path / name)
    (tmp_path / "next_line.json").write_text(json.dumps(docs), encoding="utf-8")
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    task = manager.load(["stdlib_next_line"])["tasks"]["stdlib_next_line"]
    first = next(iter(task.test_docs()))
    assert task.doc_to_text(first) == docs[0]["context"]
    assert task.doc_to_choice(first) == docs[0]["choices"]
    assert task.doc_to_target(first) == docs[0]["label"]
