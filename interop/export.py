"""``mixstack export`` / ``mixstack convert``: any model source -> a model directory or a
transformers checkpoint (docs/interop.md).

A source is one of:

* a **run directory** (``spec.yaml`` / ``run.json`` / ``checkpoints/last.ckpt``): its
  ``model/`` when that exists and is at least as new as ``checkpoints/last.ckpt``,
  otherwise the weights of ``last.ckpt`` (read with ``torch.load(weights_only=True)``:
  no code runs) and the spec the checkpoint carries. So an interrupted or stopped run
  still gives a usable model;
* a **mixstack model directory** (``config.json`` with ``mixstack_version``);
* a **transformers checkpoint folder** (``config.json`` with ``model_type``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import torch

from mixstack.dsl.errors import CheckpointError, MixstackError

CHECKPOINT = Path("checkpoints") / "last.ckpt"
MODEL_DIR = "model"
TARGETS = ("mixstack", "transformers")


def _is_run_dir(folder: Path) -> bool:
    return any((folder / name).exists() for name in ("spec.yaml", "run.json", "checkpoints"))


def _newest(path: Path) -> float:
    """Latest modification time of a file or of the files directly in a folder."""
    if path.is_file():
        return path.stat().st_mtime
    times = [p.stat().st_mtime for p in path.iterdir() if p.is_file()]
    return max(times, default=0.0)


def load_checkpoint(path: Path) -> Any:
    """The model of a Lightning checkpoint written by ``mixstack train``."""
    from mixstack.archs.builder import build
    from mixstack.dsl.loader import load_spec

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle / zip errors of a damaged or foreign file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: not a checkpoint mixstack can read (loaded with weights_only=True: {first})"
        ) from None
    try:
        spec_data = state["hyper_parameters"]["spec"]
        weights = state["state_dict"]
    except (KeyError, TypeError):
        raise CheckpointError(
            f"{path}: not a mixstack training checkpoint (no hyper_parameters.spec / state_dict)"
        ) from None
    try:
        spec = load_spec(spec_data)
    except MixstackError as exc:
        raise CheckpointError(
            f"{path}: the spec stored in the checkpoint is invalid:\n{exc}"
        ) from None
    model = build(spec, device="meta")
    ours = {k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.")}
    from mixstack.interop.transformers import mismatches

    if model.tied and "lm_head.weight" not in ours and "embedding.weight" in ours:
        ours["lm_head.weight"] = ours["embedding.weight"]
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = mismatches(expected, {k: tuple(v.shape) for k, v in ours.items()})
    if problems:
        raise CheckpointError(f"{path} does not match its own spec:\n" + "\n".join(problems))
    model.load_state_dict(ours, strict=True, assign=True)
    model.tie_weights()
    model.seed = spec.train.seed if spec.train is not None else None
    return model.eval()


def load_source(src: str | os.PathLike[str]) -> tuple[Any, str]:
    """(model, what was read) for a run directory, a model directory or a transformers
    checkpoint folder."""
    from mixstack.hub.modeldir import load_model_dir
    from mixstack.interop.transformers import is_transformers_dir, load_transformers

    folder = Path(src)
    if not folder.is_dir():
        raise MixstackError(
            f"{folder} is not a directory; export reads a run directory, a model directory "
            "or a transformers checkpoint folder"
        )
    if is_transformers_dir(folder):
        return load_transformers(folder), f"transformers checkpoint {folder}"
    if (folder / "config.json").is_file():
        return load_model_dir(folder), f"model directory {folder}"
    if not _is_run_dir(folder):
        present = ", ".join(sorted(p.name for p in folder.iterdir())[:10]) or "nothing"
        raise MixstackError(
            f"{folder} is neither a run directory (spec.yaml, checkpoints/last.ckpt), a model "
            f"directory nor a transformers checkpoint folder (config.json); found: {present}"
        )
    model_dir, ckpt = folder / MODEL_DIR, folder / CHECKPOINT
    has_model = (model_dir / "config.json").is_file()
    if ckpt.is_file() and (not has_model or _newest(model_dir) < ckpt.stat().st_mtime):
        return load_checkpoint(ckpt), f"checkpoint {ckpt}"
    if has_model:
        return load_model_dir(model_dir), f"model directory {model_dir}"
    raise MixstackError(
        f"{folder} is a run directory without a model: neither {MODEL_DIR}/ nor {CHECKPOINT} "
        "exists (the run stopped before its first checkpoint)"
    )


def export(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    to: Literal["mixstack", "transformers"] = "mixstack",
) -> Path:
    """Write the model of ``src`` to ``out`` as a mixstack model directory (default) or a
    transformers checkpoint. Returns ``out``."""
    from mixstack.hub.modeldir import save_model_dir
    from mixstack.interop.transformers import export_transformers

    if to not in TARGETS:
        raise MixstackError(f"unknown export target {to!r}; allowed: {', '.join(TARGETS)}")
    if Path(out).resolve() == Path(src).resolve():
        raise MixstackError(f"--out {out} is the source itself; choose another folder")
    model, _ = load_source(src)
    if to == "transformers":
        return export_transformers(model, out)
    return save_model_dir(model, out)


def convert(src: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """A transformers checkpoint folder -> a mixstack model directory at ``out``."""
    from mixstack.interop.transformers import is_transformers_dir

    if not is_transformers_dir(src):
        raise MixstackError(
            f"{src} is not a transformers checkpoint folder (a config.json with model_type and "
            "safetensors weights); to re-export a mixstack run or model use `mixstack export`"
        )
    return export(src, out, to="mixstack")
