"""Validation metrics with torchmetrics (imported here, lazily from the package's view).

``loss`` is the token-weighted mean cross-entropy (the sum over all scored targets
divided by their count, over every batch), so ``exp(loss)`` equals ``ppl`` (torchmetrics'
perplexity over the same targets). ``accuracy`` is the micro accuracy over scored
targets only (``IGNORE_INDEX`` respected): for MQAR that is the answer positions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mixstack.tasks.base import IGNORE_INDEX
from mixstack.training.losses import Objective, loss_sum


class EvalMetrics(nn.Module):
    """Loss, accuracy and (LM objectives) perplexity, accumulated over batches.

    A module so the metric states follow the model's device; under DDP torchmetrics
    sums the states over processes in :meth:`compute`.
    """

    def __init__(self, objective: Objective, n_classes: int) -> None:
        super().__init__()
        from torchmetrics import MeanMetric
        from torchmetrics.classification import MulticlassAccuracy

        self.objective = objective
        self.loss = MeanMetric()
        self.accuracy = MulticlassAccuracy(
            num_classes=n_classes, average="micro", ignore_index=IGNORE_INDEX, validate_args=False
        )
        self.ppl: nn.Module | None = None
        if objective != "classification":
            from torchmetrics.text import Perplexity

            self.ppl = Perplexity(ignore_index=IGNORE_INDEX)

    @torch.no_grad()
    def update(self, logits: Tensor, labels: Tensor) -> None:
        """``logits (B, L, V)`` / ``labels (B, L)``, or ``(B, C)`` / ``(B,)``."""
        total, count = loss_sum(logits, labels)
        if int(count) > 0:
            self.loss.update(total / count, weight=count)
        flat = logits.reshape(-1, logits.shape[-1]).float()  # (N, V)
        self.accuracy.update(flat, labels.reshape(-1))
        if self.ppl is not None:
            self.ppl.update(logits.float(), labels)

    def compute(self) -> dict[str, float]:
        out = {"loss": float(self.loss.compute()), "accuracy": float(self.accuracy.compute())}
        if self.ppl is not None:
            out["ppl"] = float(self.ppl.compute())
        return out

    def metrics(self) -> dict[str, Any]:
        """The torchmetrics objects by name (for ``LightningModule.log``)."""
        out: dict[str, Any] = {"loss": self.loss, "accuracy": self.accuracy}
        if self.ppl is not None:
            out["ppl"] = self.ppl
        return out

    def reset(self) -> None:
        for metric in self.metrics().values():
            metric.reset()
