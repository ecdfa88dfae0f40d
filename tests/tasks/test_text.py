"""Byte-level text: packing, document boundaries, splits, against a list-based reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mixstack
from mixstack.dsl.errors import MixstackError
from mixstack.tasks import make_task
from mixstack.tasks.base import IGNORE_INDEX
from mixstack.tasks.text import ByteText, bundled_corpus, split_documents

MODEL = {
    "vocab_size": 256,
    "max_seq_len": 64,
    "d_model": 16,
    "layers": {"pattern": "-", "symbols": {"-": {"type": "mlp", "hidden": 16}}},
}
EOS = 256 + ["pad", "bos", "eos", "mask"].index("eos")


def _spec(task: dict, **model):
    return mixstack.load_spec(
        {"model": {**MODEL, **model}, "train": {"task": task, "max_steps": 1}}
    )


def _reference_stream(docs: list[bytes], eos: int | None) -> tuple[list[int], list[int]]:
    tokens, ids = [], []
    for d, doc in enumerate(docs):
        body = [*doc, *([eos] if eos is not None else [])]
        tokens += body
        ids += [d] * len(body)
    return tokens, ids


def _check_row(sample: dict, tokens: list[int], ids: list[int], start: int, L: int) -> None:
    assert sample["input_ids"].tolist() == tokens[start : start + L]
    expected_labels = [
        tokens[t + 1] if ids[t + 1] == ids[t] else IGNORE_INDEX for t in range(start, start + L)
    ]
    assert sample["labels"].tolist() == expected_labels
    assert sample["seq_idx"].tolist() == [ids[t] - ids[start] for t in range(start, start + L)]


@pytest.mark.parametrize("documents", ["file", "paragraph"])
def test_rows_pack_documents_with_seq_idx_and_ignore_cross_document_labels(
    tmp_path: Path, documents: str
) -> None:
    a = tmp_path / "a.txt"
    b = tmp_path / "b.txt"
    a.write_bytes(b"first paragraph of a.\n\nsecond one, caf\xc3\xa9.\n")
    b.write_bytes(b"b is one short file with  spaces\n   \n and a third paragraph")
    spec = _spec(
        {
            "type": "text",
            "files": [str(a), str(b)],
            "seq_len": 12,
            "documents": documents,
            "val_fraction": 0.25,
        }
    )
    task = make_task(spec.train, spec.model)
    docs = split_documents([("a", a.read_bytes()), ("b", b.read_bytes())], documents)
    assert len(docs) == (2 if documents == "file" else 4)
    tokens, ids = _reference_stream(docs, EOS)
    n_train = round(len(tokens) * 0.75)
    for step in range(6):
        for index in range(3):
            s = task.sample("train", step, index)
            row = s["input_ids"].tolist()
            starts = [
                i for i in range(n_train - 12) if tokens[i : i + 12] == row and i + 12 < n_train
            ]
            assert starts, "a training row must be a window of the training part"
            _check_row(s, tokens, ids, starts[0], 12)
            assert torch.equal(s["input_ids"], task.sample("train", step, index)["input_ids"])
    val_tokens, val_ids = tokens[n_train:], ids[n_train:]
    assert task.val_size == (len(val_tokens) - 1) // 12
    for index in range(task.val_size):
        _check_row(task.sample("val", 99, index), val_tokens, val_ids, index * 12, 12)


def test_without_eos_documents_still_split_by_seq_idx(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("aaaa\n\nbbbbbbbb\n\ncccccccccccc\n\ndddddddddd")
    spec = _spec(
        {
            "type": "text",
            "files": [str(path)],
            "seq_len": 8,
            "documents": "paragraph",
            "val_fraction": 0.4,
        },
        special_tokens=[],
    )
    task = make_task(spec.train, spec.model)
    assert isinstance(task, ByteText)
    tokens, ids = _reference_stream(split_documents([("t", path.read_bytes())], "paragraph"), None)
    assert task.train_tokens.tolist() + task.val_tokens.tolist() == tokens
    assert task.train_docs.tolist() + task.val_docs.tolist() == ids


def test_bundled_corpus_is_package_data_and_the_default() -> None:
    text = bundled_corpus()
    assert len(text) > 4000 and text.decode("utf-8").startswith("The Lighthouse")
    spec = _spec({"type": "text", "seq_len": 32})
    task = make_task(spec.train, spec.model)
    assert task.train_tokens.numel() + task.val_tokens.numel() == len(text) + 1  # one file + eos
    assert bytes(task.train_tokens[:14].tolist()) == text[:14]


def test_missing_file_and_too_little_text_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(MixstackError, match=r"train\.task\.files\[0\]: text file 'nope\.txt'"):
        make_task(*_parts({"type": "text", "files": ["nope.txt"], "seq_len": 8}))
    short = tmp_path / "s.txt"
    short.write_text("only a few bytes here")
    with pytest.raises(MixstackError, match=r"validation part of the text has \d+ tokens, fewer"):
        make_task(*_parts({"type": "text", "files": [str(short)], "seq_len": 8}))


def _parts(task: dict):
    spec = _spec(task)
    return spec.train, spec.model
