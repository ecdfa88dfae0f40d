"""Tokenizers at inference: byte-level (no files) and ``tokenizer.json`` (``tokenizers``).

Both give ``encode(text) -> ids``, ``decode(ids) -> text`` and ``stream()``, an
incremental decoder for streaming: ``push(id)`` returns the text that became final
with that token, so a multi-byte UTF-8 character split over several byte tokens (or a
byte-fallback BPE piece) is printed once, whole, when its last byte arrives, never as
replacement characters in between.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from mixstack.dsl.errors import CheckpointError
from mixstack.dsl.spec import ModelSpec

BYTES = 256
REPLACEMENT = "\ufffd"


class StreamDecoder(Protocol):
    def push(self, token_id: int) -> str:
        """Text made final by this token ("" while a character is incomplete)."""
        ...

    def flush(self) -> str:
        """Whatever is left at the end (an incomplete character as U+FFFD)."""
        ...


class Tokenizer(Protocol):
    eos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def stream(self) -> StreamDecoder: ...


class _ByteStream:
    """UTF-8 incremental decoding of byte tokens; special ids print nothing."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        if not 0 <= token_id < BYTES:
            return ""
        return self._decoder.decode(bytes((token_id,)))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


class ByteTokenizer:
    """Ids 0..255 are the UTF-8 bytes; ids from 256 are the spec's special tokens
    (``pad``, ``bos``, ``eos``, ``mask`` in the spec's order), skipped when decoding.
    Invalid byte sequences decode to U+FFFD."""

    def __init__(self, special_ids: dict[str, int] | None = None) -> None:
        self.special_ids = dict(special_ids or {})
        self.eos_token_id = self.special_ids.get("eos")

    @classmethod
    def for_spec(cls, spec: ModelSpec) -> ByteTokenizer:
        return cls(spec.special_ids)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if 0 <= i < BYTES).decode("utf-8", errors="replace")

    def stream(self) -> _ByteStream:
        return _ByteStream()


class _TextDiffStream:
    """Incremental decoding for tokenizers whose pieces merge on decode (BPE with byte
    fallback, SentencePiece spaces): decode the pending ids together, emit the new text
    once it no longer ends in an incomplete character (U+FFFD)."""

    def __init__(self, tokenizer: HFTokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # ids before this index only give context for spacing
        self._read = 0  # text of ids[_prefix:_read] was already emitted

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        done = self._tok.decode(self._ids[self._prefix : self._read])
        text = self._tok.decode(self._ids[self._prefix :])
        if len(text) > len(done) and not text.endswith(REPLACEMENT):
            piece = text[len(done) :]
            self._prefix, self._read = self._read, len(self._ids)
            return piece
        return ""

    def flush(self) -> str:
        done = self._tok.decode(self._ids[self._prefix : self._read])
        text = self._tok.decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return text[len(done) :]


class HFTokenizer:
    """A ``tokenizer.json`` read with the ``tokenizers`` library (imported here only).

    ``eos_token_id``: from a ``tokenizer_config.json`` beside it (transformers writes
    one, with ``eos_token``) when present, else None.
    """

    def __init__(self, tokenizer: Any, eos_token_id: int | None = None) -> None:
        self._tokenizer = tokenizer
        self.eos_token_id = eos_token_id

    @classmethod
    def from_file(cls, path: str | Path) -> HFTokenizer:
        try:
            from tokenizers import Tokenizer as _Tokenizer
        except ImportError as exc:  # an optional extra
            raise CheckpointError(
                f"{path} needs the `tokenizers` package: pip install 'mixstack[data]'"
            ) from exc
        path = Path(path)
        try:
            tokenizer = _Tokenizer.from_file(str(path))
        except Exception as exc:  # the library raises a bare Exception on bad JSON
            raise CheckpointError(f"{path}: not a valid tokenizer.json ({exc})") from None
        return cls(tokenizer, _eos_from_config(path.parent / "tokenizer_config.json", tokenizer))

    @property
    def vocab_size(self) -> int:
        return int(self._tokenizer.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=True))

    def stream(self) -> _TextDiffStream:
        return _TextDiffStream(self)


def _eos_from_config(path: Path, tokenizer: Any) -> int | None:
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not readable JSON ({exc})") from None
    eos = config.get("eos_token") if isinstance(config, dict) else None
    if isinstance(eos, dict):  # transformers' AddedToken form
        eos = eos.get("content")
    if not isinstance(eos, str):
        return None
    token_id = tokenizer.token_to_id(eos)
    return None if token_id is None else int(token_id)


def tokenizer_for(spec: ModelSpec, tokenizer_json: Path | None = None) -> Tokenizer | None:
    """The tokenizer of a model: ``tokenizer_json`` when given, else byte-level when the
    spec's vocabulary is the 256 bytes, else None (ids only)."""
    if tokenizer_json is not None:
        tokenizer = HFTokenizer.from_file(tokenizer_json)
        if tokenizer.vocab_size > spec.total_vocab:
            raise CheckpointError(
                f"{tokenizer_json} has {tokenizer.vocab_size} tokens but the model reads "
                f"ids 0..{spec.total_vocab - 1} (vocab_size {spec.vocab_size} + "
                f"{len(spec.special_tokens)} special); it belongs to another model"
            )
        return tokenizer
    if spec.vocab_size == BYTES:
        return ByteTokenizer.for_spec(spec)
    return None
