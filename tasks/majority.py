"""Sequence classification by majority: config and generator (arch ``classifier``)."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from mixstack.dsl.registry import register_task
from mixstack.dsl.spec import ModelSpec, Problem
from mixstack.tasks.base import GeneratedTask, GeneratedTaskConfig, Sample, Split


class MajorityTask(GeneratedTaskConfig):
    """Sequence classification: the id that occurs most often (arch classifier)."""

    archs: ClassVar[tuple[str, ...]] = ("classifier",)
    type: Literal["majority"] = "majority"
    n_classes: int | None = Field(
        None, ge=2, description="ids and classes 0..C-1; null: model.classifier.n_classes"
    )

    @classmethod
    def examples(cls) -> list[MajorityTask]:
        return [cls(seq_len=9, n_classes=3, val_size=8), cls(seq_len=20, n_classes=5, val_size=8)]

    def resolve(self, model: ModelSpec) -> MajorityTask:
        if self.n_classes is None and model.classifier is not None:
            return self.model_copy(update={"n_classes": model.classifier.n_classes})
        return self

    def check(self, model: ModelSpec) -> list[Problem]:
        out = super().check(model)
        head = model.classifier.n_classes if model.classifier is not None else None
        if head is not None and self.n_classes is not None and self.n_classes != head:
            out.append(
                (
                    ("n_classes",),
                    f"the task has {self.n_classes} classes, the model's classifier {head}",
                    f"{head} (model.classifier.n_classes)",
                )
            )
        if self.n_classes is not None and self.n_classes > model.vocab_size:
            out.append(
                (
                    ("n_classes",),
                    f"the task uses ids 0..{self.n_classes - 1} but the model's vocab_size "
                    f"is {model.vocab_size}",
                    f"<= {model.vocab_size}",
                )
            )
        return out


def majority_sample(*, seq_len: int, n_classes: int, generator: torch.Generator) -> Sample:
    """Ids ``0..C-1``; the class is the id that occurs most often, and it is a strict
    majority (a uniformly drawn class is topped up with just enough random positions).
    ``labels`` is a scalar."""
    label = int(torch.randint(n_classes, (1,), generator=generator))
    inputs = torch.randint(n_classes, (seq_len,), generator=generator)  # (L,)
    counts = torch.bincount(inputs, minlength=n_classes)  # (C,)
    others = counts.clone()
    others[label] = -1
    need = max(0, int(others.max()) + 1 - int(counts[label]))
    free = (inputs != label).nonzero().squeeze(1)  # positions holding another id
    chosen = free[torch.randperm(free.numel(), generator=generator)[:need]]
    inputs[chosen] = label
    return {"input_ids": inputs, "labels": torch.tensor(label, dtype=torch.long)}


@register_task(MajorityTask)
class Majority(GeneratedTask):
    cfg: MajorityTask
    kind = "classification"

    def sample(self, split: Split, step: int, index: int) -> Sample:
        return majority_sample(
            seq_len=self.cfg.seq_len,
            n_classes=self.cfg.n_classes,
            generator=self.generator(split, step, index),
        )
