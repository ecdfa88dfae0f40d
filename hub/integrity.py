"""Weights integrity of a model directory: safetensors headers, data digests, shards.

A safetensors file is ``u64 little-endian N`` + ``N`` bytes of JSON header (tensor
name -> dtype, shape, data offsets; ``__metadata__`` -> str) + the data region. mixstack
records in the metadata of every weights file it writes:

- ``mixstack.spec_hash``: the spec hash of the model the weights belong to;
- ``mixstack.data_sha256``: sha256 of that file's data region (every byte after the
  header), so flipped bytes, a truncated copy or tensors re-saved in another dtype are
  caught.

Both are checked from the header and a streaming hash of the file *before any tensor is
built*: :func:`read_header` parses only the JSON header (bounded size, offsets checked
against the file size), :func:`header_mismatches` compares names, shapes and dtypes with a
model built on the meta device, so a small ``config.json`` that asks for a huge model is
refused without allocating it.

Sharded weights follow the layout transformers uses: ``model-00001-of-00003.safetensors``
... plus ``model.safetensors.index.json`` (``{"metadata": {"total_size": ...},
"weight_map": {tensor name: shard file}}``); the index also lists every shard's digest
under ``metadata["mixstack.data_sha256"]`` and the spec hash under
``metadata["mixstack.spec_hash"]``. Tied (shared) tensors are written once, under their
first name in the model's ``state_dict`` order.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mixstack.dsl.errors import CheckpointError

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
SPEC_HASH_KEY = "mixstack.spec_hash"
DIGEST_KEY = "mixstack.data_sha256"
SHARD_NAME = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")
# safetensors itself refuses headers above 100 MB; we read no more than that either.
MAX_HEADER_BYTES = 100_000_000
_CHUNK = 16 * 2**20  # streaming hash block

# safetensors dtype codes -> (bytes per element, floating point?)
DTYPES: dict[str, tuple[int, bool]] = {
    "F64": (8, True),
    "F32": (4, True),
    "F16": (2, True),
    "BF16": (2, True),
    "F8_E4M3": (1, True),
    "F8_E5M2": (1, True),
    "I64": (8, False),
    "I32": (4, False),
    "I16": (2, False),
    "I8": (1, False),
    "U64": (8, False),
    "U32": (4, False),
    "U16": (2, False),
    "U8": (1, False),
    "BOOL": (1, False),
}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header (offsets are into the data region)."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    """The parsed header of one safetensors file; nothing of its data is read."""

    path: Path
    data_start: int  # 8 + header length: where the data region begins
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]

    @property
    def spec_hash(self) -> str | None:
        return self.metadata.get(SPEC_HASH_KEY)

    @property
    def digest(self) -> str | None:
        return self.metadata.get(DIGEST_KEY)


def _bad(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: not a valid safetensors file: {why}")


def read_header(path: str | os.PathLike[str]) -> Header:
    """Parse and check the header of ``path`` (sizes and offsets against the file size)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _bad(path, f"{size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise _bad(path, f"header length {n} does not fit a {size}-byte file")
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc}") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(path, f"header is not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise _bad(path, "header is not a JSON object")
    metadata = data.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _bad(path, "__metadata__ must map strings to strings")
    tensors = {name: _entry(path, name, value) for name, value in data.items()}
    _check_layout(path, tensors, size - 8 - n)
    return Header(path, 8 + n, tensors, metadata)


def _entry(path: Path, name: str, value: Any) -> TensorEntry:
    if not isinstance(value, dict):
        raise _bad(path, f"tensor {name!r}: entry is not an object")
    dtype, shape, offsets = value.get("dtype"), value.get("shape"), value.get("data_offsets")
    if dtype not in DTYPES:
        raise _bad(path, f"tensor {name!r}: unknown dtype {dtype!r}")
    ints = (shape, offsets)
    if not all(isinstance(v, list) and all(type(x) is int and x >= 0 for x in v) for v in ints):
        raise _bad(path, f"tensor {name!r}: shape and data_offsets must be lists of ints >= 0")
    if len(offsets) != 2 or offsets[0] > offsets[1]:
        raise _bad(path, f"tensor {name!r}: data_offsets {offsets} is not [begin, end]")
    nbytes = math.prod(shape) * DTYPES[dtype][0]
    if offsets[1] - offsets[0] != nbytes:
        raise _bad(
            path,
            f"tensor {name!r}: {dtype}{shape} needs {nbytes} bytes, offsets give "
            f"{offsets[1] - offsets[0]}",
        )
    return TensorEntry(dtype, tuple(shape), offsets[0], offsets[1])


def _check_layout(path: Path, tensors: dict[str, TensorEntry], data_bytes: int) -> None:
    """The tensors tile the data region exactly (no gap, overlap or overrun)."""
    cursor = 0
    for name, entry in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if entry.begin != cursor:
            raise _bad(path, f"tensor {name!r} starts at byte {entry.begin}, expected {cursor}")
        cursor = entry.end
    if cursor != data_bytes:
        raise _bad(path, f"the tensors cover {cursor} data bytes; the file holds {data_bytes}")


