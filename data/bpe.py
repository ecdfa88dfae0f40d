"""Train a byte-level BPE tokenizer on local UTF-8 files with the ``tokenizers`` library.

The result is ``DIR/tokenizer.json`` (what :class:`mixstack.generation.tokenizers.HFTokenizer`
reads) and ``DIR/tokenizer_config.json`` naming the special tokens, so the ``eos`` id is
found when generating. The specials ``<pad>``, ``<bos>``, ``<eos>`` take ids 0, 1, 2; the
256 byte symbols follow, so every UTF-8 text encodes (no unknown token) and decoding the
ids gives back the text byte for byte.
"""

from __future__ import annotations

import json
import secrets
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mixstack.dsl.errors import MixstackError

SPECIALS = {"pad": "<pad>", "bos": "<bos>", "eos": "<eos>"}
BYTE_ALPHABET = 256
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"


def _need_tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as exc:  # an optional extra
        raise MixstackError(
            "training a tokenizer needs the `tokenizers` package: pip install 'mixstack[data]'"
        ) from exc
    return tokenizers


def read_texts(files: Sequence[str | Path], what: str = "files") -> list[tuple[str, str]]:
    """``(name, text)`` of each UTF-8 file; a clear error for a missing or non-UTF-8 one."""
    out = []
    for i, name in enumerate(files):
        path = Path(name).expanduser()
        if not path.is_file():
            raise MixstackError(
                f"{what}[{i}]: {str(name)!r} is not a file (resolved to {path.resolve()})"
            )
        try:
            out.append((str(name), path.read_bytes().decode("utf-8")))
        except UnicodeDecodeError as exc:
            raise MixstackError(
                f"{what}[{i}]: {str(name)!r} is not UTF-8 text (byte {exc.start}: {exc.reason})"
            ) from None
    return out


def train_bpe(
    files: Sequence[str | Path], vocab_size: int, out: str | Path, *, min_frequency: int = 2
) -> Path:
    """Train a byte-level BPE of ``vocab_size`` ids (specials and the 256 bytes included)
    on ``files``; write ``out/tokenizer.json`` and ``out/tokenizer_config.json`` atomically
    (a temporary folder renamed into place). Returns the ``tokenizer.json`` path."""
    if not files:
        raise MixstackError("tokenizer train: no input files given")
    floor = len(SPECIALS) + BYTE_ALPHABET
    if vocab_size < floor:
        raise MixstackError(
            f"tokenizer train: --vocab-size {vocab_size} is below {floor} "
            f"({len(SPECIALS)} special tokens + the {BYTE_ALPHABET} byte symbols)"
        )
    texts = read_texts(files)
    if not any(text for _, text in texts):
        raise MixstackError("tokenizer train: every input file is empty; nothing to learn from")
    tk = _need_tokenizers()
    tokenizer = tk.Tokenizer(tk.models.BPE())
    # ByteLevel maps every byte to a printable symbol: no unknown token, exact decoding.
    # No prefix space, so a document's first word is encoded as written.
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIALS.values()),
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_documents(texts), trainer=trainer)
    config = {f"{name}_token": token for name, token in SPECIALS.items()}
    config["model_max_length"] = None
    return _write_dir(Path(out), tokenizer.to_str(pretty=True), json.dumps(config, indent=2))


def _documents(texts: list[tuple[str, str]]) -> Iterator[str]:
    for _, text in texts:
        if text:
            yield text


def _write_dir(out: Path, tokenizer_json: str, config_json: str) -> Path:
    """Both files land together: written in a sibling temporary folder, then moved in."""
    out = out.expanduser()
    if out.exists() and not out.is_dir():
        raise MixstackError(f"--out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".tokenizer.{secrets.token_hex(6)}.tmp"
    tmp.mkdir()
    try:
        (tmp / TOKENIZER_JSON).write_text(tokenizer_json + "\n", encoding="utf-8")
        (tmp / TOKENIZER_CONFIG).write_text(config_json + "\n", encoding="utf-8")
        # each rename is atomic; the config goes first so a reader of tokenizer.json
        # never sees the previous tokenizer's config beside it
        (tmp / TOKENIZER_CONFIG).replace(out / TOKENIZER_CONFIG)
        (tmp / TOKENIZER_JSON).replace(out / TOKENIZER_JSON)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / TOKENIZER_JSON
