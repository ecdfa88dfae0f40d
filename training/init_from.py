"""``train.init_from``: start a run from the weights of another model (self-pretraining).

Self-pretraining ("Never Train from Scratch", Amos et al. 2024) is two runs: phase 1
trains on the task's own inputs without labels (``objective: lm`` or ``mlm``), phase 2
fine-tunes on the labels from phase 1's weights. Phase 2 names phase 1's model
directory, or its run directory (whose ``model/`` is used), in ``train.init_from``.

Tensors are matched by state-dict key and shape:

- **loaded**: every tensor of the new model that the source holds with the same shape
  (the embedding, the layers, the final norm);
- **new**: the head (``lm_head.*``, ``classifier.*``) keeps its fresh initialisation,
  whether or not the source has one (a causal LM's vocabulary head is no classifier);
- **refused**: anything else, a tensor of the new model that the source lacks or holds
  with another shape, or a non-head tensor of the source that the new model lacks. One
  refused tensor stops the run before anything is written, with a
  :class:`~mixstack.dsl.errors.CheckpointError` naming each tensor and both shapes.

The source is read with :func:`mixstack.hub.modeldir.load_model_dir`: safetensors only,
its spec hash and data digests checked.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mixstack.archs.models import MixStackModel
from mixstack.dsl.errors import CheckpointError
from mixstack.hub import integrity

log = logging.getLogger(__name__)

# State-dict prefixes of the heads: they always start new.
HEAD_PREFIXES = ("lm_head.", "classifier.")
# Names listed in the log and the CLI when a group is this small.
FEW = 8


def is_head(name: str) -> bool:
    return name.startswith(HEAD_PREFIXES)


@dataclass
class InitReport:
    """What :func:`init_from` did: the source directory and the keys of each group."""

    source: str
    loaded: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        """The ``run.json["init_from"]`` entry: counts, and every key (a few hundred at
        most for the models this is meant for)."""
        return {
            "source": self.source,
            "loaded": len(self.loaded),
            "new": len(self.new),
            "refused": 0,
            "loaded_keys": self.loaded,
            "new_keys": self.new,
        }


def describe(record: dict[str, Any]) -> str:
    """One line of a :meth:`InitReport.record`:
    ``12 loaded, 2 new (classifier.bias, classifier.weight), 0 refused``."""

    def group(label: str) -> str:
        names = record.get(f"{label}_keys") or []
        listed = f" ({', '.join(names)})" if 0 < len(names) <= FEW else ""
        return f"{record[label]} {label}{listed}"

    return f"{group('loaded')}, {group('new')}, {record['refused']} refused"


def source_dir(path: str | os.PathLike[str]) -> Path:
    """The model directory ``path`` names: itself, or a run directory's ``model/``."""
    from mixstack.hub.modeldir import CONFIG
    from mixstack.training.rundir import MODEL_DIR, RUN_FILE

    folder = Path(path).expanduser()
    if (folder / CONFIG).is_file():
        return folder
    if (folder / RUN_FILE).is_file():
        if (folder / MODEL_DIR / CONFIG).is_file():
            return folder / MODEL_DIR
        raise CheckpointError(
            f"train.init_from: {folder} is a run directory without an exported model "
            f"({MODEL_DIR}/{CONFIG} is missing: the run has not finished); finish it with "
            f"mixstack train {folder} --resume, or name a model directory"
        )
    what = "does not exist" if not folder.exists() else "is neither a model nor a run directory"
    raise CheckpointError(
        f"train.init_from: {folder} {what} (resolved to {folder.resolve()}); expected a model "
        f"directory (with {CONFIG}) or a run directory (with {RUN_FILE} and {MODEL_DIR}/)"
    )


def match(
    target: dict[str, torch.Tensor], source: dict[str, torch.Tensor]
) -> tuple[list[str], list[str], list[str]]:
    """``(loaded, new, refused lines)`` for the tensors of a new model (``target``, tied
    aliases left out) and those of the source, by key and shape (see the module
    docstring). A refused line names the tensor and both shapes."""
    loaded, new, refused = [], [], []
    for name, tensor in target.items():
        if is_head(name):
            new.append(name)
            continue
        got = source.get(name)
        want = list(tensor.shape)
        if got is None:
            refused.append(f"  {name}: this model {want}, the source has no such tensor")
        elif list(got.shape) != want:
            refused.append(f"  {name}: this model {want}, the source {list(got.shape)}")
        else:
            loaded.append(name)
    for name in sorted(set(source) - set(target)):
        if not is_head(name):
            refused.append(f"  {name}: not in this model, the source {list(source[name].shape)}")
    return loaded, new, refused


def init_from(model: MixStackModel, path: str | os.PathLike[str]) -> InitReport:
    """Copy the matching tensors of the model at ``path`` into ``model`` (in place).

    Raises :class:`CheckpointError` when the source cannot be read or verified, or when
    any tensor besides the head is missing or mis-shaped on either side."""
    from mixstack.hub.modeldir import load_model_dir

    folder = source_dir(path)
    source_model = load_model_dir(folder)
    _, source_aliases = integrity.expected_tensors(source_model)
    source = {k: v for k, v in source_model.state_dict().items() if k not in source_aliases}
    stored, _ = integrity.expected_tensors(model)
    loaded, new, refused = match(stored, source)
    if refused:
        raise CheckpointError(
            f"train.init_from: {folder} does not fit this model ({len(refused)} tensor(s) "
            f"refused; only {', '.join(p.rstrip('.') + '*' for p in HEAD_PREFIXES)} may "
            "differ):\n" + "\n".join(refused)
        )
    with torch.no_grad():
        for name in loaded:
            stored[name].copy_(source[name])
    model.tie_weights()
    report = InitReport(str(folder), loaded, new)
    log.info("init_from %s: %s", folder, describe(report.record()))
    return report
