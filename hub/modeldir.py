"""Model directories (DESIGN §8): export a trained model, load one strictly.

::

    MODEL_DIR/
      config.json         canonical model spec + mixstack_version, schema_version, spec_hash
                          (the one source of truth)
      spec.yaml           the same spec for people (loadable by load_spec; checked equal)
      model.safetensors   weights (tied weights once), with the spec hash and the sha256 of
                          its data region in the safetensors metadata; or, with
                          ``max_shard_size``, model-0000K-of-0000N.safetensors shards and
                          model.safetensors.index.json (transformers' layout)
      README.md           model card: pattern, ratios, parameters, state size, metrics, hash

Loading reads safetensors only (never a pickle). Before any tensor is built it checks
(:mod:`mixstack.hub.integrity`) the weights' headers against the model built on the meta
device (missing, unexpected, mis-shaped or non-float tensors, a stored tied head), the
spec hash three ways (config.json against its own model section, spec.yaml against
config.json, the weights' recorded hash) and the data digest of every file; a directory
without the hash or the digest is refused unless ``allow_unverified=True`` (schema-1
directories, written before digests existed, load with a warning). Weights holding NaN
or inf are refused too. docs/model-directory.md describes the format. A directory
of an older ``schema_version`` is checked with that version's hash rule, then its spec
is migrated (:mod:`mixstack.dsl.migrations`); the loaded spec has the current hash. It only
reads: a directory that fails to load is left as it was. Export writes a complete
new directory next to the target and swaps it in, so a reader never sees half of one.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

from mixstack._version import __version__
from mixstack.archs.models import MixStackModel
from mixstack.dsl.errors import CheckpointError, MixstackError
from mixstack.dsl.migrations import SCHEMA_VERSION, spec_hash_of, unsupported_version
from mixstack.dsl.spec import ModelSpec
from mixstack.hub import integrity

CONFIG = "config.json"
SPEC = "spec.yaml"
WEIGHTS = integrity.WEIGHTS
INDEX = integrity.INDEX
CARD = "README.md"
FILES = (CONFIG, SPEC, WEIGHTS, CARD)
TOKENIZER = "tokenizer.json"  # optional: the run's tokenizer (text task with one)
TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json")
TOKENIZER_KEY = "tokenizer"  # config.json: {"file", "sha256"}, beside "model"
HASH_KEY = integrity.SPEC_HASH_KEY  # in the safetensors metadata
DIGEST_KEY = integrity.DIGEST_KEY
# Schema versions written before weights carried a data digest (schema 3 is the first
# whose writer adds one): such a directory loads with a warning instead of being refused
# (tests/fixtures/modeldir_v1, modeldir_v2).
PRE_DIGEST_SCHEMAS = frozenset({1, 2})
PICKLES = ("pytorch_model.bin", "model.pt", "model.ckpt", "model.pth")


def config_of(spec: ModelSpec) -> dict[str, Any]:
    """The content of ``config.json``."""
    return {
        "mixstack_version": __version__,
        "schema_version": SCHEMA_VERSION,
        "spec_hash": spec.spec_hash,
        "model": spec.canonical(),
    }


def spec_yaml_text(spec: ModelSpec) -> str:
    """``spec.yaml``: the model section as authored (bases and overrides merged, defaults
    not resolved) when the spec was loaded by ``load_spec``, else the resolved one.
    Loading checks that resolving it gives ``config.json``; ``base:`` on this file (or
    on ``hf://`` of its repository) re-derives what the author left to defaults."""
    from mixstack.dsl.annotations import authored

    model = authored(spec)
    kind = "as authored (defaults resolve to config.json)"
    if model is None:
        model, kind = spec.canonical(), "fully resolved, as in config.json"
    header = (
        f"# mixstack model spec (hash {spec.spec_hash}), {kind}.\n"
        "# config.json is the source of truth; load with mixstack.load_spec('spec.yaml')\n"
        "# or mixstack.from_pretrained(<this folder>).\n"
    )
    body = {"schema_version": SCHEMA_VERSION, "model": model}
    return header + yaml.safe_dump(body, sort_keys=False, default_flow_style=None)


def save_model_dir(
    model: MixStackModel,
    path: str | os.PathLike[str],
    *,
    metrics: dict[str, float] | None = None,
    max_shard_size: int | str | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
) -> Path:
    """Export ``model`` to ``path`` (created, or replaced if it is a model directory).

    ``max_shard_size``: bytes (or ``"500MB"``, ``"2GB"``, ``"1GiB"``) above which the
    weights are split into shards with an index; ``None`` (default) writes one file.
    ``tokenizer``: a ``tokenizer.json`` stored beside the weights (with the
    ``tokenizer_config.json`` / ``special_tokens_map.json`` next to it, which name its
    special tokens); ``config.json`` records its sha256 (see :func:`check_tokenizer`)."""
    if max_shard_size is not None:
        integrity.parse_size(max_shard_size)  # refuse a bad size before writing anything
    target = Path(path)
    if target.exists() and not _replaceable(target):
        raise CheckpointError(
            f"{target} exists and is not a model directory; refusing to replace it"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    spec = model.spec
    # Not tempfile.mkdtemp: its owner-only mode would be the model directory's.
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    tmp.mkdir()
    try:
        config = config_of(spec)
        if tokenizer is not None:
            config[TOKENIZER_KEY] = _copy_tokenizer(Path(tokenizer), tmp)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (tmp / SPEC).write_text(spec_yaml_text(spec), encoding="utf-8")
        integrity.save_weights(
            model, tmp, spec.spec_hash, max_shard_size=max_shard_size, mode_like=tmp / CONFIG
        )
        (tmp / CARD).write_text(model_card(model, metrics), encoding="utf-8")
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _copy_tokenizer(source: Path, folder: Path) -> dict[str, str]:
    """Copy ``tokenizer.json`` (and its special-token configs) into ``folder``; the record
    ``config.json`` keeps (outside ``model``: the spec hash does not depend on it)."""
    from mixstack.data.shards import sha256_file

    if not source.is_file():
        raise CheckpointError(f"tokenizer {source} is not a file; nothing was exported")
    shutil.copyfile(source, folder / TOKENIZER)
    for name in TOKENIZER_SIDE_FILES:
        if (source.parent / name).is_file():
            shutil.copyfile(source.parent / name, folder / name)
    return {"file": TOKENIZER, "sha256": sha256_file(folder / TOKENIZER)}


def check_tokenizer(folder: str | os.PathLike[str]) -> Path | None:
    """The ``tokenizer.json`` of a model directory whose ``config.json`` records one,
    after checking its sha256 against the record; None when none is recorded (a
    ``tokenizer.json`` put there by hand is then used unchecked)."""
    from mixstack.data.shards import sha256_file

    folder = Path(folder)
    record = _read_config(folder).get(TOKENIZER_KEY)
    if record is None:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
        raise CheckpointError(f"{folder / CONFIG}: {TOKENIZER_KEY!r} is not {{file, sha256}}")
    path = folder / TOKENIZER
    if not path.is_file():
        raise CheckpointError(
            f"{folder}: {CONFIG} records a {TOKENIZER} (sha256 {record['sha256']}) but the "
            f"file is missing; restore it or re-export the model"
        )
    digest = sha256_file(path)
    if digest != record["sha256"]:
        raise CheckpointError(
            f"{path}: sha256 {digest} but {CONFIG} records {record['sha256']}; the tokenizer "
            f"was replaced or damaged (the model was trained with the recorded one)"
        )
    return path


def _replaceable(path: Path) -> bool:
    return path.is_dir() and (not any(path.iterdir()) or (path / CONFIG).is_file())


def _swap_in(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; an old ``target`` is moved aside first, then removed."""
    if not target.exists():
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
    os.replace(target, old / "previous")
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def model_card(model: MixStackModel, metrics: dict[str, float] | None = None) -> str:
    """``README.md``: what the model is, how big, how it did, how to load it
    (:func:`mixstack.hub.card.render`, a ``huggingface_hub.ModelCard``)."""
    from mixstack.hub.card import render

    return render(model, metrics)


# -- loading ---------------------------------------------------------------------------------


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG
    if not path.is_file():
        present = sorted(p.name for p in folder.iterdir())
        raise CheckpointError(
            f"{folder} is not a mixstack model directory: no {CONFIG} "
            f"(found: {', '.join(present) or 'nothing'})"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not readable JSON: {exc}") from None
    missing = [k for k in ("schema_version", "spec_hash", "model") if k not in config]
    if not isinstance(config, dict) or missing:
        raise CheckpointError(f"{path}: missing keys {missing or 'all'} of a model config")
    problem = unsupported_version(config["schema_version"])
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    return config


def _load_model_spec(data: Any, version: Any, where: str) -> ModelSpec:
    """Validate a saved ``model`` section of schema ``version`` (migrated if older)."""
    from mixstack.dsl.loader import load_spec

    try:
        return load_spec({"schema_version": version, "model": data}).model
    except MixstackError as exc:
        raise CheckpointError(f"{where}: the model spec is invalid:\n{exc}") from None


def _diff(a: Any, b: Any, path: str = "model") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b), key=str)
        return [p for k in keys for p in _diff(a.get(k), b.get(k), f"{path}.{k}")]
    return [] if a == b else [path]


def read_spec(folder: str | os.PathLike[str]) -> ModelSpec:
    """The model spec of a model directory, after every consistency check of its files."""
    return _checked_spec(Path(folder))[0]


def _checked_spec(folder: Path) -> tuple[ModelSpec, str]:
    """(the migrated spec, the spec hash ``config.json`` recorded) of a model directory."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a directory (a local model directory was expected)")
    config = _read_config(folder)
    version = config["schema_version"]
    # The hash rule of the version that wrote the file, on the content as written
    # (config.json holds the canonical dump), before any migration.
    content_hash = spec_hash_of(config["model"], version)
    if content_hash != config["spec_hash"]:
        raise CheckpointError(
            f"{folder / CONFIG}: spec_hash {config['spec_hash']} does not match its model "
            f"section (hash {content_hash}); the file was edited or is damaged"
        )
    spec = _load_model_spec(config["model"], version, str(folder / CONFIG))
    yaml_path = folder / SPEC
    if not yaml_path.is_file():
        raise CheckpointError(
            f"{folder}: {SPEC} is missing (a model directory has {', '.join(FILES)})"
        )
    try:
        data = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise CheckpointError(f"{yaml_path}: not readable YAML: {exc}") from None
    data = data if isinstance(data, dict) else {}
    from_yaml = _load_model_spec(
        data.get("model"), data.get("schema_version", SCHEMA_VERSION), str(yaml_path)
    )
    if from_yaml != spec:
        changed = _diff(spec.canonical(), from_yaml.canonical())
        raise CheckpointError(
            f"{folder}: {SPEC} and {CONFIG} describe different models (they differ in "
            f"{', '.join(changed[:8]) or 'their layers'}); {CONFIG} is the source of truth: "
            f"restore {SPEC} from it or re-export"
        )
    return spec, config["spec_hash"]


def check_weights(model: MixStackModel, path: Path, spec_hash: str | None = None) -> None:
    """Compare the header of one safetensors file with ``model`` (names, shapes, dtypes,
    recorded spec hash; default ``model.spec.spec_hash``). Reads no tensor data."""
    files = integrity.WeightFiles([integrity.read_header(path)], None)
    _check_headers(model, files, spec_hash or model.spec.spec_hash, str(path))


def _check_headers(
    model: MixStackModel, files: integrity.WeightFiles, spec_hash: str, where: str
) -> None:
    """Recorded spec hashes (where present) and tensor names / shapes / dtypes."""
    index_hash = ((files.index or {}).get("metadata") or {}).get(HASH_KEY)
    recorded = [(str(h.path), h.spec_hash) for h in files.headers]
    if index_hash is not None:
        recorded.append((INDEX, index_hash))
    for path, saved in recorded:
        if saved is not None and saved != spec_hash:
            raise CheckpointError(
                f"{path}: the weights were saved for spec {str(saved)[:12]}, but {CONFIG} "
                f"describes spec {spec_hash[:12]}"
            )
    problems = integrity.header_mismatches(model, files.headers)
    if problems:
        raise CheckpointError(
            f"{where} does not match the model of {CONFIG}:\n" + "\n".join(problems)
        )


def _unverified(files: integrity.WeightFiles) -> list[str]:
    """What a weights file lacks of the provenance mixstack writes (hash, digest)."""
    out = []
    for header in files.headers:
        lacks = [key for key in (HASH_KEY, DIGEST_KEY) if key not in header.metadata]
        if lacks:
            out.append(f"{header.path.name} has no {' / '.join(lacks)}")
    return out


def _check_provenance(
    folder: Path, files: integrity.WeightFiles, version: Any, allow_unverified: bool
) -> None:
    """Refuse weights without the spec hash or data digest, except a pre-digest schema
    (the digest alone may be missing: warn) or ``allow_unverified`` (warn)."""
    lacking = _unverified(files)
    if not lacking:
        return
    no_hash = any(HASH_KEY in line for line in lacking)
    unknown = ["they are undamaged"] if any(DIGEST_KEY in line for line in lacking) else []
    unknown = [f"they belong to {CONFIG}"] * no_hash + unknown
    what = f"{'; '.join(lacking)}: nothing shows that {' or that '.join(unknown)}"
    if allow_unverified or (version in PRE_DIGEST_SCHEMAS and not no_hash):
        why = "allow_unverified=True" if allow_unverified else f"schema_version {version}"
        warnings.warn(
            f"{folder}: loading unverified weights ({what}); accepted because of {why}. "
            "Re-export the model to add them.",
            UserWarning,
            stacklevel=2,
        )
        return
    raise CheckpointError(
        f"{folder}: unverified weights ({what}); re-export the model with mixstack, or load "
        "it anyway with allow_unverified=True (--allow-unverified)"
    )


def verify_weights(
    folder: Path, spec: ModelSpec, spec_hash: str, *, allow_unverified: bool = False
) -> integrity.WeightFiles:
    """Every check that needs no tensor: headers against the model built on the meta
    device, spec hashes, provenance, data digests. Returns the verified files."""
    from mixstack.archs.builder import build

    files = integrity.find_weights(folder, PICKLES)
    meta_model = build(spec, device="meta", seed=0)
    _check_headers(meta_model, files, spec_hash, f"{folder}: {', '.join(files.names)}")
    _check_provenance(folder, files, _read_config(folder)["schema_version"], allow_unverified)
    for header in files.headers:
        integrity.verify_digest(header, files.index)
    return files


def _check_finite(folder: Path, tensors: dict[str, torch.Tensor], allow: bool) -> None:
    bad = integrity.non_finite(tensors)
    if not bad:
        return
    message = f"{folder}: weights hold NaN or inf values: {', '.join(bad[:8])}"
    if not allow:
        raise CheckpointError(message + " (load anyway with allow_unverified=True)")
    warnings.warn(message, UserWarning, stacklevel=3)


def load_model_dir(
    folder: str | os.PathLike[str],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    allow_unverified: bool = False,
) -> MixStackModel:
    """Build the model of a model directory and load its weights strictly.

    ``allow_unverified``: load weights that lack the spec hash or data digest, or hold
    NaN / inf, with a warning instead of a :class:`CheckpointError` (a digest that is
    present and wrong is always refused)."""
    from mixstack.archs.builder import build

    folder = Path(folder)
    spec, recorded_hash = _checked_spec(folder)
    check_tokenizer(folder)
    files = verify_weights(folder, spec, recorded_hash, allow_unverified=allow_unverified)
    tensors = integrity.load_tensors(files)
    _check_finite(folder, tensors, allow_unverified)
    model = build(spec, seed=0)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    _, aliases = integrity.expected_tensors(model)
    if unexpected or set(missing) - set(aliases):  # excluded by the header check
        raise CheckpointError(f"{folder}: weights do not match ({missing}, {unexpected})")
    model.tie_weights()
    if device is not None or dtype is not None:
        from mixstack.archs.builder import parse_dtype
        from mixstack.blocks.precision import cast_module

        model.to(device=device)
        if dtype is not None:
            cast_module(model, parse_dtype(dtype))
    return model.eval()


def verify_model_dir(
    folder: str | os.PathLike[str], *, allow_unverified: bool = False
) -> dict[str, Any]:
    """The checks of :func:`load_model_dir` on a model directory, for ``mixstack verify``.

    Returns ``{"spec_hash", "files": {name: digest or None}, "tensors", "params"}``; any
    failure is a :class:`CheckpointError`."""
    folder = Path(folder)
    spec, recorded_hash = _checked_spec(folder)
    check_tokenizer(folder)
    files = verify_weights(folder, spec, recorded_hash, allow_unverified=allow_unverified)
    tensors = integrity.load_tensors(files)
    _check_finite(folder, tensors, allow_unverified)
    return {
        "spec_hash": recorded_hash,
        "files": {h.path.name: h.digest for h in files.headers},
        "tensors": len(tensors),
        "params": sum(t.numel() for t in tensors.values()),
    }


def load_tokenizer(folder: str | os.PathLike[str]) -> Any:
    """The tokenizer of a model directory (a ``mixstack.generation.tokenizers`` object):
    its ``tokenizer.json`` read with the ``tokenizers`` library when present (checked
    against the sha256 ``config.json`` records, and to fit the model's vocabulary;
    eos from ``tokenizer_config.json`` or ``special_tokens_map.json``), else byte-level
    for a 256-byte vocabulary, else None (the model then works on ids only)."""
    from mixstack.generation.tokenizers import tokenizer_for

    folder = Path(folder)
    check_tokenizer(folder)
    path = folder / TOKENIZER
    tokenizer = tokenizer_for(read_spec(folder), path if path.is_file() else None)
    if path.is_file() and getattr(tokenizer, "eos_token_id", None) is None:
        from mixstack.data.tokenizer_ref import special_ids

        tokenizer.eos_token_id = special_ids(path, tokenizer._tokenizer)["eos"]
    return tokenizer
