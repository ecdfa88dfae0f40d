"""What every task shares: samples, deterministic seeding, the task interface.

A task turns ``(seed, split, step, index)`` into one sample, with no hidden state:
the training batch of optimizer step ``s`` is ``[sample("train", s, i) for i in
range(batch_size)]`` wherever and whenever it is computed. That is what makes a run
resumed from a checkpoint (Lightning does not restore a sampler's position inside an
epoch) and a run split over several processes see exactly the batches of one
uninterrupted single-process run. Validation samples do not depend on the step
(``step`` is ignored): the validation set is fixed.

A sample is a dict of tensors:

- ``input_ids (L,)`` int64: the model input;
- ``labels (L,)`` int64, aligned with the input (``labels[t]`` is the target of the
  output at position ``t``; :data:`IGNORE_INDEX` where nothing is scored), or
  ``labels ()`` for classification;
- ``seq_idx (L,)`` int64, packed text only: document id of each position.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from mixstack.dsl.spec import ModelSpec, TaskConfig

Split = Literal["train", "val"]
Sample = dict[str, Tensor]

# Targets equal to this are not scored (PyTorch's cross-entropy default).
IGNORE_INDEX = -100


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (stable across runs, platforms
    and Python hash randomization)."""
    digest = hashlib.blake2b(digest_size=8)
    for part in parts:
        digest.update(repr(part).encode())
        digest.update(b"\x1f")
    return int.from_bytes(digest.digest(), "little") & ((1 << 63) - 1)


def generator_for(*parts: int | str) -> torch.Generator:
    """A fresh CPU generator seeded from ``parts`` (never the global RNG)."""
    return torch.Generator(device="cpu").manual_seed(derive_seed(*parts))


def ignored(length: int) -> Tensor:
    """``(length,)`` labels that score nothing."""
    return torch.full((length,), IGNORE_INDEX, dtype=torch.long)


class GeneratedTaskConfig(TaskConfig):
    """Config base of a generated task: an endless training stream, a fixed validation set."""

    val_size: int = Field(1000, ge=1, description="samples in the fixed validation set")
    epoch_size: int | None = Field(
        None,
        ge=1,
        description="training samples per epoch (the stream is endless); "
        "None: one epoch is the whole run (needs max_steps)",
    )


class Task(ABC):
    """A source of samples for one run.

    Subclasses register with ``@register_task(TheirConfig)`` and are built by
    :func:`mixstack.tasks.make_task` as ``cls(cfg, seed, model)``: the validated,
    resolved ``train.task`` config, ``train.seed`` and the model spec.
    """

    #: "lm": sequence of token targets; "classification": one class per sample.
    kind: Literal["lm", "classification"] = "lm"

    def __init__(self, cfg: Any, seed: int, model: ModelSpec) -> None:
        self.cfg = cfg
        self.seed = seed

    @abstractmethod
    def sample(self, split: Split, step: int, index: int) -> Sample:
        """Sample ``index`` of optimizer step ``step`` (train) or of the fixed validation
        set (val, ``step`` ignored)."""

    @property
    @abstractmethod
    def val_size(self) -> int:
        """Number of validation samples."""

    @property
    def epoch_size(self) -> int | None:
        """Training samples per epoch, or None when an epoch is the whole run (an
        endless generated stream)."""
        return None

    def generator(self, split: Split, step: int, index: int) -> torch.Generator:
        """The generator of one sample: train samples vary with the step, val do not."""
        if split == "val":
            return generator_for(self.seed, "val", index)
        return generator_for(self.seed, "train", step, index)


class GeneratedTask(Task):
    """A task of a :class:`GeneratedTaskConfig`: each sample is drawn from its own generator."""

    cfg: GeneratedTaskConfig

    @property
    def val_size(self) -> int:
        return self.cfg.val_size

    @property
    def epoch_size(self) -> int | None:
        return self.cfg.epoch_size
