"""``fit``: one call from a spec to a trained, exported model (what ``mixstack train`` runs).

Wiring only: :class:`~mixstack.training.lit.LitModel` and
:class:`~mixstack.training.lit.TaskData` go to a Lightning ``Trainer`` configured from
the spec (``run.trainer`` for accelerator / devices / strategy / nodes, so DDP and FSDP
are configuration; precision; loggers; gradient clipping and accumulation); the run
directory (:mod:`.rundir`) records the resolved spec, metrics, checkpoints and
metadata; the model directory (:mod:`mixstack.hub.modeldir`) is exported at the end.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixstack.dsl.errors import MixstackError
from mixstack.dsl.spec import Spec
from mixstack.training import rundir
from mixstack.training.rundir import RunDir

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a ``fit`` call did. Only the launching process (global rank 0) fills
    ``metrics``; the extra processes of a multi-process strategy return with
    ``is_global_zero`` False."""

    run_dir: Path
    status: str  # "finished" | "stopped"
    step: int
    total_steps: int
    elapsed_s: float
    is_global_zero: bool = True
    model_dir: Path | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    params: int = 0
    backends: dict[str, str] = field(default_factory=dict)
    reason: str | None = None  # why a run finished before max_steps (train.early_stop)
    hub: dict[str, Any] | None = None  # run.hub: the pushed commit, or the error and a retry
    init_from: dict[str, Any] | None = None  # train.init_from: loaded / new keys (this call)


def _loggers(spec: Spec, run: RunDir, segment: int) -> list[Any]:
    from lightning.pytorch.loggers import CSVLogger

    loggers: list[Any] = [CSVLogger(save_dir=str(run.root), name=rundir.LOGS_DIR, version=segment)]
    cfg = spec.run.logger
    if cfg.type == "tensorboard":
        try:
            from lightning.pytorch.loggers import TensorBoardLogger

            loggers.append(TensorBoardLogger(save_dir=str(run.root), name="tensorboard"))
        except ModuleNotFoundError as exc:
            raise MixstackError(
                f"run.logger tensorboard needs the tensorboard package ({exc}); "
                "pip install 'mixstack[tensorboard]'"
            ) from None
    elif cfg.type == "wandb":
        try:
            from lightning.pytorch.loggers import WandbLogger

            loggers.append(
                WandbLogger(
                    project=cfg.project,
                    entity=cfg.entity,
                    offline=cfg.mode == "offline",
                    save_dir=str(run.root),
                )
            )
        except ModuleNotFoundError as exc:
            raise MixstackError(
                f"run.logger wandb needs the wandb package ({exc}); pip install 'mixstack[wandb]'"
            ) from None
    return loggers


def _precision(spec: Spec) -> dict[str, Any]:
    """``precision=`` for Lightning, or our plugin for the two true-half precisions."""
    from mixstack.training.lit import KeepFP32HalfPrecision

    precision = spec.run.precision
    if precision in ("bf16-true", "16-true"):
        return {"plugins": [KeepFP32HalfPrecision(precision)]}  # type: ignore[arg-type]
    return {"precision": precision}


def _callbacks(spec: Spec, run: RunDir, every: int, also: set[int], *, progress: bool) -> list[Any]:
    from lightning.pytorch.callbacks import EarlyStopping

    from mixstack.training.callbacks import ProgressBar, StepCheckpoint

    callbacks: list[Any] = [StepCheckpoint(run.checkpoint, every=every, also=also)]
    if progress:
        callbacks.append(ProgressBar())
    target = spec.train.early_stop if spec.train else None
    if target is not None:
        callbacks.append(
            EarlyStopping(
                monitor=target.metric,
                mode=target.mode,
                stopping_threshold=target.threshold,
                patience=2**31,  # only the threshold stops the run
                check_on_train_epoch_end=False,
            )
        )
    return callbacks


