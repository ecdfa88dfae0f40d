"""Lightning callbacks of a mixstack run."""

from __future__ import annotations

import os
import time
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
    """Lightning's rich progress bar, speaking in optimizer steps: ``step 150/600``
    instead of ``Epoch 0/0`` (a mixstack run is one stream of steps, not epochs), with
    tokens per second and the time left; without the logger's version (``v_num``)."""

    def __init__(self) -> None:
        super().__init__()
        self._t0: float | None = None
        self._step0 = 0
        self._tokens = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._t0, self._step0, self._tokens = time.perf_counter(), trainer.global_step, 0

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        ids = batch.get("input_ids") if isinstance(batch, dict) else None
        if ids is not None:  # every process reads as many tokens as this one
            self._tokens += ids.numel() * trainer.world_size
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.progress is not None and self.train_progress_bar_id is not None:
            description = self._get_train_description(trainer.current_epoch)
            self.progress.update(self.train_progress_bar_id, description=description)

    def _get_train_description(self, current_epoch: int) -> str:
        total = getattr(self.trainer.lightning_module, "total_steps", None) or "?"
        text = f"step {self.trainer.global_step}/{total}"
        return f"{text:{len(self.validation_description)}}"

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        items.update(
            throughput(
                self._t0,
                self._tokens,
                trainer.global_step - self._step0,
                getattr(pl_module, "total_steps", None),
                trainer.global_step,
            )
        )
        return items


def throughput(
    t0: float | None, tokens: int, steps_done: int, total: int | None, step: int
) -> dict[str, str]:
    """``{"tok/s": ..., "eta": ...}`` from the wall time since ``t0`` (empty before the
    first step; the ETA needs the run's total steps)."""
    if t0 is None or steps_done <= 0:
        return {}
    elapsed = max(time.perf_counter() - t0, 1e-9)
    out = {"tok/s": f"{tokens / elapsed:,.0f}"}
    if total:
        left = max(total - step, 0) * elapsed / steps_done
        out["eta"] = time.strftime("%H:%M:%S", time.gmtime(left))
    return out
