"""Data for training: one file per task (its config, generator and extra metrics), each
registering itself with :func:`mixstack.dsl.registry.register_task`. Samples are pure
functions of ``(seed, step, sample index)`` (see :mod:`mixstack.tasks.base`)."""

from __future__ import annotations

from mixstack.dsl import registry
from mixstack.dsl.spec import ModelSpec, TrainSpec
from mixstack.tasks.base import IGNORE_INDEX, Sample, Split, Task


def make_task(train: TrainSpec, model: ModelSpec) -> Task:
    """The task of a validated, resolved ``train`` section for ``model``."""
    task_cls = registry.tasks.get(train.task.type).task_cls
    return task_cls(train.task, train.seed, model)


__all__ = ["IGNORE_INDEX", "Sample", "Split", "Task", "make_task"]
