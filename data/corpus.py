"""Text corpora of the text task's ``sources``: local text, JSON lines or Parquet files,
or Hub datasets (through the ``datasets`` library and its cache), mixed by weight, with
a validation split given as its own sources or carved by document hash.

Documents are laid out in one stream in a fixed order: the training documents of
source 0, of source 1, ..., then every validation document. Each training source is
thus one contiguous *part* of the stream, and the validation documents another, so a
training row is drawn as: a source by its weight, then a start inside that source's
part, both from the generator of ``(seed, step, index)`` (resume and DDP stay exact),
and a row never mixes sources. Empty documents are dropped (a file, a JSON row or a
paragraph with no text); the manifest of a shard folder counts them per source.

Carving: without ``val_sources`` a document is validation when the first 8 bytes of
the sha256 of its UTF-8 text, read as an integer, fall below ``val_fraction · 2**64`` —
independent of order and of the other documents, and identical documents always land
on the same side.

``datasets`` is imported only inside the functions that read JSON lines, Parquet or a
Hub dataset; a plain text file is read as bytes (its line endings kept exactly, which
the ``datasets`` text builder would translate).
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from mixstack.dsl.errors import MixstackError
from mixstack.dsl.spec import StrictModel

WEIGHT_TOLERANCE = 1e-6
_SUFFIX_FORMAT = {
    ".txt": "text",
    ".md": "text",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
}


class CorpusError(MixstackError):
    """A text source that cannot be read as asked."""


class TextSource(StrictModel):
    """One corpus source of the text task: a local file or a Hub dataset."""

    path: str | None = Field(
        None, description="a local file: UTF-8 text, JSON lines (.jsonl/.json) or Parquet"
    )
    dataset: str | None = Field(
        None, description="a Hub dataset id ORG/NAME, read through the datasets cache"
    )
    format: Literal["auto", "text", "jsonl", "parquet"] = Field(
        "auto", description="how to read `path` (auto: by its suffix, else text)"
    )
    text_field: str = Field(
        "text", min_length=1, description="the column holding the text (JSON lines, Parquet, Hub)"
    )
    name: str | None = Field(None, description="the Hub dataset's configuration")
    split: str = Field("train", min_length=1, description="the Hub dataset's split")
    revision: str | None = Field(None, description="the Hub dataset's branch, tag or commit")
    weight: float | None = Field(
        None,
        gt=0,
        le=1,
        description="share of training rows from this source; all set (summing to 1) or "
        "none (equal shares); not used by val_sources",
    )

    @model_validator(mode="after")
    def _one_origin(self) -> TextSource:
        if (self.path is None) == (self.dataset is None):
            raise ValueError("give exactly one of `path` (a local file) or `dataset` (a Hub id)")
        if self.dataset is not None and self.format != "auto":
            raise ValueError("`format` applies to a local `path`, not to a Hub `dataset`")
        return self

    def kind(self) -> str:
        """``text``, ``jsonl``, ``parquet`` (a local file) or ``hub``."""
        if self.dataset is not None:
            return "hub"
        if self.format != "auto":
            return self.format
        return _SUFFIX_FORMAT.get(Path(self.path or "").suffix.lower(), "text")

    def identity(self) -> dict[str, Any]:
        """What makes the documents (the weight does not): recorded in a shard manifest
        and compared when training reads the shards."""
        out = self.model_dump(exclude={"weight", "format"}, exclude_none=True)
        out["format"] = self.kind()
        return out


def weight_problems(sources: Sequence[TextSource]) -> list[tuple[tuple[str | int, ...], str]]:
    """Mixing weights: all given and summing to 1, or none given."""
    given = [s.weight is not None for s in sources]
    if not any(given):
        return []
    if not all(given):
        missing = [i for i, g in enumerate(given) if not g]
        return [
            (
                ("sources", missing[0], "weight"),
                f"weights are set on some sources but not on {missing}; set every weight "
                f"(summing to 1) or none (equal shares)",
            )
        ]
    total = sum(float(s.weight or 0.0) for s in sources)
    if abs(total - 1.0) > WEIGHT_TOLERANCE:
        weights = [s.weight for s in sources]
        return [(("sources",), f"the mixing weights {weights} sum to {total:g}, not 1")]
    return []


def weights_of(sources: Sequence[TextSource]) -> list[float]:
    if all(s.weight is None for s in sources):
        return [1.0 / len(sources)] * len(sources)
    return [float(s.weight or 0.0) for s in sources]


def in_validation(text: str, fraction: float) -> bool:
    """The deterministic carve (see the module docstring)."""
    head = hashlib.sha256(text.encode("utf-8")).digest()[:8]
    return int.from_bytes(head, "big") < fraction * 2**64


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[Any]:
    try:
        import datasets
    except ImportError as exc:  # an optional extra
        raise CorpusError(
            "JSON lines, Parquet and Hub sources need the `datasets` package: "
            "pip install 'mixstack[data]'"
        ) from exc
    from datasets.utils import logging as ds_logging

    was_enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield datasets
    finally:
        if was_enabled:
            ds_logging.enable_progress_bar()


def _column(src: TextSource, where: str) -> tuple[list[str], dict[str, Any]]:
    """The text column of a JSON lines / Parquet file or a Hub dataset, and what
    identifies the data read (a local digest or the dataset's fingerprint)."""
    kind = src.kind()
    with _quiet_datasets() as datasets, contextlib.ExitStack() as stack:
        try:
            if kind == "hub":
                table = datasets.load_dataset(
                    src.dataset, src.name, split=src.split, revision=src.revision
                )
                record = {"fingerprint": getattr(table, "_fingerprint", None)}
            else:
                path = _local(src, where)
                # local files are re-read each time: their arrow cache is temporary
                cache = stack.enter_context(tempfile.TemporaryDirectory(prefix="mixstack-ds-"))
                builder = "json" if kind == "jsonl" else "parquet"
                table = datasets.load_dataset(
                    builder, data_files=str(path), split="train", cache_dir=cache
                )
                record = _file_record(path)
            columns = list(table.column_names)
            if src.text_field not in columns:
                raise CorpusError(
                    f"{where}: no column {src.text_field!r} (text_field) in {_origin(src)}; "
                    f"its columns: {', '.join(columns) or 'none'}"
                )
            values = list(table[src.text_field])
        except MixstackError:
            raise
        except Exception as exc:  # datasets / arrow errors on a malformed file or id
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CorpusError(f"{where}: cannot read {_origin(src)} ({first})") from None
    for row, value in enumerate(values):
        if value is not None and not isinstance(value, str):
            raise CorpusError(
                f"{where}: row {row} of {_origin(src)} has a {type(value).__name__} in "
                f"{src.text_field!r}, not text"
            )
    return [v for v in values if v is not None], record


def _origin(src: TextSource) -> str:
    return f"file {src.path!r}" if src.path is not None else f"dataset {src.dataset!r}"


def _local(src: TextSource, where: str) -> Path:
    path = Path(src.path or "").expanduser()
    if not path.is_file():
        raise CorpusError(
            f"{where}.path: {src.path!r} is not a file (resolved to {path.resolve()}; "
            f"relative paths start at the working directory)"
        )
    return path


def _file_record(path: Path) -> dict[str, Any]:
    from mixstack.data.shards import sha256_file

    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def read_source(src: TextSource, where: str, documents: str) -> tuple[list[str], dict[str, Any]]:
    """The documents of one source (``documents``: a text file whole, or its paragraphs;
    a row of a table is one document) with empty ones dropped, and a record of what was
    read (digest, counts)."""
    if src.kind() == "text":
        from mixstack.data.bpe import read_texts
        from mixstack.tasks.text import split_documents

        path = _local(src, where)
        ((_, text),) = read_texts([path], what=f"{where}.path")
        docs = [d.decode("utf-8") for d in split_documents([(str(path), text.encode())], documents)]
        record = _file_record(path)
        rows = 1 if documents == "file" else len(docs)
    else:
        values, record = _column(src, where)
        docs = [v for v in values if v]
        rows = len(values)
    record.update({"rows": rows, "empty_dropped": rows - len(docs)})
    if not docs:
        raise CorpusError(f"{where}: {_origin(src)} holds no documents ({rows} row(s), all empty)")
    return docs, record


@dataclass
class Corpus:
    """Documents in stream order with their source index, and the parts they form."""

    docs: list[tuple[int, str]] = field(default_factory=list)
    # {"split": "train"|"val", "source": i or None, "documents": [first, stop)}
    parts: list[dict[str, Any]] = field(default_factory=list)
    # per source (training sources, then val_sources): identity, role, record, counts
    sources: list[dict[str, Any]] = field(default_factory=list)


def gather(
    sources: Sequence[TextSource],
    val_sources: Sequence[TextSource],
    *,
    documents: str,
    val_fraction: float,
) -> Corpus:
    """Read every source and lay the documents out (see the module docstring)."""
    train: list[list[str]] = []
    val: list[tuple[int, str]] = []
    out = Corpus()
    for i, src in enumerate(sources):
        where = f"train.task.sources[{i}]"
        docs, record = read_source(src, where, documents)
        if val_sources:
            kept = docs
        else:
            kept = [d for d in docs if not in_validation(d, val_fraction)]
            val += [(i, d) for d in docs if in_validation(d, val_fraction)]
            if not kept:
                raise CorpusError(
                    f"{where}: all {len(docs)} document(s) of {_origin(src)} fell into the "
                    f"validation carve (val_fraction {val_fraction}); add documents, lower "
                    f"val_fraction or give val_sources"
                )
        train.append(kept)
        out.sources.append({"role": "train", "source": src.identity(), **record})
    for j, src in enumerate(val_sources):
        docs, record = read_source(src, f"train.task.val_sources[{j}]", documents)
        val += [(len(sources) + j, d) for d in docs]
        out.sources.append({"role": "val", "source": src.identity(), **record})
    if not val:
        raise CorpusError(
            f"train.task: the validation carve (val_fraction {val_fraction}) took none of "
            f"the {sum(map(len, train))} documents; raise val_fraction or give val_sources"
        )
    for i, docs in enumerate(train):
        first = len(out.docs)
        out.docs += [(i, d) for d in docs]
        out.parts.append({"split": "train", "source": i, "documents": [first, len(out.docs)]})
    first = len(out.docs)
    out.docs += val
    out.parts.append({"split": "val", "source": None, "documents": [first, len(out.docs)]})
    return out


def token_parts(parts: list[dict[str, Any]], starts: Sequence[int], total: int) -> list[dict]:
    """``parts`` with their token range ``[start, stop)``; ``starts[d]`` is document
    ``d``'s first token in the stream of ``total`` tokens."""
    out = []
    for part in parts:
        a, b = part["documents"]
        start = int(starts[a]) if a < len(starts) else total
        stop = int(starts[b]) if b < len(starts) else total
        out.append({**part, "start": start, "stop": stop})
    return out


def val_split_record(val_sources: Sequence[TextSource], val_fraction: float) -> dict[str, Any]:
    """How the validation documents were chosen (recorded, and compared on reading)."""
    if val_sources:
        return {"given": len(val_sources)}
    return {"carved_by_hash": val_fraction}


def prepare_corpus(
    task: Any,
    out: str | Path,
    *,
    tokenizer: str | Path,
    special_ids: dict[str, int] | None,
    overwrite: bool = False,
    progress: Any = None,
    shard_tokens: int | None = None,
) -> Path:
    """Tokenise a text task's ``sources`` / ``val_sources`` once into a shard folder
    whose manifest records the parts (see :mod:`mixstack.data.shards`)."""
    from mixstack.data import shards

    out = Path(out).expanduser()
    shards._check_target(out, overwrite)
    tok, info = shards.open_tokenizer(tokenizer, special_ids)
    corpus = gather(
        task.sources, task.val_sources, documents=task.documents, val_fraction=task.val_fraction
    )
    extra = {
        "documents_from": task.documents,
        "val_split": val_split_record(task.val_sources, task.val_fraction),
    }
    return shards.write_shards(
        out,
        tok,
        info,
        corpus.docs,
        corpus.sources,
        extra,
        shard_tokens or shards.SHARD_TOKENS,
        progress,
        parts=corpus.parts,
    )


def check_shard_sources(task: Any, manifest: dict[str, Any], where: str) -> None:
    """Shards read by a task with ``sources`` must come from the same sources (in the
    same order) and the same validation split; the weights may differ."""
    want = [("train", s.identity()) for s in task.sources]
    want += [("val", s.identity()) for s in task.val_sources]
    have = [(s.get("role"), s.get("source")) for s in manifest.get("sources", [])]
    if want != have:
        raise CorpusError(
            f"{where} was prepared from other sources ({[h[1] for h in have]}) than "
            f"train.task.sources / val_sources ({[w[1] for w in want]}); prepare them again "
            f"with this spec"
        )
    split = val_split_record(task.val_sources, task.val_fraction)
    if manifest.get("val_split") != split:
        raise CorpusError(
            f"{where} holds the validation split {manifest.get('val_split')} but the task asks "
            f"for {split}; prepare them again with this spec"
        )
