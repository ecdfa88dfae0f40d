"""Lightning callbacks of a mixstack run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as L
from lightning.pytorch.callbacks import RichProgressBar


class StepCheckpoint(L.Callback):
    """Write ``path`` (Lightning's full checkpoint) every ``every`` optimizer steps and at
    the steps in ``also`` (where this invocation stops, the end of the run).

    Saved at the end of the training batch that completed the step, like
    ``ModelCheckpoint(every_n_train_steps=...)``, so Lightning restores the loops
    exactly; written to a temporary file and renamed, so a crash never leaves half a
    checkpoint in place of the previous one.
    """

    def __init__(self, path: Path, *, every: int, also: set[int]) -> None:
        self.path, self.every, self.also = Path(path), every, set(also)
        self._seen: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._seen = trainer.global_step

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        if step == self._seen:  # no optimizer step in this (accumulation) micro-batch
            return
        self._seen = step
        if step % self.every and step not in self.also:
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(tmp, weights_only=False)  # every rank calls it; rank 0 writes
        if trainer.is_global_zero:
            os.replace(tmp, self.path)


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar without the logger's version number (``v_num``),
    which means nothing in a mixstack run directory."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items
