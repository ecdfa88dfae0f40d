"""Passkey retrieval (Mohtashami & Jaggi 2023, "Landmark Attention"; the state-capacity
probe of "Stuffed Mamba"): a random digit key hidden at a chosen depth of a repeated
filler text, asked for at the end. Byte-level: ids are UTF-8 bytes (the model's
``vocab_size`` must be at least 256).

A sample of ``seq_len`` bytes reads::

    <filler ...> The pass key is 48213. Remember it. 48213 is the pass key. <filler ...>
    What is the pass key? The pass key is 48213

and only the outputs that predict the key's digits at the end are scored. ``depth`` is the
fraction of the filler before the needle: 0 puts it first, 1 right before the question.
With ``read_twice`` the context (filler and needle) and the question are shown twice,
``context, question, context, question → key`` (the key scored only after the second).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from mixstack.dsl.registry import MetricDef, register_task
from mixstack.dsl.spec import ModelSpec, Problem
from mixstack.tasks.base import GeneratedTask, GeneratedTaskConfig, Sample, Split, ignored
from mixstack.tasks.mqar import rows_all_correct

FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
QUESTION = "What is the pass key? The pass key is "


def needle(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key. "


class PasskeyTask(GeneratedTaskConfig):
    """Passkey retrieval: a digit key hidden in repeated filler text (bytes)."""

    type: Literal["passkey"] = "passkey"
    seq_len: int = Field(256, ge=3, description="bytes per sample (<= model.max_seq_len)")
    n_digits: int = Field(5, ge=1, le=20, description="digits of the key")
    depth: float | None = Field(
        None,
        ge=0,
        le=1,
        description="where the needle sits: the fraction of the filler before it "
        "(0: first, 1: right before the question); null: uniform per sample",
    )
    read_twice: bool = Field(
        False, description="context, question, context, question -> key (JRT prompting)"
    )

    @classmethod
    def examples(cls) -> list[PasskeyTask]:
        return [
            cls(seq_len=256, val_size=8),
            cls(seq_len=300, n_digits=3, depth=0.5, read_twice=True, val_size=8),
            cls(seq_len=160, n_digits=7, depth=1.0, val_size=8),
        ]

    def fixed_bytes(self) -> int:
        """Bytes that are not filler: the needle, the question(s) and the key."""
        n = len(needle("0" * self.n_digits)) + len(QUESTION)
        return (2 * n if self.read_twice else n) + self.n_digits

    def check(self, model: ModelSpec) -> list[Problem]:
        out = super().check(model)
        if model.vocab_size < 256:
            out.append(
                (
                    ("type",),
                    f"passkey is byte-level (ids 0..255), the model's vocab_size is "
                    f"{model.vocab_size}",
                    "a model with vocab_size >= 256",
                )
            )
        if self.fixed_bytes() > self.seq_len:
            out.append(
                (
                    ("seq_len",),
                    f"the needle, question{'s' if self.read_twice else ''} and key take "
                    f"{self.fixed_bytes()} bytes, more than seq_len {self.seq_len}",
                    f">= {self.fixed_bytes()}",
                )
            )
        return out


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def passkey_sample(
    *,
    seq_len: int,
    n_digits: int,
    depth: float | None,
    read_twice: bool,
    generator: torch.Generator,
) -> Sample:
    """The key's digits are uniform (a leading 0 allowed); the filler is ``FILLER``
    repeated and cut to the bytes left, split at ``round(depth · filler bytes)`` around the
    needle. ``labels[t]`` is the byte at ``t + 1`` for the ``n_digits`` positions whose
    next byte is a digit of the final key. Example, key 42, the last bytes::

        inputs  ... k e y   i s   4 2          labels  ... - - - - - - - 4 2 -
    """
    g = generator
    key = "".join(str(int(d)) for d in torch.randint(10, (n_digits,), generator=g))
    if depth is None:
        depth = float(torch.rand((), generator=g))
    fixed = len(needle(key)) + len(QUESTION)
    free = seq_len - n_digits - (2 * fixed if read_twice else fixed)
    n_filler = free // 2 if read_twice else free  # filler bytes in one context
    reps = n_filler // len(FILLER) + 1
    filler = (FILLER * reps)[:n_filler]
    cut = round(depth * n_filler)
    context = filler[:cut] + needle(key) + filler[cut:]
    if read_twice:
        # an odd leftover byte: one space after the first question
        text = context + QUESTION + " " * (free % 2) + context + QUESTION + key
    else:
        text = context + QUESTION + key
    ids = torch.tensor(_bytes(text), dtype=torch.long)  # (L,)
    labels = ignored(seq_len)
    labels[seq_len - n_digits - 1 : seq_len - 1] = ids[seq_len - n_digits :]
    return {"input_ids": ids, "labels": labels}


def _mean(n_out: int) -> Any:
    from torchmetrics import MeanMetric  # imported when a run builds its metrics

    return MeanMetric()


PASSKEY_EXACT = MetricDef(
    name="passkey_exact",
    higher_is_better=True,
    description="fraction of sequences whose every key digit is predicted right",
    factory=_mean,
    prepare=rows_all_correct,
)


@register_task(PasskeyTask, metrics=[PASSKEY_EXACT])
class Passkey(GeneratedTask):
    cfg: PasskeyTask

    def sample(self, split: Split, step: int, index: int) -> Sample:
        cfg = self.cfg
        return passkey_sample(
            seq_len=cfg.seq_len,
            n_digits=cfg.n_digits,
            depth=cfg.depth,
            read_twice=cfg.read_twice,
            generator=self.generator(split, step, index),
        )
