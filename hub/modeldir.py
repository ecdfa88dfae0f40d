"""Model directories (DESIGN §8): export a trained model, load one strictly.

::

    MODEL_DIR/
      config.json         canonical model spec + mixstack_version, schema_version, spec_hash
                          (the one source of truth)
      spec.yaml           the same spec for people (loadable by load_spec; checked equal)
      model.safetensors   weights, written by safetensors' save_model (tied weights once)
      README.md           model card: pattern, ratios, parameters, state size, metrics, hash

Loading reads safetensors only (never a pickle), refuses any missing, unexpected or
mis-shaped tensor, and checks the spec hash three ways (config.json against its own
model section, spec.yaml against config.json, the weights' recorded hash). A directory
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
import stat
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from mixstack._version import __version__
from mixstack.archs.models import MixStackModel
from mixstack.dsl.errors import CheckpointError, MixstackError
from mixstack.dsl.migrations import SCHEMA_VERSION, spec_hash_of, unsupported_version
from mixstack.dsl.spec import ModelSpec

CONFIG = "config.json"
SPEC = "spec.yaml"
WEIGHTS = "model.safetensors"
CARD = "README.md"
FILES = (CONFIG, SPEC, WEIGHTS, CARD)
HASH_KEY = "mixstack.spec_hash"  # in the safetensors metadata (tensor names never have ':')
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
    model: MixStackModel, path: str | os.PathLike[str], *, metrics: dict[str, float] | None = None
) -> Path:
    """Export ``model`` to ``path`` (created, or replaced if it is a model directory)."""
    from safetensors.torch import save_model

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
        (tmp / CONFIG).write_text(json.dumps(config_of(spec), indent=2) + "\n", encoding="utf-8")
        (tmp / SPEC).write_text(spec_yaml_text(spec), encoding="utf-8")
        save_model(model, str(tmp / WEIGHTS), metadata={HASH_KEY: spec.spec_hash})
        # safetensors creates its file owner-only; give it the mode of the files above.
        os.chmod(tmp / WEIGHTS, stat.S_IMODE((tmp / CONFIG).stat().st_mode))
        (tmp / CARD).write_text(model_card(model, metrics), encoding="utf-8")
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


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
    """Compare the tensors of a safetensors file with ``model`` (names, shapes, hash).

    ``spec_hash``: the hash the weights must record (default ``model.spec.spec_hash``;
    a directory of an older schema passes the hash its ``config.json`` recorded)."""
    spec_hash = spec_hash or model.spec.spec_hash
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
            metadata = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{path}: not a readable safetensors file: {exc}") from None
    saved_hash = metadata.get(HASH_KEY)
    if saved_hash is not None and saved_hash != spec_hash:
        raise CheckpointError(
            f"{path}: the weights were saved for spec {saved_hash[:12]}, but {CONFIG} "
            f"describes spec {spec_hash[:12]}"
        )
    problems = tensor_mismatches(model.state_dict(), shapes)
    if problems:
        raise CheckpointError(
            f"{path} does not match the model of {CONFIG}:\n" + "\n".join(problems)
        )


def tensor_mismatches(
    expected: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]
) -> list[str]:
    """Missing / unexpected / mis-shaped tensor lines. Names sharing one tensor (tied
    weights) need only one of them in the file."""
    groups: dict[int, list[str]] = {}
    for name, tensor in expected.items():
        groups.setdefault(tensor.data_ptr() if tensor.numel() else id(tensor), []).append(name)
    missing = [names[0] for names in groups.values() if not any(n in shapes for n in names)]
    unexpected = sorted(set(shapes) - set(expected))
    misshaped = [
        f"{n} (file {list(shapes[n])}, model {list(expected[n].shape)})"
        for n in expected
        if n in shapes and tuple(expected[n].shape) != shapes[n]
    ]
    out = []
    for label, names in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("mis-shaped", misshaped),
    ):
        if names:
            out.append(f"  {label} ({len(names)}): {', '.join(names)}")
    return out


def load_model_dir(
    folder: str | os.PathLike[str],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
) -> MixStackModel:
    """Build the model of a model directory and load its weights strictly."""
    from safetensors.torch import load_model

    from mixstack.archs.builder import build

    folder = Path(folder)
    spec, recorded_hash = _checked_spec(folder)
    weights = folder / WEIGHTS
    if not weights.is_file():
        pickles = [p for p in PICKLES if (folder / p).exists()]
        found = (
            f" (found {', '.join(pickles)}: pickled weights are never loaded)" if pickles else ""
        )
        raise CheckpointError(f"{folder}: no {WEIGHTS}{found}; mixstack loads safetensors only")
    model = build(spec, seed=0)
    check_weights(model, weights, recorded_hash)
    load_model(model, str(weights), strict=True)
    model.tie_weights()
    if device is not None or dtype is not None:
        from mixstack.archs.builder import parse_dtype
        from mixstack.blocks.precision import cast_module

        model.to(device=device)
        if dtype is not None:
            cast_module(model, parse_dtype(dtype))
    return model.eval()


TOKENIZER = "tokenizer.json"


def load_tokenizer(folder: str | os.PathLike[str]) -> Any:
    """The tokenizer of a model directory (a ``mixstack.generation.tokenizers`` object):
    its ``tokenizer.json`` read with the ``tokenizers`` library when present (checked
    to fit the model's vocabulary), else byte-level for a 256-byte vocabulary, else
    None (the model then works on ids only)."""
    from mixstack.generation.tokenizers import tokenizer_for

    folder = Path(folder)
    path = folder / TOKENIZER
    return tokenizer_for(read_spec(folder), path if path.is_file() else None)
