"""Tiny byte-rich text corpora and the smallest language-model spec for tests of the
tokenizer and text-data paths (tokenizer training, shards, model directories, the Hub)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

# multi-byte UTF-8 (é, CJK, an emoji) and whitespace tokens, so byte-level BPE merges
# across byte boundaries and the byte counts differ from the character counts
WORDS = ["the", "cat", "sat", "café", "日本", "🎉", "on", "mat", "\n", " "]


def write_word_files(
    folder: Path, *, n: int, seed: int, words_per_file: int | tuple[int, int]
) -> list[Path]:
    """``n`` files ``f{i}.txt`` of words drawn from :data:`WORDS` by ``Random(seed)``;
    ``words_per_file`` is a count, or ``(lo, hi)`` for a count drawn per file."""
    rng = random.Random(seed)
    paths = []
    for i in range(n):
        k = rng.randint(*words_per_file) if isinstance(words_per_file, tuple) else words_per_file
        path = folder / f"f{i}.txt"
        path.write_text(" ".join(rng.choices(WORDS, k=k)), encoding="utf-8")
        paths.append(path)
    return paths


def tiny_mlp_lm(
    vocab_size: int, max_seq_len: int, special_tokens: list[str] | None = None
) -> dict[str, Any]:
    """The ``model`` section of a one-MLP-layer causal LM of width 16: the cheapest model a
    text task can train, for tests about data and tokenizers rather than mixers."""
    return {
        "vocab_size": vocab_size,
        "special_tokens": [] if special_tokens is None else special_tokens,
        "max_seq_len": max_seq_len,
        "d_model": 16,
        "layers": {"pattern": "-", "symbols": {"-": {"type": "mlp", "hidden": 16}}},
    }
