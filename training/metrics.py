"""Validation metrics: the built-in ones (registered here) and their accumulation.

``loss`` is the token-weighted mean cross-entropy (the sum over all scored targets
divided by their count, over every batch), so ``exp(loss)`` equals ``ppl`` (torchmetrics'
perplexity over the same targets). ``accuracy`` is the micro accuracy over scored
targets only (``IGNORE_INDEX`` respected): for MQAR that is the answer positions. Tasks
add their own metrics (:class:`~mixstack.dsl.registry.MetricDef`, declared with
``register_task``); a run computes the general metrics of its arch and its task's.
torchmetrics is imported by the metric factories, not by this module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mixstack.dsl import registry
from mixstack.dsl.errors import MixstackError
from mixstack.dsl.registry import MetricDef, register_metric
from mixstack.dsl.spec import Spec
from mixstack.tasks.base import IGNORE_INDEX
from mixstack.training.losses import loss_sum


def _mean(n_out: int) -> Any:
    from torchmetrics import MeanMetric

    return MeanMetric()


def _loss_inputs(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Mean loss of the batch, weighted by its number of scored targets."""
    total, count = loss_sum(logits, labels)
    return total / count.clamp(min=1), count


def _accuracy(n_out: int) -> Any:
    from torchmetrics.classification import MulticlassAccuracy

    return MulticlassAccuracy(
        num_classes=n_out, average="micro", ignore_index=IGNORE_INDEX, validate_args=False
    )


def _flat(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """``(N, V)`` logits and ``(N,)`` labels."""
    return logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1)


def _perplexity(n_out: int) -> Any:
    from torchmetrics.text import Perplexity

    return Perplexity(ignore_index=IGNORE_INDEX)


LOSS = register_metric(
    MetricDef("loss", False, "token-weighted mean cross-entropy", _mean, _loss_inputs)
)
ACCURACY = register_metric(
    MetricDef("accuracy", True, "micro accuracy over scored targets", _accuracy, _flat)
)
PPL = register_metric(
    MetricDef(
        "ppl",
        False,
        "perplexity, exp(loss) (language-model archs)",
        _perplexity,
        archs=("causal_lm", "encoder"),
    )
)


def _sample_key(batch: Mapping[str, Tensor] | None, key: str, metric: str) -> Tensor:
    if batch is None or key not in batch:
        raise MixstackError(
            f"metric {metric!r} needs the samples' {key!r} (its task writes it); pass the "
            "collated batch: EvalMetrics.update(logits, labels, batch)"
        )
    return batch[key]


class EvalMetrics(nn.Module):
    """The validation metrics of a run, accumulated over batches.

    A module so the metric states follow the model's device; under DDP torchmetrics
    sums the states over processes in :meth:`compute`.
    """

    def __init__(self, definitions: Sequence[MetricDef], n_out: int) -> None:
        super().__init__()
        self.definitions = {d.name: d for d in definitions}
        self.torchmetrics = nn.ModuleDict({d.name: d.factory(n_out) for d in definitions})

    @classmethod
    def for_spec(cls, spec: Spec) -> EvalMetrics:
        """The general metrics of ``spec.model.arch`` and those of ``spec.train.task``."""
        assert spec.train is not None  # callers checked that the spec trains
        model = spec.model
        n_out = model.classifier.n_classes if model.classifier else model.total_vocab
        return cls(registry.task_metrics(spec.train.task.type, model.arch), n_out)

    @torch.no_grad()
    def update(
        self, logits: Tensor, labels: Tensor, batch: Mapping[str, Tensor] | None = None
    ) -> None:
        """``logits (B, L, V)`` / ``labels (B, L)``, or ``(B, C)`` / ``(B,)``; ``batch``: the
        collated samples, for metrics that read further keys (``MetricDef.sample_keys``)."""
        for name, metric in self.torchmetrics.items():
            definition = self.definitions[name]
            prepare = definition.prepare
            extra = [_sample_key(batch, key, name) for key in definition.sample_keys]
            metric.update(
                *(prepare(logits, labels, *extra) if prepare else (logits.float(), labels))
            )

    def compute(self) -> dict[str, float]:
        return {name: float(metric.compute()) for name, metric in self.torchmetrics.items()}

    def metrics(self) -> dict[str, Any]:
        """The torchmetrics objects by name (for ``LightningModule.log``)."""
        return dict(self.torchmetrics.items())

    def reset(self) -> None:
        for metric in self.torchmetrics.values():
            metric.reset()


def val_summary(rows: Sequence[dict[str, str]]) -> dict[str, dict[str, Any]]:
    """Per validation metric of a run's merged CSV rows: the last value, the best one (by
    the metric's registered direction) and the optimizer step it was reached at (steps
    done; Lightning logs a validation at the 0-based index of the step before it).
    What ``run.json`` records under ``val``."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        for key, value in row.items():
            if not key.startswith("val/") or value in ("", None):
                continue
            higher = registry.metric_direction(key) == "max"
            entry = out.setdefault(key, {"higher_is_better": higher})
            current, step = float(value), int(row["step"]) + 1
            best = entry.get("best")
            if best is None or (current > best if higher else current < best):
                entry.update(best=current, best_step=step)
            entry.update(last=current, last_step=step)
    return out
