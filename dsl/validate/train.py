"""The train section: its own fields (the ``type``-tagged task and optimizer first),
then model-dependent defaults and the task's checks against the model."""

from __future__ import annotations

from typing import Any

from mixstack.dsl import registry
from mixstack.dsl.errors import keys_text
from mixstack.dsl.spec import (
    OPTIMIZER_TYPES,
    AdamWConfig,
    ModelSpec,
    RunSpec,
    TaskConfig,
    TrainSpec,
)
from mixstack.dsl.validate.common import Checker


def train_section(ck: Checker, data: Any) -> TrainSpec | None:
    """The train section's own fields (its checks against the model come later)."""
    path = ("train",)
    if data is None:
        return None
    if not isinstance(data, dict):
        ck.add("train must be a mapping", path, value=data, allowed="a mapping")
        return None
    task = None
    task_types = registry.task_configs()  # the registered tasks (mixstack/tasks/, plugins)
    if "task" in data:
        task = ck.tagged(data["task"], (*path, "task"), task_types, None)
    else:
        ck.add(
            "missing required key 'task'",
            (*path, "task"),
            allowed=f"task: {{type: NAME, ...}} with NAME one of {keys_text(task_types)}",
            at=path,
        )
    optimizer = ck.tagged(data.get("optimizer"), (*path, "optimizer"), OPTIMIZER_TYPES, "adamw")
    length = data.get("max_steps") is not None or data.get("max_epochs") is not None
    if not length:
        ck.add(
            "train needs max_steps or max_epochs (how long to train)",
            (*path, "max_steps"),
            allowed="max_steps: N (optimizer steps) or max_epochs: N",
            at=path,
        )
    # Failed parts get a stand-in so the other fields are still checked.
    fields = {
        **data,
        "task": task or TaskConfig(type="?"),
        "optimizer": optimizer or AdamWConfig(),
    }
    train = ck.pydantic(TrainSpec, fields if length else {**fields, "max_steps": 1}, path)
    return train if task is not None and optimizer is not None and length else None


def train_against(ck: Checker, train: TrainSpec, model: ModelSpec) -> TrainSpec | None:
    """Fill model-dependent defaults and check the task against the model."""
    resolved = train.resolve(model)
    problems = resolved.check(model)
    for rel, message, allowed in problems:
        ck.add(message, ("train", *rel), allowed=allowed)
    return None if problems else resolved


def train_against_run(ck: Checker, train: TrainSpec, run: RunSpec) -> None:
    """What the run section decides about training that is known at load: with a fixed
    device count, the batch must split over all processes too."""
    trainer = run.trainer
    if trainer.devices == "auto" or train.batch_size % train.accumulate_grad_batches:
        return  # unknown world size, or already reported by TrainSpec.check
    devices = trainer.devices if isinstance(trainer.devices, int) else len(trainer.devices)
    world = devices * trainer.num_nodes
    where = f" (run.trainer: devices {trainer.devices}, num_nodes {trainer.num_nodes})"
    for rel, message, allowed in train.check_batch_split(world, where):
        ck.add(message, ("train", *rel), allowed=allowed)