@contextlib.contextmanager
def _trainer_errors(spec: Spec) -> Iterator[None]:
    """Lightning refuses a trainer set-up (no GPU, FSDP on CPU, devices=0...) with its own
    exceptions; they come from ``run.trainer`` / ``run.precision``, so say so."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        yield
    except MixstackError:
        raise
    except (MisconfigurationException, ValueError, RuntimeError) as exc:
        t = spec.run.trainer
        raise MixstackError(
            f"Lightning cannot set up run.trainer {{accelerator: {t.accelerator}, devices: "
            f"{t.devices}, strategy: {t.strategy}, num_nodes: {t.num_nodes}}} with precision "
            f"{spec.run.precision}: {exc}"
        ) from None


def make_trainer(
    spec: Spec, run: RunDir, segment: int, total: int, steps_per_epoch: int, *, progress: bool
) -> Any:
    """The Lightning Trainer of a run (see the module docstring)."""
    import lightning.pytorch as L

    train, cfg = spec.train, spec.run
    assert train is not None
    stop = min(cfg.stop_after, total) if cfg.stop_after is not None else total
    epochs = train.max_epochs or math.ceil(total / steps_per_epoch)
    every = train.checkpoint_every or train.val_every
    with _trainer_errors(spec):
        return L.Trainer(
            accelerator=cfg.trainer.accelerator,
            devices=cfg.trainer.devices,
            strategy=cfg.trainer.strategy,
            num_nodes=cfg.trainer.num_nodes,
            max_steps=stop,
            max_epochs=epochs,
            val_check_interval=train.val_every * train.accumulate_grad_batches,
            check_val_every_n_epoch=None,
            num_sanity_val_steps=0,
            accumulate_grad_batches=train.accumulate_grad_batches,
            gradient_clip_val=train.grad_clip,
            gradient_clip_algorithm=train.grad_clip_algorithm,
            log_every_n_steps=train.log_every,
            logger=_loggers(spec, run, segment),
            callbacks=_callbacks(spec, run, every, {stop, total}, progress=progress),
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=progress,
            deterministic=cfg.deterministic,
            default_root_dir=str(run.root),
            use_distributed_sampler=False,
            **_precision(spec),
        )


def fit(
    spec: Spec,
    out: str | os.PathLike[str],
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    hub: Any = None,
) -> RunResult:
    """Train ``spec`` (which needs a ``train`` section) into the run directory ``out``.

    ``resume``: continue the run in ``out`` from its last checkpoint (same model and train
    sections; batches, dropout and the schedule continue exactly). ``overwrite``: replace
    a run already in ``out``. ``hub``: :class:`mixstack.dsl.hubref.HubOptions` for the
    ``run.hub`` push (endpoint, token). Returns a :class:`RunResult`.
    """
    from mixstack.training.lit import LitModel, NonFiniteLossError, TaskData, as_spec

    spec = as_spec(spec)
    launching = rundir.is_launching_process()
    run = RunDir(Path(out))
    if launching:
        rundir.check(run.root, spec, resume=resume, overwrite=overwrite)
        segment = rundir.next_segment(run, resume=resume)
    else:  # the launching process has already recorded this invocation
        segment = _current_segment(run)
    # Everything that can fail on user input (task files, loggers, strategy) before any write.
    lit = LitModel(spec)
    # Before anything is written; never on resume, whose checkpoint holds the weights.
    init = _init_from(spec, lit) if not resume else None
    data = TaskData(spec, lit)
    assert lit.total_steps is not None
    trainer = make_trainer(
        spec, run, segment, lit.total_steps, data.steps_per_epoch, progress=progress
    )
    existed = run.root.exists()
    if launching:
        rundir.prepare(run.root, spec, resume=resume, overwrite=overwrite)
        start = rundir.checkpoint_step(run.checkpoint) if resume else 0
        rundir.start_segment(run, spec, start, world_size=trainer.world_size)
        _record_sources(run, spec)
        if init is not None:
            meta = run.read_metadata()
            meta["init_from"] = init
            run.write_metadata(meta)
    began = time.monotonic()
    try:
        status = _train(trainer, lit, data, run.checkpoint if resume else None)
    except BaseException as exc:
        interrupted = isinstance(exc, (KeyboardInterrupt, SystemExit))
        if trainer.is_global_zero:
            _close_segment(run, segment, "interrupted" if interrupted else "failed", trainer, lit)
        if launching and not resume and trainer.global_step == 0:
            # Nothing to resume: leave nothing that blocks running the same command again.
            rundir.remove_if_unstarted(run, created=not existed)
        if isinstance(exc, NonFiniteLossError) and launching:
            raise NonFiniteLossError(f"{exc}\n{_after_nonfinite(run)}") from None
        raise
    if trainer.is_global_zero:
        _close_segment(run, segment, status, trainer, lit)
    result = RunResult(
        run_dir=run.root,
        status=status,
        step=trainer.global_step,
        total_steps=lit.total_steps,
        elapsed_s=time.monotonic() - began,
        is_global_zero=trainer.is_global_zero,
        reason=_target_text(spec) if _target_reached(trainer) else None,
        init_from=init,
    )
    if trainer.is_global_zero:
        _finish(run, lit, result)
        if spec.run.hub is not None and result.model_dir is not None:
            _push(run, spec, result, hub)
    return result


def _init_from(spec: Spec, lit: Any) -> dict[str, Any] | None:
    """``train.init_from``: load the source's matching weights into the fresh model;
    returns the ``run.json`` record (:mod:`mixstack.training.init_from`)."""
    source = spec.train.init_from if spec.train else None
    if source is None:
        return None
    from mixstack.training.init_from import init_from

    return init_from(lit.model, source).record()


def _record_sources(run: RunDir, spec: Spec) -> None:
    """``hf://`` sources of the spec with their resolved commits, in ``run.json``."""
    from mixstack.dsl.annotations import hub_sources

    sources = hub_sources(spec)
    if sources:
        meta = run.read_metadata()
        meta["sources"] = sources
        run.write_metadata(meta)


