"""Memory-mapped token shards: a corpus tokenised once, read by position.

A shard folder holds::

    manifest.json       format, dtype, tokenizer (kind, sha256, size, eos id), the sources
                        with their sha256 and byte counts, per-source document, token
                        and byte totals, the shard files with their token counts; from
                        a task's ``sources`` also ``parts`` (token ranges of each
                        training source and of validation, :mod:`mixstack.data.corpus`)
    documents.npy       int64 (D, 4): per document its first token in the stream, its
                        token count (the trailing eos included), its UTF-8 byte count and
                        the index of its source file (saved without pickle)
    shard-00000.bin ... the token stream, raw little-endian uint16 (largest id, specials
                        included, below 65,536) or uint32, cut every ``shard_tokens``

The stream is the documents one after another (empty ones dropped), each followed by
the tokenizer's ``eos`` id when it has one. A document never loses bytes:
``decode(tokens of document d)`` is its text (specials skipped). The folder is written
in a temporary sibling and renamed into place, so a failed run leaves nothing behind
and an old folder stays whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixstack.dsl.errors import MixstackError

FORMAT = "mixstack-token-shards"
VERSION = 1
MANIFEST = "manifest.json"
DOCUMENTS = "documents.npy"
SHARD_TOKENS = 1 << 28  # 512 MiB of uint16 per shard file
UINT16_LIMIT = 1 << 16

# (documents done, documents in all, tokens so far) after each document
Progress = Callable[[int, int, int], None]


class ShardError(MixstackError):
    """A shard folder cannot be written or read as asked."""


def _np() -> Any:
    try:
        import numpy
    except ImportError as exc:
        raise ShardError("token shards need numpy: pip install 'mixstack[data]'") from exc
    return numpy


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def dtype_for(largest_id: int) -> str:
    """``uint16`` when every id (specials included) fits, else ``uint32``."""
    return "uint16" if largest_id < UINT16_LIMIT else "uint32"


@dataclass(frozen=True)
class TokenizerInfo:
    """What the shards were tokenised with (recorded in the manifest)."""

    kind: str  # "byte" or "tokenizer.json"
    sha256: str | None  # of tokenizer.json; None for byte-level
    size: int  # ids 0..size-1
    eos_id: int | None


def open_tokenizer(
    tokenizer: str | Path, special_ids: dict[str, int] | None
) -> tuple[Any, TokenizerInfo]:
    """``(tokenizer, info)`` for ``"byte"``, a ``tokenizer.json`` path (or its folder) or a
    Hub id (downloaded into the huggingface_hub cache when missing); a non-byte tokenizer
    must name an eos token (:mod:`mixstack.data.tokenizer_ref`)."""
    from mixstack.data import tokenizer_ref
    from mixstack.generation.tokenizers import ByteTokenizer, HFTokenizer

    if str(tokenizer) == "byte":
        byte = ByteTokenizer(special_ids)
        largest = max([255, *byte.special_ids.values()])
        return byte, TokenizerInfo("byte", None, largest + 1, byte.eos_token_id)
    try:
        path = tokenizer_ref.locate(str(tokenizer), download=True)
    except tokenizer_ref.TokenizerRefError as exc:
        raise ShardError(str(exc)) from None
    assert path is not None
    found = tokenizer_ref.facts(path)
    eos = tokenizer_ref.require_eos(str(tokenizer), found)
    hf = HFTokenizer.from_file(path)
    hf.eos_token_id = eos
    return hf, TokenizerInfo("tokenizer.json", sha256_file(path), found.size, eos)


def read_documents(files: Sequence[str | Path], documents: str) -> list[tuple[int, str]]:
    """``(source index, text)`` per document: each whole file, or each file's paragraphs;
    empty ones dropped (an empty file, a blank paragraph), as the text task's file
    reader does."""
    from mixstack.data.bpe import read_texts
    from mixstack.tasks.text import split_documents

    texts = read_texts(files, what="train.task.files")
    out = []
    for i, (name, text) in enumerate(texts):
        pieces = split_documents([(name, text.encode("utf-8"))], documents)
        out += [(i, p.decode("utf-8")) for p in pieces]
    return out


def prepare_shards(
    files: Sequence[str | Path],
    out: str | Path,
    *,
    tokenizer: str | Path = "byte",
    special_ids: dict[str, int] | None = None,
    documents: str = "file",
    shard_tokens: int = SHARD_TOKENS,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Tokenise ``files`` once into the shard folder ``out`` (see the module docstring).

    ``tokenizer``: ``"byte"`` (ids 0..255, specials from ``special_ids`` as a byte-level
    spec numbers them), a ``tokenizer.json`` or a Hub id. An existing non-empty ``out`` is
    replaced only with ``overwrite`` and only when it is a shard folder.
    """
    if shard_tokens < 1:
        raise ShardError(f"shard_tokens must be >= 1, got {shard_tokens}")
    if not files:
        raise ShardError("data prepare: train.task.files is empty; name the corpus files")
    out = Path(out).expanduser()
    _check_target(out, overwrite)
    tok, info = open_tokenizer(tokenizer, special_ids)
    docs = read_documents(files, documents)
    if not docs:
        raise ShardError(
            f"data prepare: the corpus has no documents ({len(files)} file(s), "
            f"documents: {documents}); every file is empty or blank"
        )
    sources = []
    for name in files:
        path = Path(name).expanduser()
        sources.append(
            {"file": str(name), "sha256": sha256_file(path), "bytes": path.stat().st_size}
        )
    return write_shards(
        out, tok, info, docs, sources, {"documents_from": documents}, shard_tokens, progress
    )


