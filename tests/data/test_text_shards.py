"""The text task with a tokenizer (`train.task.tokenizer`) and over token shards
(`train.task.shards`): rows are the same as from the files, against a stream built here
with the `tokenizers` library; a tokenizer or vocabulary mismatch is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mixstack
from mixstack.data.bpe import train_bpe
from mixstack.data.shards import prepare_shards
from mixstack.dsl.errors import MixstackError, SpecError
from mixstack.dsl.spec import Spec
from mixstack.tasks import make_task
from mixstack.tasks.base import IGNORE_INDEX, Task
from tests.support.text_corpus import tiny_mlp_lm, write_word_files


def _corpus(folder: Path, n: int = 6) -> list[Path]:
    return write_word_files(folder, n=n, seed=3, words_per_file=(20, 60))


def _spec(task: dict, vocab_size: int, special_tokens: list[str]) -> Spec:
    model = tiny_mlp_lm(vocab_size, 64, special_tokens)
    return mixstack.load_spec({"model": model, "train": {"task": task, "max_steps": 1}})


def _rows(task: Task, n_steps: int = 4, n_index: int = 3) -> list[dict]:
    out = [task.sample("train", s, i) for s in range(n_steps) for i in range(n_index)]
    return out + [task.sample("val", 0, i) for i in range(task.val_size)]


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for key in ("input_ids", "labels", "seq_idx"):
            assert torch.equal(x[key], y[key]), key


@pytest.fixture
def bpe(tmp_path: Path) -> tuple[list[Path], Path, int]:
    from tokenizers import Tokenizer

    files = _corpus(tmp_path)
    path = train_bpe(files, 300, tmp_path / "tok")
    return files, path, Tokenizer.from_file(str(path)).get_vocab_size()


def test_tokenizer_rows_match_a_reference_stream_and_the_shards(
    tmp_path: Path, bpe: tuple[list[Path], Path, int]
) -> None:
    from tokenizers import Tokenizer

    files, path, size = bpe
    task_cfg = {"type": "text", "seq_len": 16, "val_fraction": 0.2, "tokenizer": str(path)}
    spec = _spec({**task_cfg, "files": [str(f) for f in files]}, size, [])
    from_files = make_task(spec.train, spec.model)

    reference = Tokenizer.from_file(str(path))
    eos = reference.token_to_id("<eos>")
    tokens, ids = [], []
    for d, f in enumerate(files):
        body = [*reference.encode(f.read_text(encoding="utf-8")).ids, eos]
        tokens += body
        ids += [d] * len(body)
    n_train = round(len(tokens) * 0.8)
    val_t, val_d = tokens[n_train:], ids[n_train:]
    assert from_files.val_size == (len(val_t) - 1) // 16
    for index in range(from_files.val_size):
        row = from_files.sample("val", 0, index)
        s = index * 16
        assert row["input_ids"].tolist() == val_t[s : s + 16]
        want = [
            val_t[t + 1] if val_d[t + 1] == val_d[t] else IGNORE_INDEX for t in range(s, s + 16)
        ]
        assert row["labels"].tolist() == want
        assert row["seq_idx"].tolist() == [val_d[t] - val_d[s] for t in range(s, s + 16)]
    for step in range(4):
        row = from_files.sample("train", step, 0)["input_ids"].tolist()
        assert any(tokens[i : i + 16] == row for i in range(n_train - 16))

    shards = prepare_shards(files, tmp_path / "shards", tokenizer=path)
    spec = _spec({**task_cfg, "shards": str(shards)}, size, [])
    _same(_rows(make_task(spec.train, spec.model)), _rows(from_files))


def test_byte_shards_give_the_rows_of_the_files(tmp_path: Path) -> None:
    files = _corpus(tmp_path, n=4)
    task_cfg = {"type": "text", "seq_len": 12, "val_fraction": 0.25}
    spec = _spec({**task_cfg, "files": [str(f) for f in files]}, 256, ["eos"])
    shards = prepare_shards(files, tmp_path / "s", special_ids=spec.model.special_ids)
    spec_s = _spec({**task_cfg, "shards": str(shards)}, 256, ["eos"])
    _same(_rows(make_task(spec_s.train, spec_s.model)), _rows(make_task(spec.train, spec.model)))
    # the shards' eos is the spec's: a model without eos reads other ids
    spec_no_eos = _spec({**task_cfg, "shards": str(shards)}, 256, [])
    with pytest.raises(MixstackError, match=r"made with byte tokens \(eos id 256\).*eos id None"):
        make_task(spec_no_eos.train, spec_no_eos.model)


def test_mismatches_are_refused(tmp_path: Path, bpe: tuple[list[Path], Path, int]) -> None:
    files, path, size = bpe
    base = {"type": "text", "seq_len": 16, "tokenizer": str(path)}
    # a local tokenizer is checked when the spec loads: a located error with both numbers
    with pytest.raises(SpecError) as caught:
        _spec({**base, "files": [str(f) for f in files]}, size + 1, [])
    text = str(caught.value)
    assert "train.task.tokenizer" in text and "1 problem" in text
    assert f"has {size} ids but model.vocab_size is {size + 1}" in text
    assert f"model.vocab_size: {size}" in text
    with pytest.raises(SpecError, match="special tokens come from it"):
        _spec({**base, "files": [str(f) for f in files]}, size, ["eos"])
    other = train_bpe(files[:2], 280, tmp_path / "other")
    shards = prepare_shards(files, tmp_path / "s", tokenizer=other)
    spec = _spec({**base, "shards": str(shards)}, size, [])
    with pytest.raises(MixstackError, match="made with another tokenizer"):
        make_task(spec.train, spec.model)


def test_prepare_writes_the_specs_shards_with_its_tokenizer(
    tmp_path: Path, bpe: tuple[list[Path], Path, int]
) -> None:
    import yaml
    from typer.testing import CliRunner

    from mixstack.cli.main import app

    files, path, size = bpe
    task = {"type": "text", "seq_len": 16, "files": [str(f) for f in files]}
    task_tok = {**task, "tokenizer": str(path.parent)}
    model = tiny_mlp_lm(size, 64)
    spec_file = tmp_path / "lm.yaml"
    shards = tmp_path / "sh"
    body = {"model": model, "train": {"task": {**task_tok, "shards": str(shards)}, "max_steps": 1}}
    spec_file.write_text(yaml.safe_dump(body))
    runner = CliRunner()
    result = runner.invoke(app, ["data", "prepare", str(spec_file)])
    assert result.exit_code == 0, result.output
    assert f"wrote {shards}" in result.output
    with_shards = mixstack.load_spec(spec_file)
    from_files = _spec(task_tok, size, [])
    _same(
        _rows(make_task(with_shards.train, with_shards.model)),
        _rows(make_task(from_files.train, from_files.model)),
    )
    body["train"]["task"] = task_tok
    spec_file.write_text(yaml.safe_dump(body))
    result = runner.invoke(app, ["data", "prepare", str(spec_file)])
    assert result.exit_code == 1
    assert "give --out DIR or set train.task.shards" in result.output


def test_a_tokenizer_without_eos_is_named_in_the_error(
    tmp_path: Path, bpe: tuple[list[Path], Path, int]
) -> None:
    files, path, size = bpe
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer.json").write_bytes(path.read_bytes())  # no tokenizer_config.json
    base = {"type": "text", "seq_len": 16, "tokenizer": str(bare)}
    with pytest.raises(SpecError) as caught:
        _spec({**base, "files": [str(f) for f in files]}, size, [])
    assert "train.task.tokenizer" in str(caught.value)
    assert "names no eos token (it has no specials; absent: bos, eos, pad)" in str(caught.value)
    with pytest.raises(MixstackError, match="names no eos token"):
        prepare_shards(files, tmp_path / "s", tokenizer=bare)
    assert not (tmp_path / "s").exists()