def _push(run: RunDir, spec: Spec, result: RunResult, hub: Any) -> None:
    """``run.hub``: push the finished run; a failure keeps the run and says how to retry."""
    from mixstack.hub.hub import push_run

    assert spec.run.hub is not None
    result.hub = push_run(run.root, spec.run.hub, hub)
    if "error" in result.hub:
        log.error(
            "push to the Hub failed: %s; retry with: %s", result.hub["error"], result.hub["retry"]
        )
    meta = run.read_metadata()
    meta["hub"] = result.hub
    run.write_metadata(meta)


def _train(trainer: Any, lit: Any, data: Any, checkpoint: Path | None) -> str:
    """Fit (from ``checkpoint`` when resuming); validate at the last step if the schedule of
    validations missed it. Returns "finished" or "stopped" (``run.stop_after``)."""
    ckpt = str(checkpoint) if checkpoint is not None else None
    trainer.fit(lit, datamodule=data, ckpt_path=ckpt, weights_only=True)
    done = trainer.global_step >= lit.total_steps or _target_reached(trainer)
    if done and lit.last_val_step != trainer.global_step:
        trainer.validate(lit, datamodule=data, verbose=False)
    return "finished" if done else "stopped"


def _target_text(spec: Spec) -> str | None:
    target = spec.train.early_stop if spec.train else None
    return f"{target.metric} reached {target.threshold:g}" if target else None


def _current_segment(run: RunDir) -> int:
    return max(0, len(run.read_metadata().get("segments", [])) - 1)


def _target_reached(trainer: Any) -> bool:
    """Whether ``train.early_stop`` ended the run (its threshold was reached)."""
    from lightning.pytorch.callbacks import EarlyStopping
    from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason

    return any(
        isinstance(c, EarlyStopping) and c.stopping_reason == EarlyStoppingReason.STOPPING_THRESHOLD
        for c in trainer.callbacks
    )


def _close_segment(run: RunDir, segment: int, status: str, trainer: Any, lit: Any) -> None:
    step = trainer.global_step
    meta = run.read_metadata()
    meta["segments"][segment].update({"finished": rundir.now(), "status": status, "end_step": step})
    meta["status"] = status
    meta["step"] = step
    meta["backends"] = lit.model.backends.resolved()
    if lit.skipped_steps:
        meta["segments"][segment]["skipped_steps"] = lit.skipped_steps
    run.write_metadata(meta)


def _after_nonfinite(run: RunDir) -> str:
    """Where a run stopped by a non-finite loss stands, and how to go on."""
    if not run.checkpoint.is_file():
        return f"no checkpoint had been written in {run.root}; nothing was kept to resume"
    step = rundir.checkpoint_step(run.checkpoint)
    return (
        f"the last good checkpoint, {run.checkpoint} (step {step}), is kept; to go on from it "
        f"skipping such steps: mixstack train {run.root} --resume train.on_nonfinite=skip_step"
    )


def _task_tokenizer(spec: Spec) -> Path | None:
    """The ``tokenizer.json`` the run's task reads (text with a tokenizer), stored in the
    model directory so generation and evaluation decode with it."""
    tokenizer = getattr(spec.train.task if spec.train else None, "tokenizer", "byte")
    if not isinstance(tokenizer, str) or tokenizer == "byte":
        return None
    from mixstack.tasks.text import tokenizer_path

    return tokenizer_path(tokenizer)


def _finish(run: RunDir, lit: Any, result: RunResult) -> None:
    """Merge the metrics, export the model (finished runs), complete ``run.json``."""
    from mixstack.hub.modeldir import save_model_dir
    from mixstack.training.metrics import val_summary

    rows = rundir.merge_metrics(run)
    result.metrics = rundir.last_metrics(rows)
    result.params = sum(p.numel() for p in lit.model.parameters())
    result.backends = lit.model.backends.resolved()
    if result.status == "finished":
        val = {k: v for k, v in result.metrics.items() if k.startswith("val/")}
        result.model_dir = save_model_dir(
            lit.model, run.model_dir, metrics=val, tokenizer=_task_tokenizer(lit.spec)
        )
    meta = run.read_metadata()
    if result.model_dir is not None:
        rundir.record_written(
            meta, {f"{rundir.MODEL_DIR}/{p.name}" for p in result.model_dir.iterdir()}
        )
    meta.update(
        {
            "metrics": result.metrics,
            "val": val_summary(rows),
            "params": result.params,
            "model_dir": str(result.model_dir) if result.model_dir else None,
        }
    )
    run.write_metadata(meta)
