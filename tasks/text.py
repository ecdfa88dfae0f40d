"""Byte-level language modelling on local text files (no tokenizer, no downloads).

Every document (a whole file, or a blank-line separated paragraph) becomes its UTF-8
bytes (ids 0..255) followed by the model's ``eos`` id when it has one. The documents
are concatenated into one stream with a parallel document-id stream; the first
``1 - val_fraction`` of it trains, the rest validates. A row is a window of
``seq_len + 1`` consecutive tokens (inputs = all but the last, labels = all but the
first), so rows are packed across documents: ``seq_idx`` gives each position's
document (0, 1, ... within the row) and a label that belongs to the next document is
ignored. Training rows start at offsets drawn from ``(seed, step, index)``;
validation rows are the consecutive windows of the validation part.

With ``tokenizer: PATH`` (a ``tokenizer.json``) the documents are that tokenizer's ids
and its own eos ends each one; ``shards: DIR`` reads a stream prepared once by
``mixstack data prepare`` (:mod:`mixstack.data.shards`, memory-mapped) instead of the
files, packed the same way. See docs/data.md#training-on-shards.

Validation rows also hold ``target_bytes (L,)``, the UTF-8 bytes each scored target
spells, for the ``bits_per_byte`` metric (:mod:`mixstack.tasks.bytecount`,
docs/data.md#bits-per-byte-and-perplexity).
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from mixstack.dsl.errors import MixstackError
from mixstack.dsl.registry import register_task
from mixstack.dsl.spec import ModelSpec, Problem, TaskConfig
from mixstack.tasks.base import IGNORE_INDEX, Sample, Split, Task
from mixstack.tasks.bytecount import (
    BITS_PER_BYTE,
    TARGET_BYTES,
    byte_table,
    target_bytes,
    tokenizer_table,
)

BUNDLED = "corpus.txt"
_PARAGRAPH_BREAK = re.compile(rb"\n[ \t\r]*\n")


class TextTask(TaskConfig):
    """Byte-level language modelling on local UTF-8 text files (no downloads).

    Documents (files, or paragraphs) are encoded as bytes followed by ``eos`` when the
    model has that special token, concatenated, split into train (first part) and
    validation (last ``val_fraction``), and packed into rows of ``seq_len`` with
    ``seq_idx`` marking document boundaries. causal_lm predicts the next byte; encoder
    trains masked-LM (``train.mlm``).
    """

    archs: ClassVar[tuple[str, ...]] = ("causal_lm", "encoder")
    type: Literal["text"] = "text"
    seq_len: int = Field(256, ge=3, description="tokens per packed row (<= model.max_seq_len)")
    files: list[str] = Field(
        default_factory=list,
        description="UTF-8 text files (relative to the working directory); "
        "empty: the small corpus bundled with mixstack",
    )
    documents: Literal["file", "paragraph"] = Field(
        "file", description="a document is a whole file, or a paragraph (blank-line separated)"
    )
    val_fraction: float = Field(
        0.1, gt=0, lt=1, description="last fraction of the bytes, for validation"
    )
    val_size: int | None = Field(
        None, ge=1, description="validation rows (consecutive, fixed); null: all of them"
    )
    tokenizer: str = Field(
        "byte",
        description="'byte' (ids are the UTF-8 bytes), or a tokenizer.json (or its folder); "
        "with a tokenizer model.special_tokens must be [] and model.vocab_size its size",
    )
    shards: str | None = Field(
        None,
        description="a folder from `mixstack data prepare` (made from files with the same "
        "tokenizer), read instead of the files when set",
    )

    @classmethod
    def examples(cls) -> list[TextTask]:
        return [cls(seq_len=32, val_size=4), cls(seq_len=16, documents="paragraph", val_size=4)]

    def check(self, model: ModelSpec) -> list[Problem]:
        out = super().check(model)
        if self.tokenizer != "byte":
            if model.special_tokens:
                out.append(
                    (
                        ("tokenizer",),
                        f"with a tokenizer the special tokens come from it, but "
                        f"model.special_tokens is {list(model.special_tokens)}",
                        "model.special_tokens: []",
                    )
                )
        elif model.vocab_size < 256:
            out.append(
                (
                    ("type",),
                    f"byte-level text needs ids 0..255 but the model's vocab_size is "
                    f"{model.vocab_size}",
                    "model.vocab_size >= 256",
                )
            )
        return out


def bundled_corpus() -> bytes:
    """The small English text shipped as ``mixstack/tasks/corpus.txt`` (written for mixstack)."""
    return resources.files("mixstack.tasks").joinpath(BUNDLED).read_bytes()


def read_sources(files: list[str]) -> list[tuple[str, bytes]]:
    """``(name, bytes)`` of each file, or of the bundled corpus when ``files`` is empty."""
    if not files:
        return [(f"<bundled {BUNDLED}>", bundled_corpus())]
    out = []
    for i, name in enumerate(files):
        path = Path(name).expanduser()
        if not path.is_file():
            raise MixstackError(
                f"train.task.files[{i}]: text file {name!r} does not exist "
                f"(resolved to {path.resolve()}; relative paths start at the working directory)"
            )
        out.append((name, path.read_bytes()))
    return out


def split_documents(sources: list[tuple[str, bytes]], documents: str) -> list[bytes]:
    """Files -> documents: each file whole, or its non-empty paragraphs."""
    if documents == "file":
        return [data for _, data in sources if data]
    docs: list[bytes] = []
    for _, data in sources:
        docs.extend(p.strip() for p in _PARAGRAPH_BREAK.split(data) if p.strip())
    return docs


def encode(docs: list[bytes], eos_id: int | None) -> tuple[Tensor, Tensor]:
    """Documents -> ``(tokens (N,), doc (N,))`` int64 streams; ``eos_id`` ends each one."""
    tokens, doc_ids = [], []
    for d, data in enumerate(docs):
        ids = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        if eos_id is not None:
            ids = torch.cat([ids, torch.tensor([eos_id])])
        tokens.append(ids)
        doc_ids.append(torch.full_like(ids, d))
    if not tokens:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.cat(tokens), torch.cat(doc_ids)


def window(tokens: Tensor, docs: Tensor, start: int, seq_len: int) -> Sample:
    """One packed row from ``seq_len + 1`` tokens at ``start`` of the streams."""
    toks = tokens[start : start + seq_len + 1]  # (L + 1,)
    ids = docs[start : start + seq_len + 1]
    labels = toks[1:].clone()
    labels[ids[1:] != ids[:-1]] = IGNORE_INDEX  # the next byte is another document's
    seq_idx = ids[:-1] - ids[0]  # documents numbered 0, 1, ... inside the row
    return {"input_ids": toks[:-1].clone(), "labels": labels, "seq_idx": seq_idx}


@register_task(TextTask, metrics=[BITS_PER_BYTE])
class ByteText(Task):
    """Byte-level LM over local files (see the module docstring)."""

    cfg: TextTask

    def __init__(self, cfg: TextTask, seed: int, model: ModelSpec) -> None:
        super().__init__(cfg, seed, model)
        self._shards: Any = None  # mixstack.data.shards.TokenShards when cfg.shards is set
        tokenizer = None if cfg.tokenizer == "byte" else _model_tokenizer(cfg, model)
        if cfg.shards is not None:
            self._shards = _open_shards(cfg, model, tokenizer)
            n_total = len(self._shards)
        else:
            docs = split_documents(read_sources(cfg.files), cfg.documents)
            if tokenizer is None:
                tokens, doc_ids = encode(docs, model.special_ids.get("eos"))
            else:
                tokens, doc_ids = encode_with(tokenizer, docs)
            n_total = tokens.numel()
        n_train = round(n_total * (1 - cfg.val_fraction))
        self._n_train, self._n_val = n_train, n_total - n_train
        if self._shards is None:
            self.train_tokens, self.train_docs = tokens[:n_train], doc_ids[:n_train]
            self.val_tokens, self.val_docs = tokens[n_train:], doc_ids[n_train:]
        self._check_sizes()
        self._token_bytes = _bytes_per_id(tokenizer, model)

    def _window(self, split: Split, start: int) -> Sample:
        """The row at ``start`` of the split's part of the stream (memory or shards)."""
        L = self.cfg.seq_len
        if self._shards is not None:
            return shard_window(self._shards, start + (0 if split == "train" else self._n_train), L)
        if split == "train":
            return window(self.train_tokens, self.train_docs, start, L)
        return window(self.val_tokens, self.val_docs, start, L)

    def _check_sizes(self) -> None:
        need = self.cfg.seq_len + 1
        for what, n in (("training", self._n_train), ("validation", self._n_val)):
            if n < need:
                raise MixstackError(
                    f"train.task: the {what} part of the text has {n} tokens, "
                    f"fewer than seq_len + 1 = {need}; use more text, a shorter seq_len or "
                    f"another val_fraction (now {self.cfg.val_fraction})"
                )

    @property
    def val_size(self) -> int:
        rows = (self._n_val - 1) // self.cfg.seq_len
        return rows if self.cfg.val_size is None else min(rows, self.cfg.val_size)

    @property
    def epoch_size(self) -> int:
        """Rows in one pass over the training text (rows start at random offsets)."""
        return max(1, (self._n_train - 1) // self.cfg.seq_len)

    def sample(self, split: Split, step: int, index: int) -> Sample:
        L = self.cfg.seq_len
        if split == "val":
            row = self._window(split, index * L)
            row[TARGET_BYTES] = target_bytes(row["labels"], self._token_bytes)  # bits_per_byte
            return row
        high = self._n_train - L  # starts 0..N-L-1 leave L + 1 tokens
        start = int(torch.randint(high, (1,), generator=self.generator(split, step, index)))
        return self._window(split, start)


def _bytes_per_id(tokenizer: Any, model: ModelSpec) -> Tensor:
    """``(total_vocab,)``: the UTF-8 bytes each id spells (:mod:`mixstack.tasks.bytecount`)."""
    if tokenizer is None:
        return byte_table(model.total_vocab)
    return tokenizer_table(tokenizer, model.total_vocab)


def _model_tokenizer(cfg: TextTask, model: ModelSpec) -> Any:
    """The task's tokenizer.json, checked against the model's vocabulary."""
    from mixstack.data.shards import open_tokenizer

    tokenizer, info = open_tokenizer(cfg.tokenizer, None)
    if info.size != model.vocab_size:
        raise MixstackError(
            f"train.task.tokenizer: {cfg.tokenizer!r} has {info.size} ids but "
            f"model.vocab_size is {model.vocab_size}; set model.vocab_size: {info.size}"
        )
    return tokenizer


def encode_with(tokenizer: Any, docs: list[bytes]) -> tuple[Tensor, Tensor]:
    """Documents -> ``(tokens (N,), doc (N,))`` with a tokenizer; its eos ends each one."""
    eos = tokenizer.eos_token_id
    tokens, doc_ids = [], []
    for d, data in enumerate(docs):
        ids = tokenizer.encode(data.decode("utf-8")) + ([] if eos is None else [eos])
        tokens.append(torch.tensor(ids, dtype=torch.long))
        doc_ids.append(torch.full((len(ids),), d, dtype=torch.long))
    if not tokens:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.cat(tokens), torch.cat(doc_ids)


def _open_shards(cfg: TextTask, model: ModelSpec, tokenizer: Any) -> Any:
    """Open ``cfg.shards``, refusing shards made with another tokenizer than the model's."""
    from mixstack.data.shards import TokenShards, sha256_file

    shards = TokenShards(cfg.shards or "")
    made = shards.tokenizer
    where = f"train.task.shards: {cfg.shards!r}"
    if cfg.tokenizer == "byte":
        eos = model.special_ids.get("eos")
        if made["kind"] != "byte" or made["eos_id"] != eos:
            raise MixstackError(
                f"{where} was made with {made['kind']} tokens (eos id {made['eos_id']}) but "
                f"the model reads bytes with eos id {eos}; prepare the shards again with "
                f"this spec, or set train.task.tokenizer"
            )
    else:
        path = Path(cfg.tokenizer).expanduser()
        path = path / "tokenizer.json" if path.is_dir() else path
        if made["sha256"] != sha256_file(path):
            raise MixstackError(
                f"{where} was made with another tokenizer (sha256 {made['sha256']}) than "
                f"train.task.tokenizer {cfg.tokenizer!r}; prepare them again with it"
            )
    return shards


def shard_window(shards: Any, start: int, seq_len: int) -> Sample:
    """One packed row from ``seq_len + 1`` tokens at ``start`` of a shard folder's stream;
    the document of each position comes from the document table's start column."""
    import numpy as np

    stop = start + seq_len + 1
    toks = torch.from_numpy(shards.tokens(start, stop))  # (L + 1,) int64
    firsts = shards.table[:, 0]  # (D,) first token of each document
    docs = np.searchsorted(firsts, np.arange(start, stop), side="right") - 1
    return window(toks, torch.from_numpy(docs.astype(np.int64)), 0, seq_len)
