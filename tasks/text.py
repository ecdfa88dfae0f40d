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

With ``tokenizer: PATH`` (a ``tokenizer.json``) or a Hub id the documents are that tokenizer's ids
and its own eos ends each one; ``shards: DIR`` reads a stream prepared once by
``mixstack data prepare`` (:mod:`mixstack.data.shards`, memory-mapped) instead of the
files, packed the same way. ``sources`` (text / JSON lines / Parquet files, Hub
datasets; :mod:`mixstack.data.corpus`) replace ``files``: each training source is its
own part of the stream, a training row draws its source by weight and then its start,
and validation is ``val_sources`` or a hash carve. See docs/data.md#training-on-shards.

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

from mixstack.data.corpus import TextSource, weight_problems
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
        0.1,
        gt=0,
        lt=1,
        description="for validation: the last fraction of the tokens (files), or the share "
        "of each source's documents carved by hash (sources without val_sources)",
    )
    val_size: int | None = Field(
        None, ge=1, description="validation rows (consecutive, fixed); null: all of them"
    )
    tokenizer: str = Field(
        "byte",
        description="'byte' (ids are the UTF-8 bytes), a tokenizer.json (or its folder), or "
        "a Hub id hf://ORG/NAME[@REV] (its tokenizer.json, through the huggingface_hub cache); "
        "with a tokenizer model.special_tokens must be [] and model.vocab_size its size",
    )
    sources: list[TextSource] = Field(
        default_factory=list,
        description="corpus sources (local text / JSON lines / Parquet files, Hub datasets) "
        "mixed by weight; instead of files",
    )
    val_sources: list[TextSource] = Field(
        default_factory=list,
        description="validation sources (with sources); empty: carved from sources by hash",
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
        out.extend(self._source_problems())
        if self.tokenizer != "byte":
            out.extend(self._tokenizer_problems(model))
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

    def _source_problems(self) -> list[Problem]:
        out: list[Problem] = []
        if self.sources and self.files:
            out.append((("sources",), "give files or sources, not both", "one of them"))
        if self.val_sources and not self.sources:
            out.append((("val_sources",), "val_sources need sources (training)", None))
        out += [(path, message, None) for path, message in weight_problems(self.sources)]
        return out

    def _tokenizer_problems(self, model: ModelSpec) -> list[Problem]:
        """The tokenizer against the model when it is on disk already (a local file, or a
        Hub id in the cache); an uncached Hub id or a file not made yet is checked before
        step 0."""
        from mixstack.data import tokenizer_ref

        try:
            path = tokenizer_ref.locate(self.tokenizer, download=False)
            if path is None:
                return []
            found = tokenizer_ref.facts(path)
            tokenizer_ref.require_eos(self.tokenizer, found)
        except tokenizer_ref.MissingTokenizerFile:
            # Not made yet (a spec may name the tokenizer an earlier step trains, as `files`
            # may name data to come): checked when the task is built, before step 0.
            return []
        except MixstackError as exc:
            return [(("tokenizer",), str(exc), "'byte', a tokenizer.json or hf://ORG/NAME")]
        problem = vocab_problem(self.tokenizer, found.size, model)
        return [] if problem is None else [problem]


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
        tokenizer, self.tokenizer_json = None, None
        if cfg.tokenizer != "byte":
            tokenizer, self.tokenizer_json = _model_tokenizer(cfg, model)
        parts: list[dict[str, Any]] | None = None
        if cfg.shards is not None:
            self._shards = _open_shards(cfg, model, self.tokenizer_json)
            n_total = len(self._shards)
            parts = _shard_parts(cfg, self._shards)
        else:
            corpus = None
            if cfg.sources:
                from mixstack.data.corpus import gather

                corpus = gather(
                    cfg.sources,
                    cfg.val_sources,
                    documents=cfg.documents,
                    val_fraction=cfg.val_fraction,
                )
                docs = [text.encode("utf-8") for _, text in corpus.docs]
            else:
                docs = split_documents(read_sources(cfg.files), cfg.documents)
            if tokenizer is None:
                tokens, doc_ids = encode(docs, model.special_ids.get("eos"))
            else:
                tokens, doc_ids = encode_with(tokenizer, docs)
            n_total = tokens.numel()
            self._tokens, self._docs = tokens, doc_ids
            if corpus is not None:
                from mixstack.data.corpus import token_parts

                counts = torch.bincount(doc_ids, minlength=len(docs))  # (D,)
                starts = (torch.cumsum(counts, 0) - counts).tolist()
                parts = token_parts(corpus.parts, starts, n_total)
        if parts is None:  # files: the last val_fraction of the stream validates
            n_train = round(n_total * (1 - cfg.val_fraction))
            self._train_parts, self._val_part = [(0, n_train)], (n_train, n_total)
            self._weights = [1.0]
        else:
            from mixstack.data.corpus import weights_of

            self._train_parts = [(p["start"], p["stop"]) for p in parts if p["split"] == "train"]
            (self._val_part,) = [(p["start"], p["stop"]) for p in parts if p["split"] == "val"]
            self._weights = weights_of(cfg.sources)
        self._n_train = sum(hi - lo for lo, hi in self._train_parts)
        self._n_val = self._val_part[1] - self._val_part[0]
        if self._shards is None and parts is None:
            n_train = self._train_parts[0][1]
            self.train_tokens, self.train_docs = tokens[:n_train], doc_ids[:n_train]
            self.val_tokens, self.val_docs = tokens[n_train:], doc_ids[n_train:]
        self._check_sizes()
        self._token_bytes = _bytes_per_id(tokenizer, model)

    def _window(self, start: int) -> Sample:
        """The row at ``start`` of the whole stream (memory or shards)."""
        L = self.cfg.seq_len
        if self._shards is not None:
            return shard_window(self._shards, start, L)
        return window(self._tokens, self._docs, start, L)

    def _check_sizes(self) -> None:
        need = self.cfg.seq_len + 1
        sized = [("training", self._n_train), ("validation", self._n_val)]
        if len(self._train_parts) > 1 or self.cfg.sources:
            sized = [
                (f"source {i} (train.task.sources[{i}]) training", hi - lo)
                for i, (lo, hi) in enumerate(self._train_parts)
            ] + sized[1:]
        for what, n in sized:
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
            row = self._window(self._val_part[0] + index * L)
            row[TARGET_BYTES] = target_bytes(row["labels"], self._token_bytes)  # bits_per_byte
            return row
        g = self.generator(split, step, index)
        k = 0
        if len(self._train_parts) > 1:  # a source by weight, from the same generator
            u = float(torch.rand((), generator=g))
            cumulative = torch.tensor(self._weights, dtype=torch.float64).cumsum(0)
            k = min(int((cumulative <= u).sum()), len(self._train_parts) - 1)
        lo, hi = self._train_parts[k]
        # starts lo..hi-L-1 leave L + 1 tokens inside the source's part
        start = lo + int(torch.randint(hi - lo - L, (1,), generator=g))
        return self._window(start)


def _bytes_per_id(tokenizer: Any, model: ModelSpec) -> Tensor:
    """``(total_vocab,)``: the UTF-8 bytes each id spells (:mod:`mixstack.tasks.bytecount`)."""
    if tokenizer is None:
        return byte_table(model.total_vocab)
    return tokenizer_table(tokenizer, model.total_vocab)


def _model_tokenizer(cfg: TextTask, model: ModelSpec) -> tuple[Any, Path]:
    """The task's tokenizer (a Hub id is downloaded now when the cache lacks it) and its
    ``tokenizer.json``, checked against the model's vocabulary."""
    from mixstack.data.shards import open_tokenizer

    tokenizer, info = open_tokenizer(cfg.tokenizer, None)
    problem = vocab_problem(cfg.tokenizer, info.size, model)
    if problem is not None:
        raise MixstackError(f"train.task.tokenizer: {problem[1]}; {problem[2]}")
    return tokenizer, tokenizer_path(cfg.tokenizer)


def tokenizer_path(text: str) -> Path:
    """The ``tokenizer.json`` a non-byte ``tokenizer:`` names (downloaded if needed)."""
    from mixstack.data.tokenizer_ref import locate

    path = locate(text, download=True)
    assert path is not None
    return path


def vocab_problem(text: str, size: int, model: ModelSpec) -> Problem | None:
    """``model.vocab_size`` against a tokenizer of ``size`` ids (the embedding itself is
    padded to ``pad_vocab_multiple`` rows by the model, not by the spec)."""
    if size == model.vocab_size:
        return None
    return (
        ("tokenizer",),
        f"tokenizer {text!r} has {size} ids but model.vocab_size is {model.vocab_size}",
        f"model.vocab_size: {size} (the embedding is padded to a multiple of "
        f"model.pad_vocab_multiple = {model.pad_vocab_multiple} by itself)",
    )


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


def _open_shards(cfg: TextTask, model: ModelSpec, tokenizer_json: Path | None) -> Any:
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
        if tokenizer_json is None or made["sha256"] != sha256_file(tokenizer_json):
            raise MixstackError(
                f"{where} was made with another tokenizer (sha256 {made['sha256']}) than "
                f"train.task.tokenizer {cfg.tokenizer!r}; prepare them again with it"
            )
    return shards


def _shard_parts(cfg: TextTask, shards: Any) -> list[dict[str, Any]] | None:
    """The shards' parts, which must match how the task reads its corpus."""
    from mixstack.data.corpus import check_shard_sources

    parts = shards.parts
    where = f"train.task.shards: {cfg.shards!r}"
    if parts is None and cfg.sources:
        raise MixstackError(
            f"{where} were prepared from train.task.files (one stream) but the task reads "
            f"sources; prepare them again with this spec"
        )
    if parts is not None and not cfg.sources:
        made = [s["source"] for s in shards.manifest["sources"]]
        raise MixstackError(
            f"{where} were prepared from sources {made} but the task sets none; copy them "
            f"to train.task.sources (and val_sources)"
        )
    if parts is not None:
        check_shard_sources(cfg, shards.manifest, where)
    return parts


def shard_window(shards: Any, start: int, seq_len: int) -> Sample:
    """One packed row from ``seq_len + 1`` tokens at ``start`` of a shard folder's stream;
    the document of each position comes from the document table's start column."""
    import numpy as np

    stop = start + seq_len + 1
    toks = torch.from_numpy(shards.tokens(start, stop))  # (L + 1,) int64
    firsts = shards.table[:, 0]  # (D,) first token of each document
    docs = np.searchsorted(firsts, np.arange(start, stop), side="right") - 1
    return window(toks, torch.from_numpy(docs.astype(np.int64)), 0, seq_len)
