"""Selective copying (Gu & Dao 2023, "Mamba", §3.1): config and generator."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from mixstack.dsl.registry import register_task
from mixstack.dsl.spec import ModelSpec, Problem
from mixstack.tasks.base import GeneratedTask, GeneratedTaskConfig, Sample, Split, ignored

# Blank filler and the "now copy" marker (ids 0 and 1).
BLANK, MARKER = 0, 1


class SelectiveCopyTask(GeneratedTaskConfig):
    """Selective copying (Mamba §3.1): copy the scattered data tokens at the markers."""

    type: Literal["selective_copy"] = "selective_copy"
    n_tokens: int = Field(8, ge=1, description="data tokens to copy")
    vocab_size: int | None = Field(
        None, ge=3, description="ids used: 0 blank, 1 marker, data 2..V-1; null: the model's"
    )

    @classmethod
    def examples(cls) -> list[SelectiveCopyTask]:
        return [cls(n_tokens=4, seq_len=16, vocab_size=10, val_size=8)]

    def check(self, model: ModelSpec) -> list[Problem]:
        out = super().check(model)
        if 2 * self.n_tokens > self.seq_len:
            out.append(
                (
                    ("n_tokens",),
                    f"{self.n_tokens} tokens need seq_len >= 2·n_tokens = {2 * self.n_tokens} "
                    f"(a context holding them, then one marker each), seq_len is {self.seq_len}",
                    f"n_tokens <= {self.seq_len // 2}",
                )
            )
        return out


def selective_copy_sample(
    *, n_tokens: int, seq_len: int, vocab_size: int, generator: torch.Generator
) -> Sample:
    """``n_tokens`` data tokens (ids ``2..V-1``) at random positions of a blank (id 0)
    context of ``seq_len - n_tokens``, then ``n_tokens`` markers (id 1); at the k-th
    marker the output must be the k-th data token. Example, 3 tokens, L=9::

        inputs  0 7 0 0 4 9 | 1 1 1      labels  - - - - - - | 7 4 9
    """
    context = seq_len - n_tokens
    data = 2 + torch.randint(vocab_size - 2, (n_tokens,), generator=generator)  # (n,)
    positions = torch.randperm(context, generator=generator)[:n_tokens].sort().values
    inputs = torch.full((seq_len,), BLANK, dtype=torch.long)
    inputs[positions] = data
    inputs[context:] = MARKER
    labels = ignored(seq_len)
    labels[context:] = data
    return {"input_ids": inputs, "labels": labels}


@register_task(SelectiveCopyTask)
class SelectiveCopy(GeneratedTask):
    cfg: SelectiveCopyTask

    def sample(self, split: Split, step: int, index: int) -> Sample:
        cfg = self.cfg
        return selective_copy_sample(
            n_tokens=cfg.n_tokens,
            seq_len=cfg.seq_len,
            vocab_size=cfg.vocab_size,
            generator=self.generator(split, step, index),
        )
