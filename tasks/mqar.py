"""Multi-query associative recall (Arora et al. 2023, "Zoology"; HazyResearch/zoology
``multiquery_ar``): config, generator and the extra metric ``exact_match``."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from mixstack.dsl.registry import MetricDef, register_task
from mixstack.dsl.spec import ModelSpec, Problem
from mixstack.tasks.base import (
    IGNORE_INDEX,
    GeneratedTask,
    GeneratedTaskConfig,
    Sample,
    Split,
    ignored,
)


class MQARTask(GeneratedTaskConfig):
    """Multi-query associative recall (zoology semantics; accuracy on answer positions).

    Every key is asked by default; ``n_queries`` asks a random subset of that size per
    sample, so that ``read_twice`` (the queries shown before the second reading) lets a
    recurrent model keep only the pairs that will be asked."""

    type: Literal["mqar"] = "mqar"
    n_pairs: int = Field(4, ge=1, description="key-value pairs per sequence")
    n_queries: int | None = Field(
        None,
        ge=1,
        description="keys queried per sequence, drawn at random among the pairs; "
        "null: every pair is queried",
    )
    vocab_size: int | None = Field(
        None,
        ge=4,
        description="ids used: keys 1..V/2-1, values V/2..V-1; null: the model's vocab_size",
    )
    power_a: float = Field(
        0.01, gt=0, le=1, description="query gap g drawn with probability ∝ a·(g+1)^(a-1)"
    )
    random_non_queries: bool = Field(True, description="fill other positions with random ids")
    read_twice: bool = Field(
        False,
        description="JRT prompting: pairs, queries, pairs, queries again; only the second "
        "queries are scored (each copy is seq_len // 2 long)",
    )

    @classmethod
    def examples(cls) -> list[MQARTask]:
        return [
            cls(n_pairs=4, seq_len=32, vocab_size=64, val_size=8),
            cls(n_pairs=3, seq_len=13, vocab_size=10, random_non_queries=False, val_size=8),
            cls(n_pairs=4, seq_len=65, vocab_size=64, read_twice=True, val_size=8),
            cls(n_pairs=6, n_queries=2, seq_len=32, vocab_size=32, val_size=8),
            cls(n_pairs=6, n_queries=2, seq_len=64, vocab_size=32, read_twice=True, val_size=8),
        ]

    def check(self, model: ModelSpec) -> list[Problem]:
        out = super().check(model)
        if self.n_queries is not None and self.n_queries > self.n_pairs:
            out.append(
                (
                    ("n_queries",),
                    f"{self.n_queries} queries need as many distinct keys, "
                    f"there are n_pairs = {self.n_pairs}",
                    f"n_queries <= {self.n_pairs} (or null: every pair)",
                )
            )
        elif self.n_queries is not None:
            # pairs (2n), then one query slot (2 positions) per queried key: L >= 2n + 2q
            need, copies = 2 * self.n_pairs + 2 * self.n_queries, 2 if self.read_twice else 1
            if copies * need > self.seq_len:
                twice = " read twice (two copies)" if self.read_twice else ""
                out.append(
                    (
                        ("n_queries",),
                        f"{self.n_pairs} pairs with {self.n_queries} queries{twice} need "
                        f"seq_len >= {copies}·(2·n_pairs + 2·n_queries) = {copies * need}, "
                        f"seq_len is {self.seq_len}",
                        f"seq_len >= {copies * need}, or fewer pairs or queries",
                    )
                )
        elif self.read_twice and 8 * self.n_pairs > self.seq_len:
            out.append(
                (
                    ("n_pairs",),
                    f"{self.n_pairs} pairs read twice need seq_len >= 8·n_pairs = "
                    f"{8 * self.n_pairs} (two copies of pairs and queries), "
                    f"seq_len is {self.seq_len}",
                    f"n_pairs <= {self.seq_len // 8}",
                )
            )
        elif 4 * self.n_pairs > self.seq_len:
            out.append(
                (
                    ("n_pairs",),
                    f"{self.n_pairs} pairs need seq_len >= 4·n_pairs = {4 * self.n_pairs} "
                    f"(pairs, then one query slot per pair among (seq_len - 2n)/2), "
                    f"seq_len is {self.seq_len}",
                    f"n_pairs <= {self.seq_len // 4}",
                )
            )
        vocab = self.vocab_size or model.vocab_size
        if vocab // 2 - 1 < self.n_pairs:
            out.append(
                (
                    ("vocab_size",),
                    f"{self.n_pairs} distinct keys need vocab_size >= {2 * self.n_pairs + 2} "
                    f"(keys come from 1..V/2-1), got {vocab}",
                    f">= {2 * self.n_pairs + 2}",
                )
            )
        return out


def mqar_sample(
    *,
    n_pairs: int,
    n_queries: int | None = None,
    seq_len: int,
    vocab_size: int,
    power_a: float,
    random_non_queries: bool,
    generator: torch.Generator,
) -> Sample:
    """``k_1 v_1 k_2 v_2 ... k_n v_n`` (keys from ``1..V/2-1``, values from ``V/2..V-1``,
    all distinct), then the query region: every key (or ``n_queries`` of them, a random
    subset drawn after the values, in random order) appears once more at an even
    offset ``2g`` after the pairs, where the gaps ``g`` are drawn without replacement
    with probability ∝ ``a·(g+1)^(a-1)`` (small ``a`` puts queries near the pairs).
    The output at a query's position must be its value. ``n_queries=None`` draws nothing
    for the subset, so its samples are those of the all-keys task. The remaining positions are
    random ids (``random_non_queries``) or 0. Example, n=2, L=8, V=8 (before the
    random fill)::

        inputs  1 5 3 6 | 3 0 1 0        labels  - - - - | 6 - 5 -
    """
    half = vocab_size // 2
    keys = 1 + torch.randperm(half - 1, generator=generator)[:n_pairs]  # (n,)
    values = half + torch.randperm(vocab_size - half, generator=generator)[:n_pairs]  # (n,)
    asked = (  # (q,): which pairs are queried
        torch.arange(n_pairs)
        if n_queries is None
        else torch.randperm(n_pairs, generator=generator)[:n_queries]
    )
    context = 2 * n_pairs
    slots = (seq_len - context) // 2
    weights = power_a * torch.arange(1, slots + 1, dtype=torch.float64) ** (power_a - 1)
    gaps = torch.multinomial(weights, len(asked), replacement=False, generator=generator)  # (q,)
    inputs = torch.zeros(seq_len, dtype=torch.long)
    inputs[0:context:2] = keys
    inputs[1:context:2] = values
    positions = context + 2 * gaps  # (q,): where key asked[i] is queried
    inputs[positions] = keys[asked]
    labels = ignored(seq_len)
    labels[positions] = values[asked]
    if random_non_queries:
        noise = torch.randint(vocab_size, (seq_len,), generator=generator)
        inputs = torch.where(inputs == 0, noise, inputs)
    return {"input_ids": inputs, "labels": labels}


def read_twice(sample: Sample, seq_len: int) -> Sample:
    """JRT prompting ("Just read twice", Arora et al. 2024) of a sample of
    ``seq_len // 2`` positions: the same inputs twice, scored only in the second copy (the
    first copy's queries come without answers, so the second reading of the context knows
    what will be asked). An odd ``seq_len`` ends with one unscored 0. Example, MQAR n=2::

        inputs  1 5 3 6 3 0 1 0 | 1 5 3 6 3 0 1 0      labels  - - - - - - - - | - - - - 6 - 5 -
    """
    half = sample["input_ids"].shape[0]
    extra = seq_len - 2 * half
    inputs = torch.cat([sample["input_ids"], sample["input_ids"], torch.zeros(extra).long()])
    labels = torch.cat([ignored(half), sample["labels"], ignored(extra)])
    return {"input_ids": inputs, "labels": labels}


def rows_all_correct(logits: Tensor, labels: Tensor) -> tuple[Tensor]:
    """``(B,)`` 1.0 where every scored position of the row is predicted right
    (``logits (B, L, V)``, ``labels (B, L)``)."""
    scored = labels != IGNORE_INDEX
    right = (logits.argmax(dim=-1) == labels) | ~scored
    return (right.all(dim=-1).float(),)


def _mean(n_out: int) -> Any:
    from torchmetrics import MeanMetric

    return MeanMetric()


EXACT_MATCH = MetricDef(
    name="exact_match",
    higher_is_better=True,
    description="fraction of sequences whose every query is answered right",
    factory=_mean,
    prepare=rows_all_correct,
)


@register_task(MQARTask, metrics=[EXACT_MATCH])
class MQAR(GeneratedTask):
    cfg: MQARTask

    def sample(self, split: Split, step: int, index: int) -> Sample:
        cfg = self.cfg
        sample = mqar_sample(
            n_pairs=cfg.n_pairs,
            n_queries=cfg.n_queries,
            seq_len=cfg.seq_len // 2 if cfg.read_twice else cfg.seq_len,
            vocab_size=cfg.vocab_size,
            power_a=cfg.power_a,
            random_non_queries=cfg.random_non_queries,
            generator=self.generator(split, step, index),
        )
        return read_twice(sample, cfg.seq_len) if cfg.read_twice else sample
