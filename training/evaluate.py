"""Evaluation without Lightning: a model on the fixed validation set of a task.

The same samples, batching (:class:`~mixstack.training.data.ValBatchSampler`) and
metrics (:class:`~mixstack.training.metrics.EvalMetrics`) as the validation of a
training run, so ``mixstack eval`` of an exported model reproduces the run's final
validation numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from mixstack.archs.models import MixStackModel
from mixstack.dsl.errors import MixstackError
from mixstack.dsl.spec import Spec
from mixstack.tasks import make_task
from mixstack.training.data import TaskDataset, ValBatchSampler, collate
from mixstack.training.metrics import EvalMetrics


def spec_for(model: MixStackModel, train: dict[str, Any] | Spec) -> Spec:
    """The model's own architecture with a train section (from another spec, or a dict),
    validated together: the task's vocabulary and length are checked against this model."""
    from mixstack.dsl.loader import load_spec

    section = train.to_dict().get("train") if isinstance(train, Spec) else train
    if section is None:
        raise MixstackError("evaluation needs a spec with a `train:` section (its task)")
    return load_spec({"model": model.spec.canonical(), "train": section})


def evaluate(
    model: MixStackModel, spec: Spec, *, batch_size: int | None = None
) -> dict[str, float]:
    """Validation metrics (``loss``, ``accuracy``, ``ppl`` for LM objectives, the task's
    own) of ``model`` on the validation set of ``spec.train.task``. ``spec.model`` must be
    the model's."""
    if spec.train is None:
        raise MixstackError("evaluation needs a spec with a `train:` section (its task)")
    if spec.model != model.spec:
        raise MixstackError("spec.model is not the model's architecture; use spec_for(model, ...)")
    return validation_metrics(model, spec, batch_size=batch_size)[0]


def plain_forward(model: MixStackModel, batch: dict[str, Tensor]) -> Tensor:
    """The model's forward on a validation batch: logits ``(B, L, V)`` or ``(B, C)``."""
    return model(batch["input_ids"], seq_idx=batch.get("seq_idx"))


@torch.no_grad()
def validation_metrics(
    model: MixStackModel,
    spec: Spec,
    *,
    batch_size: int | None = None,
    forward: Callable[[MixStackModel, dict[str, Tensor]], Tensor] = plain_forward,
) -> tuple[dict[str, float], int]:
    """(metrics, number of samples) of ``model`` on the validation set of
    ``spec.train.task``, its batches' logits from ``forward`` (the sweeps of
    :mod:`mixstack.evaluation` pass one that runs bounded-state models past
    ``max_seq_len``). No check that ``spec.model`` is the model's: callers do that."""
    train = spec.train
    assert train is not None
    task = make_task(train, spec.model)
    size = batch_size or train.val_batch_size or train.batch_size
    sampler = ValBatchSampler(size=task.val_size, batch_size=size, rank=0, world_size=1)
    loader = DataLoader(TaskDataset(task, "val", spec), batch_sampler=sampler, collate_fn=collate)
    device = next(model.parameters()).device
    metrics = EvalMetrics.for_spec(spec).to(device)
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            metrics.update(forward(model, batch), batch["labels"], batch)
    finally:
        model.train(was_training)
    return metrics.compute(), task.val_size
