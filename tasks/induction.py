"""Induction heads (Olsson et al. 2022; the H3/Hyena synthetic): config and generator."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from mixstack.dsl.registry import register_task
from mixstack.tasks.base import GeneratedTask, GeneratedTaskConfig, Sample, Split, ignored

# The trigger token.
TRIGGER = 0


class InductionTask(GeneratedTaskConfig):
    """Induction heads: after the trigger's second occurrence, recall what followed it."""

    type: Literal["induction"] = "induction"
    vocab_size: int | None = Field(
        None, ge=2, description="ids used: 0 trigger, others 1..V-1; null: the model's"
    )

    @classmethod
    def examples(cls) -> list[InductionTask]:
        return [cls(seq_len=12, vocab_size=16, val_size=8)]


def induction_sample(*, seq_len: int, vocab_size: int, generator: torch.Generator) -> Sample:
    """Random ids from ``1..V-1``, the trigger (id 0) at a random position ``p <= L-3``
    and again at the last position, where the output must be the token that followed
    the first trigger. Example, L=6::

        inputs  5 0 3 8 2 0              labels  - - - - - 3
    """
    inputs = 1 + torch.randint(vocab_size - 1, (seq_len,), generator=generator)  # (L,)
    p = int(torch.randint(seq_len - 2, (1,), generator=generator))
    inputs[p] = TRIGGER
    inputs[-1] = TRIGGER
    labels = ignored(seq_len)
    labels[-1] = inputs[p + 1]
    return {"input_ids": inputs, "labels": labels}


@register_task(InductionTask)
class Induction(GeneratedTask):
    cfg: InductionTask

    def sample(self, split: Split, step: int, index: int) -> Sample:
        return induction_sample(
            seq_len=self.cfg.seq_len,
            vocab_size=self.cfg.vocab_size,
            generator=self.generator(split, step, index),
        )
