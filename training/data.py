"""From a task to batches: exact positions, whatever the process count or a resume.

The training batch of optimizer step ``s`` is samples ``(s, 0) .. (s, G-1)`` of the
task (``G = train.batch_size``). With ``W`` processes and ``A`` accumulation
micro-batches, micro-batch ``a`` of rank ``r`` holds samples
``[(a·W + r)·m, (a·W + r + 1)·m)`` with ``m = G / (A·W)``: the union over ranks and
micro-batches is the global batch, so two processes see exactly what one process sees.
:class:`StepBatchSampler` asks where training stands (epoch, global step) when an
epoch's iteration begins, so a run restored from a mid-epoch checkpoint continues
at the right step instead of at the beginning of the epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, Sampler

from mixstack.dsl.errors import MixstackError
from mixstack.dsl.spec import Spec, TrainSpec
from mixstack.tasks.base import Sample, Split, Task, generator_for
from mixstack.training.losses import mask_tokens, objective_for

Key = tuple[int, int]  # (optimizer step, sample index); validation uses step 0


def micro_batch_size(train: TrainSpec, world_size: int) -> int:
    """Samples per micro-batch per process; refuses splits that do not divide."""
    parts = train.accumulate_grad_batches * world_size
    if train.batch_size % parts:
        raise MixstackError(
            f"train.batch_size {train.batch_size} does not split into "
            f"accumulate_grad_batches {train.accumulate_grad_batches} × {world_size} "
            f"process(es); use a multiple of {parts}"
        )
    return train.batch_size // parts


def steps_per_epoch(train: TrainSpec, task: Task) -> int:
    """Optimizer steps per epoch: ``task.epoch_size`` samples, or the whole run."""
    if task.epoch_size is None:
        if train.max_steps is None:
            raise MixstackError(f"task {train.task.type!r} needs train.max_steps (endless stream)")
        return train.max_steps
    return max(1, math.ceil(task.epoch_size / train.batch_size))


def total_steps(train: TrainSpec, task: Task) -> int:
    """Optimizer steps of the whole run (what the schedule spans)."""
    if train.max_steps is not None:
        return train.max_steps
    assert train.max_epochs is not None  # TrainSpec refuses neither being set
    return train.max_epochs * steps_per_epoch(train, task)


class TaskDataset(Dataset[Sample]):
    """Map-style view of a task; keys are ``(step, index)``.

    For the masked-LM objective (arch encoder) the sample is corrupted with a
    generator drawn from the same key, so masks are reproducible too.
    """

    def __init__(self, task: Task, split: Split, spec: Spec) -> None:
        assert spec.train is not None
        self.task, self.split = task, split
        self.masked_lm = objective_for(spec.model.arch) == "masked_lm"
        self.mlm = spec.train.mlm
        self.seed = spec.train.seed

    def __len__(self) -> int:
        return self.task.val_size if self.split == "val" else self.task.epoch_size or 0

    def __getitem__(self, key: Key) -> Sample:
        step, index = key
        sample = self.task.sample(self.split, step, index)
        if self.masked_lm:
            assert self.mlm.mask_id is not None  # resolved at load
            gen = generator_for(self.seed, "mask", self.split, step, index)
            ids, labels = mask_tokens(
                sample["input_ids"],
                mask_rate=self.mlm.mask_rate,
                mask_id=self.mlm.mask_id,
                generator=gen,
                maskable=sample.get("seq_idx", sample["input_ids"]) >= 0,
            )
            sample = {**sample, "input_ids": ids, "labels": labels}
        return sample


@dataclass
class Position:
    """Where training stands: Lightning's epoch and global (optimizer) step."""

    epoch: int
    step: int


class StepBatchSampler(Sampler[list[Key]]):
    """Yields this process's micro-batches of the steps of the current epoch.

    ``where()`` is read when iteration starts: epoch ``e`` covers steps
    ``[e·S, (e+1)·S)``; iteration begins at ``max(e·S, global step)``. ``len`` is the
    micro-batch count of a whole epoch (what Lightning's loop counts against).
    """

    def __init__(
        self,
        *,
        batch_size: int,
        micro: int,
        accumulate: int,
        rank: int,
        world_size: int,
        steps_per_epoch: int,
        where: Callable[[], Position],
    ) -> None:
        self.batch_size, self.micro, self.accumulate = batch_size, micro, accumulate
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = steps_per_epoch
        self.where = where

    def __len__(self) -> int:
        return self.steps_per_epoch * self.accumulate

    def keys(self, step: int, micro_batch: int) -> list[Key]:
        """Sample keys of micro-batch ``micro_batch`` of ``step`` on this rank."""
        first = (micro_batch * self.world_size + self.rank) * self.micro
        return [(step, i) for i in range(first, first + self.micro)]

    def __iter__(self) -> Iterator[list[Key]]:
        pos = self.where()
        start = max(pos.epoch * self.steps_per_epoch, pos.step)
        for step in range(start, (pos.epoch + 1) * self.steps_per_epoch):
            for micro_batch in range(self.accumulate):
                yield self.keys(step, micro_batch)


class ValBatchSampler(Sampler[list[Key]]):
    """The fixed validation set, samples ``rank, rank + W, ...`` on process ``rank``."""

    def __init__(self, *, size: int, batch_size: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, size, world_size))
        self.batch_size = batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self) -> Iterator[list[Key]]:
        for i in range(0, len(self.indices), self.batch_size):
            yield [(0, j) for j in self.indices[i : i + self.batch_size]]


def collate(samples: list[Sample]) -> Sample:
    """Stack samples key by key into a batch."""
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}
