"""Bits per byte and perplexity of the text task, against independent computations: a
per-row loop over the validation stream (NLL from log-softmax, bytes from the text)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

import mixstack
from mixstack.data.bpe import train_bpe
from mixstack.tasks import make_task
from mixstack.tasks.base import IGNORE_INDEX
from mixstack.tasks.bytecount import byte_level_alphabet, tokenizer_table
from mixstack.training.evaluate import evaluate

UNICODE = ["the", "cat", "café", "日本語", "🎉", "naïve", "\n", " ", "\t", "Ωmega", "x\r\ny"]
ASCII = ["the", "cat", "sat", "on", "a", "mat", "\n", " ", "dog,", "ran."]


def _corpus(folder: Path, words: list[str], n: int = 5, seed: int = 0) -> list[Path]:
    rng = random.Random(seed)
    paths = []
    for i in range(n):
        path = folder / f"f{i}.txt"
        path.write_bytes(" ".join(rng.choices(words, k=rng.randint(30, 70))).encode("utf-8"))
        paths.append(path)
    return paths


def _spec(files: list[Path], tokenizer: str, vocab_size: int, specials: list[str]):
    model = {
        "vocab_size": vocab_size,
        "special_tokens": specials,
        "max_seq_len": 32,
        "d_model": 16,
        "layers": {"pattern": "*-", "symbols": {"-": {"type": "mlp", "hidden": 16}}},
    }
    task = {
        "type": "text",
        "files": [str(f) for f in files],
        "seq_len": 16,
        "val_fraction": 0.4,
        "tokenizer": tokenizer,
    }
    return mixstack.load_spec(
        {"model": model, "train": {"task": task, "max_steps": 1, "val_batch_size": 3}}
    )


def _reference(model, task, token_bytes) -> tuple[float, float]:
    """(bits per byte, perplexity) from one row at a time: Σ -log p(target) over scored
    targets, and the bytes of those targets (``token_bytes(id)``), summed over all rows."""
    nll, nbytes, count = 0.0, 0, 0
    for i in range(task.val_size):
        row = task.sample("val", 0, i)
        logits = model(row["input_ids"][None], seq_idx=row["seq_idx"][None])  # (1, L, V)
        logp = torch.log_softmax(logits.double()[0], dim=-1)  # (L, V)
        for t, label in enumerate(row["labels"].tolist()):
            if label != IGNORE_INDEX:
                nll -= float(logp[t, label])
                nbytes += token_bytes(label)
                count += 1
    return nll / (math.log(2) * nbytes), math.exp(nll / count)


def test_byte_level_bits_per_byte_and_perplexity(tmp_path: Path) -> None:
    files = _corpus(tmp_path, UNICODE)
    spec = _spec(files, "byte", 256, ["pad", "bos", "eos", "mask"])
    model = mixstack.build(spec.model, seed=1).eval()
    with torch.no_grad():
        got = evaluate(model, spec)
        task = make_task(spec.train, spec.model)
        # a byte token is one byte of the text; eos (id 258) spells none
        bpb, ppl = _reference(model, task, lambda i: 1 if i < 256 else 0)
    assert task.val_size > 3  # several batches, the last one short
    assert got["bits_per_byte"] == pytest.approx(bpb, rel=1e-5)
    assert got["ppl"] == pytest.approx(ppl, rel=1e-5)


def test_bpe_bits_per_byte_counts_the_bytes_each_target_decodes_to(tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    files = _corpus(tmp_path, ASCII)  # whole characters per token: decode([id]) is exact
    path = train_bpe(files, 300, tmp_path / "tok")
    tok = Tokenizer.from_file(str(path))
    spec = _spec(files, str(path), tok.get_vocab_size(), [])
    model = mixstack.build(spec.model, seed=2).eval()
    with torch.no_grad():
        got = evaluate(model, spec)
        task = make_task(spec.train, spec.model)
        bpb, ppl = _reference(
            model, task, lambda i: len(tok.decode([i], skip_special_tokens=True).encode())
        )
    assert any(len(tok.decode([i])) > 1 for i in range(tok.get_vocab_size()))  # merges exist
    assert got["bits_per_byte"] == pytest.approx(bpb, rel=1e-5)
    assert got["ppl"] == pytest.approx(ppl, rel=1e-5)


def test_token_bytes_add_up_to_the_utf8_length_of_any_text(tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    path = train_bpe(_corpus(tmp_path, UNICODE, n=8), 400, tmp_path / "tok")
    tok = Tokenizer.from_file(str(path))
    table = tokenizer_table(tok, tok.get_vocab_size())
    rng = random.Random(5)
    texts = ["", "é", "日本語🎉", *("".join(rng.choices(UNICODE, k=40)) for _ in range(20))]
    for text in texts:
        ids = tok.encode(text).ids
        assert int(table[ids].sum()) == len(text.encode("utf-8")), text
    # a multi-byte character split over tokens: the pieces' bytes still add up
    assert any(tok.decode([i]) == "\ufffd" for i in range(tok.get_vocab_size()))
    specials = [tok.token_to_id(s) for s in ("<pad>", "<bos>", "<eos>")]
    assert table[specials].tolist() == [0, 0, 0]


def test_byte_level_alphabet_is_a_bijection_onto_the_256_bytes() -> None:
    alphabet = byte_level_alphabet()
    assert sorted(alphabet.values()) == list(range(256))
    assert alphabet["Ġ"] == ord(" ") and alphabet["Ċ"] == ord("\n") and alphabet["A"] == 65