def data_sha256(path: str | os.PathLike[str], start: int) -> str:
    """sha256 of the bytes of ``path`` from offset ``start`` (the data region) on."""
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb") as f:
        f.seek(start)
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


# -- writing ---------------------------------------------------------------------------------
def write_safetensors(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str], mode_like: Path
) -> str:
    """Write ``tensors`` to ``path`` with ``metadata`` plus the data digest; returns it.

    safetensors writes the header before the data, so the file is written with a
    placeholder digest of the final length, the data region is hashed, and the
    placeholder is overwritten in place (the header length does not change).
    """
    from safetensors.torch import save_file

    placeholder = "0" * 64
    save_file(tensors, str(path), metadata={**metadata, DIGEST_KEY: placeholder})
    # safetensors creates its file owner-only; give it the mode of the other files.
    os.chmod(path, stat.S_IMODE(mode_like.stat().st_mode))
    header = read_header(path)
    digest = data_sha256(path, header.data_start)
    needle = json.dumps({DIGEST_KEY: placeholder}, separators=(",", ":"))[1:-1].encode()
    with open(path, "r+b") as f:
        raw = f.read(header.data_start)
        at = raw.find(needle)
        if at < 0 or raw.find(needle, at + 1) >= 0:
            raise CheckpointError(f"{path}: could not place the data digest in the header")
        f.seek(at + len(needle) - 65)  # the 64 placeholder characters and the closing quote
        f.write(digest.encode())
    return digest