def write_shards(
    out: Path,
    tok: Any,
    info: TokenizerInfo,
    docs: list[tuple[int, str]],
    sources: list[dict[str, Any]],
    extra: dict[str, Any],
    shard_tokens: int = SHARD_TOKENS,
    progress: Progress | None = None,
    parts: list[dict[str, Any]] | None = None,
) -> Path:
    """Write ``docs`` (``(source index, text)`` in stream order) as a shard folder at
    ``out`` (checked by the caller), atomically. ``sources[i]`` describes source ``i``
    (its document, token and byte totals are added); ``parts`` (document ranges) get
    their token ranges and are recorded."""
    np = _np()
    dtype = np.dtype(dtype_for(info.size - 1)).newbyteorder("<")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(6)}.tmp")
    tmp.mkdir()
    try:
        table, shards = _write_stream(tmp, tok, info, docs, dtype, shard_tokens, progress)
        np.save(tmp / DOCUMENTS, table, allow_pickle=False)
        manifest = _manifest(sources, info, dtype, table, shards, extra)
        if parts is not None:
            from mixstack.data.corpus import token_parts

            manifest["parts"] = token_parts(parts, table[:, 0].tolist(), int(table[:, 1].sum()))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_target(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise ShardError(f"--out {out} exists and is not a folder")
    if any(out.iterdir()):
        if not (out / MANIFEST).is_file():
            raise ShardError(f"--out {out} is a non-empty folder that holds no shards; refusing")
        if not overwrite:
            raise ShardError(f"--out {out} already holds shards; pass --overwrite to replace them")


def _write_stream(
    tmp: Path,
    tok: Any,
    info: TokenizerInfo,
    docs: list[tuple[int, str]],
    dtype: Any,
    shard_tokens: int,
    progress: Progress | None,
) -> tuple[Any, list[tuple[str, int]]]:
    """Encode each document, append it (and eos) to the current shard file; returns the
    (D, 4) document table and ``[(file, tokens)]`` per shard."""
    np = _np()
    table = np.zeros((len(docs), 4), dtype=np.int64)
    shards: list[list[Any]] = []
    handle = None
    position = 0
    try:
        for d, (source, text) in enumerate(docs):
            ids = tok.encode(text)
            if info.eos_id is not None:
                ids.append(info.eos_id)
            wide = np.asarray(ids, dtype=np.int64)
            if wide.size and not 0 <= int(wide.min()) <= int(wide.max()) < info.size:
                # a broken tokenizer.json; never write ids the dtype would wrap
                raise ShardError(
                    f"document {d}: the tokenizer produced an id outside 0..{info.size - 1}"
                )
            array = wide.astype(dtype)
            table[d] = (position, array.size, len(text.encode("utf-8")), source)
            while array.size:
                if handle is None or shards[-1][1] == shard_tokens:
                    if handle is not None:
                        handle.close()
                    name = f"shard-{len(shards):05d}.bin"
                    handle = open(tmp / name, "wb")  # noqa: SIM115  (closed above and below)
                    shards.append([name, 0])
                take = min(array.size, shard_tokens - shards[-1][1])
                handle.write(array[:take].tobytes())
                shards[-1][1] += take
                array = array[take:]
            position = int(table[d, 0] + table[d, 1])
            if progress is not None:
                progress(d + 1, len(docs), position)
    finally:
        if handle is not None:
            handle.close()
    return table, [tuple(s) for s in shards]


def _manifest(
    sources: list[dict[str, Any]],
    info: TokenizerInfo,
    dtype: Any,
    table: Any,
    shards: list[tuple[str, int]],
    extra: dict[str, Any],
) -> dict[str, Any]:
    described = []
    for i, source in enumerate(sources):
        rows = table[table[:, 3] == i]
        described.append(
            {
                **source,
                "documents": int(rows.shape[0]),
                "tokens": int(rows[:, 1].sum()),
                "document_bytes": int(rows[:, 2].sum()),
            }
        )
    return {
        "format": FORMAT,
        "version": VERSION,
        "dtype": dtype.name,
        "byteorder": "little",
        **extra,
        "tokenizer": {
            "kind": info.kind,
            "sha256": info.sha256,
            "size": info.size,
            "eos_id": info.eos_id,
        },
        "sources": described,
        "documents": int(table.shape[0]),
        "tokens": int(table[:, 1].sum()),
        "shards": [{"file": name, "tokens": int(n)} for name, n in shards],
        "document_table": DOCUMENTS,
        "document_columns": ["start", "tokens", "bytes", "source"],
    }


def _swap_in(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; an old folder is moved aside first, then removed."""
    if target.exists() and not any(target.iterdir()):
        target.rmdir()
    if not target.exists():
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
    os.replace(target, old / "previous")
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


class TokenShards:
    """Read a shard folder: the token stream memory-mapped, the document table in memory.

    Opening checks the manifest's format and that every shard file has exactly the bytes
    the manifest promises (a truncated or padded shard is refused, naming the file).
    """

    def __init__(self, folder: str | Path) -> None:
        np = _np()
        self.folder = Path(folder).expanduser()
        path = self.folder / MANIFEST
        if not path.is_file():
            raise ShardError(
                f"{self.folder}: no {MANIFEST}; not a shard folder (mixstack data prepare)"
            )
        try:
            self.manifest: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ShardError(f"{path}: not readable JSON ({exc})") from None
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
            raise ShardError(
                f"{path}: format {self.manifest.get('format')!r} version "
                f"{self.manifest.get('version')!r}; expected {FORMAT!r} version {VERSION}"
            )
        self.dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        self._maps = []
        self._starts = [0]
        for entry in self.manifest["shards"]:
            file = self.folder / entry["file"]
            want = int(entry["tokens"]) * self.dtype.itemsize
            have = file.stat().st_size if file.is_file() else None
            if have != want:
                state = "is missing" if have is None else f"has {have} bytes"
                raise ShardError(
                    f"{file}: {state} but the manifest says {entry['tokens']} tokens = "
                    f"{want} bytes ({self.dtype.name}); the shard is truncated or damaged, "
                    f"prepare the folder again"
                )
            self._maps.append(np.memmap(file, dtype=self.dtype, mode="r"))
            self._starts.append(self._starts[-1] + int(entry["tokens"]))
        table_path = self.folder / self.manifest.get("document_table", DOCUMENTS)
        try:
            self.table = np.load(table_path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ShardError(f"{table_path}: not a readable document table ({exc})") from None
        n_docs = int(self.manifest["documents"])
        if self.table.shape != (n_docs, 4) or int(self.table[:, 1].sum()) != len(self):
            raise ShardError(
                f"{table_path}: shape {self.table.shape} / {int(self.table[:, 1].sum())} tokens "
                f"do not match the manifest ({n_docs} documents, {len(self)} tokens)"
            )

    def __len__(self) -> int:
        return self._starts[-1]

    @property
    def num_documents(self) -> int:
        return int(self.table.shape[0])

    @property
    def parts(self) -> list[dict[str, Any]] | None:
        """Token ranges of the training sources and of validation (a folder prepared
        from ``train.task.sources``), or None (from ``files``: one stream)."""
        parts = self.manifest.get("parts")
        return None if parts is None else [dict(p) for p in parts]

    @property
    def tokenizer(self) -> dict[str, Any]:
        return dict(self.manifest["tokenizer"])

    def tokens(self, start: int, stop: int) -> Any:
        """Tokens ``[start, stop)`` of the whole stream (across shard files), as int64."""
        np = _np()
        if not 0 <= start <= stop <= len(self):
            raise ShardError(f"token range [{start}, {stop}) outside the stream 0..{len(self)}")
        parts = []
        for k, m in enumerate(self._maps):
            lo, hi = self._starts[k], self._starts[k + 1]
            a, b = max(start, lo), min(stop, hi)
            if a < b:
                parts.append(np.asarray(m[a - lo : b - lo], dtype=np.int64))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def document(self, d: int) -> Any:
        """Token ids of document ``d`` (its trailing eos included, when the tokenizer has one)."""
        start, count = int(self.table[d, 0]), int(self.table[d, 1])
        return self.tokens(start, start + count)
