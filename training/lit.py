"""The thin Lightning adapter: ``LitModel(spec)`` and ``TaskData(spec)``.

Everything here delegates to plain functions (:mod:`.losses`, :mod:`.optim`,
:mod:`.metrics`, :mod:`.data`); this module only wires them into Lightning's hooks.
It is the one module of mixstack that imports lightning at the top, and nothing in
``import mixstack`` / ``load_spec`` / ``build`` imports it.

Checkpoints hold the spec as plain data (``hyper_parameters = {"spec": dict}``), so
they load with ``torch.load(..., weights_only=True)`` and
``LitModel.load_from_checkpoint(path, weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.plugins.precision import HalfPrecision
from torch import Tensor, nn
from torch.utils.data import DataLoader

from mixstack.archs.builder import build
from mixstack.archs.models import MixStackModel
from mixstack.blocks.precision import cast_module
from mixstack.blocks.residual import ResidualBlock
from mixstack.dsl.errors import MixstackError
from mixstack.dsl.layers import select_indices
from mixstack.dsl.spec import Spec, TrainSpec
from mixstack.tasks import Task, make_task
from mixstack.tasks.base import derive_seed
from mixstack.training.data import (
    Position,
    StepBatchSampler,
    TaskDataset,
    ValBatchSampler,
    collate,
    micro_batch_size,
    steps_per_epoch,
    total_steps,
)
from mixstack.training.losses import compute_loss, objective_for
from mixstack.training.metrics import EvalMetrics
from mixstack.training.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)


class NonFiniteLossError(MixstackError):
    """The training loss became NaN or inf under ``train.on_nonfinite: stop``."""


def as_spec(spec: Spec | dict[str, Any]) -> Spec:
    """A validated spec with a train section (a dict is validated like a YAML file)."""
    if not isinstance(spec, Spec):
        from mixstack.dsl.loader import load_spec

        spec = load_spec(spec)
    if spec.train is None:
        raise MixstackError(
            "the spec has no `train:` section; add one, e.g. train: {task: {type: mqar}, "
            "max_steps: 1000}"
        )
    return spec


def train_of(spec: Spec) -> TrainSpec:
    if spec.train is None:  # as_spec refused it already
        raise MixstackError("the spec has no `train:` section")
    return spec.train


def set_activation_checkpointing(model: MixStackModel, selection: bool | list[int | str]) -> None:
    """Recompute the residual blocks at the selected pattern positions in backward."""
    if selection is False:
        return
    n = len(model.layers)
    if selection is True:
        chosen = set(range(n))
    else:
        chosen = {i for selector in selection for i in select_indices(selector, n)}
    for i in sorted(chosen):
        for module in model.layers[i].modules():
            if isinstance(module, ResidualBlock):
                module.checkpointing = True


class KeepFP32HalfPrecision(HalfPrecision):
    """Lightning's ``bf16-true`` / ``16-true`` plugin, except that parameters a mixer hints
    ``keep_fp32`` (SSM scalars) stay fp32 (:func:`mixstack.blocks.precision.cast_module`)."""

    def convert_module(self, module: nn.Module) -> nn.Module:
        cast_module(module, self._desired_input_dtype)
        for sub in module.modules():
            if isinstance(sub, MixStackModel):
                sub.tie_weights()
        return module


class LitModel(L.LightningModule):
    """A :class:`MixStackModel` built from ``spec`` (weights from ``train.seed``), its
    loss, optimizer, schedule and validation metrics.

    ``spec``: a :class:`Spec` with a ``train`` section, or its ``to_dict()`` form (how
    it comes back from a checkpoint).
    """

    def __init__(self, spec: Spec | dict[str, Any]) -> None:
        super().__init__()
        spec = as_spec(spec)
        self.save_hyperparameters({"spec": spec.to_dict()})
        self.spec = spec
        self.train_cfg = train_of(spec)
        self.model = build(spec, seed=self.train_cfg.seed)
        set_activation_checkpointing(self.model, spec.run.activation_checkpointing)
        self.objective = objective_for(spec.model.arch)
        # loss, accuracy, ppl (LM archs) and the task's own metrics, logged as val/<name>
        self.val_metrics = EvalMetrics.for_spec(spec)
        # Not a registered submodule: the state-dict keys stay those of the model.
        self._compiled: list[nn.Module] = [torch.compile(self.model)] if spec.run.compile else []
        self.total_steps: int | None = None  # set by TaskData (needs the task's size)
        self.last_val_step: int | None = None  # global step of the latest validation
        self._step_losses: list[Tensor] = []  # losses of the current step's micro-batches
        self._skip_step = False  # train.on_nonfinite: skip_step hit in the current step
        self.skipped_steps = 0

    def forward(self, input_ids: Tensor, seq_idx: Tensor | None = None) -> Tensor:
        model = self._compiled[0] if self._compiled else self.model
        return model(input_ids, seq_idx=seq_idx)

    @contextlib.contextmanager
    def _step_rng(self, part: int) -> Iterator[None]:
        """Dropout draws from a global RNG seeded by (seed, step, part) and restored
        afterwards: a resumed run draws the masks of an uninterrupted one. ``part`` is the
        global micro-batch index ``a·W + r`` of :mod:`.data`, so every micro-batch of a step
        gets its own masks, and W processes with A micro-batches draw those of one process
        with A·W."""
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type):
            torch.manual_seed(derive_seed(self.train_cfg.seed, "dropout", self.global_step, part))
            yield

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        # Checkpoints fall on step boundaries, so batch_idx % A is the micro-batch of the
        # step in a resumed run too.
        accumulate = self.train_cfg.accumulate_grad_batches
        micro = batch_idx % accumulate
        world = self._trainer.world_size if self._trainer is not None else 1
        with self._step_rng(micro * world + self.global_rank):
            logits = self(batch["input_ids"], seq_idx=batch.get("seq_idx"))
        loss = compute_loss(self.objective, logits, batch["labels"])
        finite = self._finite(loss)
        if finite:
            # train/loss is the loss of the whole global batch: the mean over this step's
            # micro-batches (what the accumulated gradient is the gradient of), averaged
            # over the processes by sync_dist.
            self._step_losses.append(loss.detach())
        if micro == accumulate - 1 and self._step_losses:
            step_loss = torch.stack(self._step_losses).mean()
            self.log("train/loss", step_loss, on_step=True, prog_bar=True, sync_dist=True)
        if micro == accumulate - 1:
            self._step_losses.clear()
        return loss if finite else None  # None: Lightning skips this micro-batch's backward

    def _finite(self, loss: Tensor) -> bool:
        """Whether the loss is finite on every process; else :meth:`_on_nonfinite`."""
        if self._agreed_finite([loss]):
            return True
        self._on_nonfinite(f"the training loss is {float(loss.detach())}")
        return False

    def _agreed_finite(self, tensors: Iterable[Tensor]) -> bool:
        """All ``tensors`` finite, decided alike on every process (one all-reduce of a
        flag), so no process waits alone in a collective."""
        flags = [torch.isfinite(t.detach()).all() for t in tensors]
        bad = bool(flags) and not bool(torch.stack(flags).all())  # one device sync
        if self._trainer is not None:
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        return not bad

    def _on_nonfinite(self, what: str) -> None:
        """train.on_nonfinite: ``stop`` raises; ``skip_step`` marks this step to apply no
        update (:meth:`on_before_optimizer_step`)."""
        if self.train_cfg.on_nonfinite == "stop":
            raise NonFiniteLossError(
                f"{what} at optimizer step {self.global_step} (train.on_nonfinite: stop); "
                "nothing of this step was applied. Lower train.optimizer.lr or set "
                "train.grad_clip, or skip such steps with train.on_nonfinite=skip_step"
            )
        if not self._skip_step:
            self.skipped_steps += 1
            log.warning("%s at step %d: step skipped", what, self.global_step)
        self._skip_step = True

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Non-finite gradients count like a non-finite loss (except under 16-mixed, whose
        grad scaler skips such steps itself); a step to skip applies no update (gradients
        dropped, so the optimizer skips every parameter)."""
        if not self._skip_step and self.spec.run.precision != "16-mixed":
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            if not self._agreed_finite(grads):
                self._on_nonfinite("a gradient is NaN or inf")
        if self._skip_step:
            optimizer.zero_grad(set_to_none=True)
            self._skip_step = False
        if self.train_cfg.on_nonfinite == "skip_step":
            self.log("train/skipped_steps", float(self.skipped_steps), on_step=True)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The update, then a check that it left every weight finite (an lr too large
        overflows finite gradients): such a step is never checkpointed or exported, and
        cannot be skipped after the fact, so the run stops under either policy."""
        super().optimizer_step(*args, **kwargs)
        if not self._agreed_finite(self.parameters()):
            raise NonFiniteLossError(
                f"the weights became NaN or inf in the update of optimizer step "
                f"{self.global_step} (finite loss and gradients: the update overflowed); "
                "lower train.optimizer.lr or set train.grad_clip"
            )

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits = self(batch["input_ids"], seq_idx=batch.get("seq_idx"))
        self.val_metrics.update(logits, batch["labels"], batch)
        for name, metric in self.val_metrics.metrics().items():
            self.log(f"val/{name}", metric, on_epoch=True, prog_bar=name != "ppl")

    def on_validation_epoch_end(self) -> None:
        self.last_val_step = self.global_step

    def configure_optimizers(self) -> dict[str, Any]:
        if self.total_steps is None:
            raise MixstackError("LitModel.total_steps is unset: train it with TaskData")
        # 16-mixed: Lightning's grad scaler refuses to clip a fused optimizer's gradients
        fused = self.spec.run.precision != "16-mixed"
        optimizer = build_optimizer(self.model, self.train_cfg.optimizer, fused=fused)
        scheduler = build_scheduler(optimizer, self.train_cfg.schedule, self.total_steps)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }


class StepDataLoader(DataLoader):
    """A DataLoader whose position is the trainer's global step, not its own state.

    It implements Lightning's ``state_dict`` / ``load_state_dict`` (the "resumable
    loader" protocol), so a mid-epoch checkpoint is not flagged as inexact: its
    :class:`StepBatchSampler` reads the restored global step when iteration starts.
    The state records the global batch size; resuming with another one is refused.
    """

    def state_dict(self) -> dict[str, Any]:
        return {"position": "global_step", "batch_size": self.batch_sampler.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("batch_size")
        if saved != self.batch_sampler.batch_size:
            raise MixstackError(
                f"the checkpoint was written with train.batch_size {saved}; this run has "
                f"{self.batch_sampler.batch_size}"
            )


class TaskData(L.LightningDataModule):
    """Training and validation loaders of ``spec.train.task`` for ``lit``.

    Batches are pure functions of (seed, global step, sample index), split over the
    processes of the trainer (see :mod:`mixstack.training.data`).
    """

    def __init__(self, spec: Spec, lit: LitModel) -> None:
        super().__init__()
        self.spec, self.train_cfg = spec, train_of(spec)
        self.task: Task = make_task(self.train_cfg, spec.model)
        lit.total_steps = total_steps(self.train_cfg, self.task)
        self.steps_per_epoch = steps_per_epoch(self.train_cfg, self.task)

    def _where(self) -> Position:
        return Position(self.trainer.current_epoch, self.trainer.global_step)

    def _loader(self, split: str, sampler: Any) -> DataLoader:
        dataset = TaskDataset(self.task, split, self.spec)  # type: ignore[arg-type]
        workers = self.spec.run.num_workers
        loader = StepDataLoader if split == "train" else DataLoader
        return loader(
            dataset,
            batch_sampler=sampler,
            collate_fn=collate,
            num_workers=workers,
            persistent_workers=workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        world = self.trainer.world_size
        sampler = StepBatchSampler(
            batch_size=self.train_cfg.batch_size,
            micro=micro_batch_size(self.train_cfg, world),
            accumulate=self.train_cfg.accumulate_grad_batches,
            rank=self.trainer.global_rank,
            world_size=world,
            steps_per_epoch=self.steps_per_epoch,
            where=self._where,
        )
        return self._loader("train", sampler)

    def val_dataloader(self) -> DataLoader:
        world = self.trainer.world_size
        size = self.train_cfg.val_batch_size or self.train_cfg.batch_size
        sampler = ValBatchSampler(
            size=self.task.val_size,
            batch_size=max(1, size // world),
            rank=self.trainer.global_rank,
            world_size=world,
        )
        return self._loader("val", sampler)
