"""Data for training: synthetic tasks and byte-level text, as pure functions of
``(seed, step, sample index)`` (see :mod:`mixstack.tasks.base`)."""

from __future__ import annotations

from mixstack.dsl.spec import ModelSpec, TrainSpec
from mixstack.tasks.base import IGNORE_INDEX, Sample, Split, Task


def make_task(train: TrainSpec, model: ModelSpec) -> Task:
    """The task of a validated, resolved ``train`` section for ``model``."""
    from mixstack.tasks import synthetic, text

    cfg = train.task
    if cfg.type == "text":
        return text.ByteText(cfg, train.seed, model.special_ids.get("eos"))
    classes: dict[str, type[synthetic._SyntheticTask]] = {
        "mqar": synthetic.MQAR,
        "selective_copy": synthetic.SelectiveCopy,
        "induction": synthetic.Induction,
        "majority": synthetic.Majority,
    }
    return classes[cfg.type](cfg, train.seed)


__all__ = ["IGNORE_INDEX", "Sample", "Split", "Task", "make_task"]
