"""``train.task.tokenizer``: ``byte``, a local ``tokenizer.json`` (or its folder), or a
Hugging Face Hub id (``org/name``, ``hf://org/name[@revision]``) resolved through
huggingface_hub's cache.

From the Hub only ``tokenizer.json`` is fetched, with ``tokenizer_config.json`` and
``special_tokens_map.json`` when the repository has them (they name the special tokens);
nothing is executed (no ``trust_remote_code``) and nothing is unpickled. A spec is
checked against a tokenizer that is already on disk (local, or in the cache) when it is
loaded; one that must be downloaded first is checked before step 0.

The special tokens ``bos``, ``eos`` and ``pad`` come from the tokenizer: the
``*_token`` entries of ``tokenizer_config.json`` (or ``special_tokens_map.json``) beside
``tokenizer.json``. The text task needs ``eos`` (it ends every document).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixstack.dsl.errors import MixstackError

TOKENIZER_JSON = "tokenizer.json"
SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json")
SPECIAL_NAMES = ("bos", "eos", "pad")


class TokenizerRefError(MixstackError):
    """A ``tokenizer:`` value that names nothing usable."""


class MissingTokenizerFile(TokenizerRefError):
    """A ``tokenizer:`` path with no file there (yet)."""


@dataclass(frozen=True)
class TokenizerRef:
    """What a ``tokenizer:`` value names: ``kind`` is ``byte``, ``path`` or ``hub``."""

    text: str
    kind: str
    path: Path | None = None  # the local tokenizer.json (kind "path")
    repo_id: str | None = None  # kind "hub"
    revision: str | None = None


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or text.endswith(".json") or text.count("/") != 1


def parse_tokenizer(text: str) -> TokenizerRef:
    """Classify ``text`` (no I/O beyond looking at the local file system)."""
    from mixstack.dsl.hubref import HF_PREFIX, parse_ref

    if text == "byte":
        return TokenizerRef(text, "byte")
    if not text.startswith(HF_PREFIX):
        path = Path(text).expanduser()
        if path.is_dir():
            path = path / TOKENIZER_JSON
            if not path.is_file():
                raise TokenizerRefError(
                    f"tokenizer {text!r}: the folder has no {TOKENIZER_JSON} ({path.resolve()})"
                )
        if path.is_file():
            return TokenizerRef(text, "path", path=path)
        if _looks_like_path(text):
            raise MissingTokenizerFile(
                f"tokenizer {text!r}: no such file ({path.resolve()}); give 'byte', a "
                f"{TOKENIZER_JSON} (or its folder), or a Hub id hf://ORG/NAME"
            )
    ref = parse_ref(text, error=TokenizerRefError)
    return TokenizerRef(text, "hub", repo_id=ref.repo_id, revision=ref.revision)


def locate(text: str, *, download: bool, options: Any = None) -> Path | None:
    """The ``tokenizer.json`` that ``text`` names (None for ``byte``).

    A Hub id is looked up in the huggingface_hub cache; ``download`` fetches it when it
    is not there (through ``options``, a :class:`mixstack.dsl.hubref.HubOptions`, default
    the process's). Without ``download`` an uncached id gives None."""
    ref = parse_tokenizer(text)
    if ref.kind == "byte":
        return None
    if ref.kind == "path":
        return ref.path
    return _from_hub(ref, download=download, options=options)


def _from_hub(ref: TokenizerRef, *, download: bool, options: Any) -> Path | None:
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import hf_hub_download

    from mixstack.dsl.hubref import HubRef, default_options, hub_errors

    opts = default_options().merged(options)
    common = {
        "repo_id": ref.repo_id,
        "revision": ref.revision,
        "cache_dir": opts.cache_dir,
        "token": opts.token,
        "endpoint": opts.endpoint,
        "local_files_only": not download,
    }
    hub_ref = HubRef(ref.repo_id or "", ref.revision)
    local = (
        ""
        if ref.text.startswith("hf://")
        else f" (not a local file either: {Path(ref.text).resolve()})"
    )
    try:
        with hub_errors(f"tokenizer {ref.text!r}{local}", hub_ref, opts, TokenizerRefError):
            path = Path(hf_hub_download(filename=TOKENIZER_JSON, **common))
    except TokenizerRefError:
        if not download:
            return None  # not cached (or no such repository): checked before step 0
        raise
    except hf_errors.LocalEntryNotFoundError:
        if not download:
            return None
        raise
    for name in SIDE_FILES:  # optional: they name the special tokens
        # absent from the repository (or from the cache): the specials say so
        absent = (hf_errors.EntryNotFoundError, hf_errors.HfHubHTTPError, OSError, ValueError)
        with contextlib.suppress(*absent):
            hf_hub_download(filename=name, **common)
    return path


def special_ids(path: Path, tokenizer: Any) -> dict[str, int | None]:
    """``{"bos", "eos", "pad"}`` -> id (None when the tokenizer names none) from the
    config files beside ``tokenizer.json``; ``tokenizer`` is a ``tokenizers.Tokenizer``."""
    names: dict[str, Any] = {}
    for side in reversed(SIDE_FILES):  # tokenizer_config.json wins
        file = path.parent / side
        if not file.is_file():
            continue
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise TokenizerRefError(f"{file}: not readable JSON ({exc})") from None
        if isinstance(config, dict):
            for name in SPECIAL_NAMES:
                if config.get(f"{name}_token") is not None:
                    names[name] = config[f"{name}_token"]
    out: dict[str, int | None] = {}
    for name in SPECIAL_NAMES:
        token = names.get(name)
        if isinstance(token, dict):  # transformers' AddedToken form
            token = token.get("content")
        token_id = tokenizer.token_to_id(token) if isinstance(token, str) else None
        out[name] = None if token_id is None else int(token_id)
    return out


@dataclass(frozen=True)
class TokenizerFacts:
    """What a spec is checked against: the file, its size and special ids."""

    path: Path
    size: int
    specials: dict[str, int | None]


def facts(path: Path) -> TokenizerFacts:
    """Size (added tokens included) and special ids of a ``tokenizer.json``."""
    from mixstack.generation.tokenizers import HFTokenizer

    hf = HFTokenizer.from_file(path)
    return TokenizerFacts(path, hf.vocab_size, special_ids(path, hf._tokenizer))


def require_eos(text: str, found: TokenizerFacts) -> int:
    """The eos id, or an error naming what the tokenizer has and lacks."""
    eos = found.specials.get("eos")
    if eos is None:
        have = [f"{k}={v}" for k, v in found.specials.items() if v is not None]
        lacks = [k for k, v in found.specials.items() if v is None]
        raise TokenizerRefError(
            f"tokenizer {text!r} names no eos token (it has {', '.join(have) or 'no specials'}; "
            f"absent: {', '.join(lacks)}); the text task ends every document with eos: add "
            f'"eos_token" to the tokenizer_config.json beside {found.path.name}'
        )
    return eos
