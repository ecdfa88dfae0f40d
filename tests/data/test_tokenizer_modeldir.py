"""A model directory of a run whose text task has a tokenizer stores its tokenizer.json in the model
directory, with the sha256 in config.json (outside `model`); loading refuses a replaced
or missing tokenizer, and `mixstack generate` decodes with the stored one."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

import mixstack
from mixstack.data.bpe import train_bpe
from mixstack.dsl.errors import CheckpointError
from mixstack.hub.modeldir import load_model_dir, load_tokenizer, verify_model_dir
from tests.support.text_corpus import tiny_mlp_lm, write_word_files


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from tokenizers import Tokenizer

    from mixstack.archs.builder import build
    from mixstack.hub.modeldir import save_model_dir
    from mixstack.training.run import _task_tokenizer

    root = tmp_path_factory.mktemp("tokrun")
    files = write_word_files(root, n=4, seed=1, words_per_file=120)
    tok = train_bpe(files, 290, root / "tok")
    size = Tokenizer.from_file(str(tok)).get_vocab_size()
    spec = mixstack.load_spec(
        {
            "model": tiny_mlp_lm(size, 32),
            "train": {
                "task": {
                    "type": "text",
                    "seq_len": 16,
                    "tokenizer": str(tok.parent),
                    "files": [str(f) for f in files],
                    "val_size": 2,
                },
                "max_steps": 2,
                "batch_size": 2,
                "val_every": 2,
            },
        }
    )
    # what `fit` exports at the end of a run (training itself is tested elsewhere)
    stored = _task_tokenizer(spec)
    assert stored == tok
    folder = save_model_dir(build(spec.model, seed=0), root / "model", tokenizer=stored)
    return {"model_dir": folder, "tok": tok, "root": root}


def test_model_dir_holds_the_tokenizer_and_its_digest(run: dict[str, Any]) -> None:
    folder, tok = run["model_dir"], run["tok"]
    stored = folder / "tokenizer.json"
    assert stored.read_bytes() == tok.read_bytes()
    config = json.loads((folder / "config.json").read_text())
    digest = hashlib.sha256(tok.read_bytes()).hexdigest()
    assert config["tokenizer"] == {"file": "tokenizer.json", "sha256": digest}
    assert "tokenizer" not in json.dumps(config["model"])  # the spec hash ignores it
    tokenizer = load_tokenizer(folder)
    text = "the café 日本 🎉"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text and tokenizer.eos_token_id == 2  # <eos> of train_bpe
    verify_model_dir(folder)  # the digest check is part of `mixstack verify`


def test_generate_decodes_with_the_stored_tokenizer(run: dict[str, Any]) -> None:
    import torch
    from typer.testing import CliRunner

    from mixstack.cli.main import app

    folder = run["model_dir"]
    result = CliRunner().invoke(
        app, ["generate", str(folder), "--prompt", "the cat", "--max-new-tokens", "4"]
    )
    assert result.exit_code == 0, result.output
    # the same greedy continuation computed here: argmax ids, decoded by the stored file
    model, tokenizer = load_model_dir(folder), load_tokenizer(folder)
    ids = tokenizer.encode("the cat")
    new: list[int] = []
    with torch.no_grad():
        for _ in range(4):
            logits = model(torch.tensor([ids + new]))
            logits = logits if isinstance(logits, torch.Tensor) else logits.logits
            nxt = int(logits[0, -1, : model.spec.total_vocab].argmax())
            if nxt == tokenizer.eos_token_id:
                break
            new.append(nxt)
    assert new and tokenizer.decode(new) in result.stdout


def test_a_replaced_or_missing_tokenizer_is_refused(run: dict[str, Any], tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(run["model_dir"], folder)
    recorded = json.loads((folder / "config.json").read_text())["tokenizer"]["sha256"]
    (folder / "tokenizer.json").write_text(
        (folder / "tokenizer.json").read_text() + " ", encoding="utf-8"
    )
    now = hashlib.sha256((folder / "tokenizer.json").read_bytes()).hexdigest()
    for load in (load_model_dir, load_tokenizer, verify_model_dir):
        with pytest.raises(CheckpointError) as caught:
            load(folder)
        assert now in str(caught.value) and recorded in str(caught.value)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=f"records a tokenizer.json \\(sha256 {recorded}"):
        load_model_dir(folder)