def parse_size(value: int | str) -> int:
    """``max_shard_size``: bytes as an int, or ``"500MB"``, ``"2GB"`` (powers of 1000),
    ``"1GiB"`` (powers of 1024)."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", value, re.IGNORECASE)
        if match is None:
            raise CheckpointError(
                f"max_shard_size {value!r} is not a size; use bytes or e.g. '500MB', '2GB', '1GiB'"
            )
        unit = (match.group(2) or "B").upper()
        base = 1024 if "I" in unit else 1000
        power = "BKMGT".index(unit[0]) if unit != "B" else 0
        size = int(float(match.group(1)) * base**power)
    else:
        raise CheckpointError(f"max_shard_size must be an int or a string, got {value!r}")
    if size <= 0:
        raise CheckpointError(f"max_shard_size must be positive, got {value!r}")
    return size


def plan_shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Tensor names per shard, in order; a shard is closed before it would exceed
    ``max_bytes`` (a single larger tensor gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and used + nbytes > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def save_weights(
    model: torch.nn.Module,
    folder: Path,
    spec_hash: str,
    *,
    max_shard_size: int | str | None,
    mode_like: Path,
) -> list[str]:
    """Write the weights of ``model`` into ``folder`` (one file, or shards + index);
    returns the file names written."""
    stored, _ = expected_tensors(model)
    tensors = {name: t.detach().contiguous() for name, t in stored.items()}
    meta = {SPEC_HASH_KEY: spec_hash}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    limit = None if max_shard_size is None else parse_size(max_shard_size)
    groups = plan_shards(tensors, limit) if limit is not None else [list(tensors)]
    if len(groups) == 1:
        write_safetensors(tensors, folder / WEIGHTS, meta, mode_like)
        return [WEIGHTS]
    digests: dict[str, str] = {}
    weight_map: dict[str, str] = {}
    for k, names in enumerate(groups, start=1):
        file = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        part = {n: tensors[n] for n in names}
        digests[file] = write_safetensors(part, folder / file, meta, mode_like)
        weight_map.update(dict.fromkeys(names, file))
    index = {
        "metadata": {"total_size": total, SPEC_HASH_KEY: spec_hash, DIGEST_KEY: digests},
        "weight_map": weight_map,
    }
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return [*digests, INDEX]


# -- reading ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightFiles:
    """The weights of a model directory: one file, or shards listed by an index."""

    headers: list[Header]
    index: dict[str, Any] | None  # the parsed index of sharded weights

    @property
    def names(self) -> list[str]:
        return [h.path.name for h in self.headers]


def find_weights(folder: Path, pickles: Iterable[str]) -> WeightFiles:
    """Locate and parse the headers of the weights of ``folder`` (reads no tensor data)."""
    single, index_path = folder / WEIGHTS, folder / INDEX
    if single.is_file() and index_path.is_file():
        raise CheckpointError(
            f"{folder}: both {WEIGHTS} and {INDEX} are present; a model directory holds one "
            "or the other (re-export it)"
        )
    if single.is_file():
        return WeightFiles([read_header(single)], None)
    if index_path.is_file():
        index = _read_index(index_path)
        files = sorted(set(index["weight_map"].values()))
        headers = []
        for file in files:
            if not (folder / file).is_file():
                raise CheckpointError(f"{index_path}: shard {file} is missing from {folder}")
            headers.append(read_header(folder / file))
        for header in headers:
            listed = {n for n, f in index["weight_map"].items() if f == header.path.name}
            if set(header.tensors) != listed:
                odd = sorted(set(header.tensors) ^ listed)
                raise CheckpointError(
                    f"{header.path}: its tensors differ from what {INDEX} maps to it "
                    f"({', '.join(odd[:8])})"
                )
        return WeightFiles(headers, index)
    found = [p for p in pickles if (folder / p).exists()]
    note = f" (found {', '.join(found)}: pickled weights are never loaded)" if found else ""
    raise CheckpointError(
        f"{folder}: no {WEIGHTS} (nor {INDEX}){note}; mixstack loads safetensors only"
    )


def _read_index(path: Path) -> dict[str, Any]:
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not readable JSON: {exc}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{path}: no weight_map (tensor name -> shard file)")
    for name, file in weight_map.items():
        # Plain file names of this folder only: an index never points elsewhere.
        if not isinstance(file, str) or not SHARD_NAME.fullmatch(file):
            raise CheckpointError(
                f"{path}: weight_map[{name!r}] = {file!r} is not a shard name "
                "model-NNNNN-of-NNNNN.safetensors"
            )
    if not isinstance(index.get("metadata", {}), dict):
        raise CheckpointError(f"{path}: metadata must be an object")
    return index


def expected_tensors(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """What the weights of ``model`` must hold: (tensor by stored name, alias -> stored
    name). Works on the meta device (tensor identity, not storage, finds the ties)."""
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[int, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in first:
            aliases[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
            stored[name] = tensor
    return stored, aliases


def mismatch_lines(groups: list[tuple[str, list[str]]]) -> list[str]:
    """``"  missing (2): a, b"``: one line per non-empty group of tensor names."""
    return [f"  {label} ({len(names)}): {', '.join(names)}" for label, names in groups if names]


def header_mismatches(model: torch.nn.Module, headers: list[Header]) -> list[str]:
    """Lines naming missing / unexpected / mis-shaped / wrongly typed tensors, comparing
    the headers with ``model`` (typically on the meta device). A tied alias (``lm_head``
    of a tied model) must not be stored: the file would hold a second, independent copy."""
    stored, aliases = expected_tensors(model)
    found: dict[str, TensorEntry] = {}
    for header in headers:
        found.update(header.tensors)
    missing = [n for n in stored if n not in found]
    tied = sorted(n for n in found if n in aliases)
    unexpected = sorted(n for n in found if n not in stored and n not in aliases)
    misshaped, retyped = [], []
    for name, tensor in stored.items():
        entry = found.get(name)
        if entry is None:
            continue
        if entry.shape != tuple(tensor.shape):
            misshaped.append(f"{name} (file {list(entry.shape)}, model {list(tensor.shape)})")
        elif DTYPES[entry.dtype][1] != tensor.is_floating_point():
            kind = "floating point" if tensor.is_floating_point() else "integer"
            retyped.append(f"{name} (file {entry.dtype}, model expects {kind})")
    out = mismatch_lines(
        [
            ("missing", missing),
            ("unexpected", unexpected),
            ("mis-shaped", misshaped),
            ("wrong dtype", retyped),
        ]
    )
    for name in tied:
        out.append(
            f"  {name} is stored, but the model ties it to {aliases[name]} "
            "(tie_embeddings: true): a tied model stores the embedding only"
        )
    return out


def verify_digest(header: Header, index: dict[str, Any] | None) -> None:
    """Hash the data region of ``header.path`` and compare with its recorded digest (and
    with the index's entry for a shard)."""
    recorded = header.digest
    if index is not None:
        listed = (index.get("metadata") or {}).get(DIGEST_KEY) or {}
        if isinstance(listed, dict) and header.path.name in listed:
            if recorded is not None and listed[header.path.name] != recorded:
                raise CheckpointError(
                    f"{header.path}: its digest {recorded[:12]} differs from the one {INDEX} "
                    f"lists ({str(listed[header.path.name])[:12]}); the shard belongs to "
                    "another export"
                )
            recorded = recorded or listed[header.path.name]
    if recorded is None:
        return
    actual = data_sha256(header.path, header.data_start)
    if actual != recorded:
        raise CheckpointError(
            f"{header.path}: the data does not match its recorded digest ({DIGEST_KEY} "
            f"{recorded[:12]}, data {actual[:12]}): the file is damaged or was modified "
            "after export"
        )


def load_tensors(files: WeightFiles, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of the (already verified) weight files."""
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    for header in files.headers:
        try:
            with safe_open(str(header.path), framework="pt", device=device) as f:
                for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    tensors[name] = f.get_tensor(name)
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise CheckpointError(
                f"{header.path}: not a readable safetensors file: {exc}"
            ) from None
    return tensors


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of floating tensors holding NaN or ±inf, with how many such values."""
    out = []
    for name, tensor in tensors.items():
        if tensor.is_floating_point():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                out.append(f"{name} ({bad} of {tensor.numel()})")
    return out
