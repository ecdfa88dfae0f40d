"""Synthetic tasks for sequence mixers, generated from a seed (no files, no network).

Each ``*_sample`` function is pure: the same arguments and a generator in the same
state give the same sample. Token ids are ordinary ids ``0..vocab_size-1`` of the
task (checked against the model at load). Targets are aligned with the inputs:
``labels[t]`` is what the output at position ``t`` must predict, ``IGNORE_INDEX``
where nothing is scored, so accuracy counts answer positions only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mixstack.dsl.spec import InductionTask, MajorityTask, MQARTask, SelectiveCopyTask
from mixstack.tasks.base import IGNORE_INDEX, Sample, Split, Task

# Selective copying: blank filler and the "now copy" marker (ids 0 and 1).
BLANK, MARKER = 0, 1
# Induction heads: the trigger token.
TRIGGER = 0


def _ignored(length: int) -> Tensor:
    return torch.full((length,), IGNORE_INDEX, dtype=torch.long)


def mqar_sample(
    *,
    n_pairs: int,
    seq_len: int,
    vocab_size: int,
    power_a: float,
    random_non_queries: bool,
    generator: torch.Generator,
) -> Sample:
    """Multi-query associative recall (Arora et al. 2023, "Zoology"; HazyResearch/zoology
    ``multiquery_ar``).

    ``k_1 v_1 k_2 v_2 ... k_n v_n`` (keys from ``1..V/2-1``, values from ``V/2..V-1``,
    all distinct), then the query region: every key appears once more at an even
    offset ``2g`` after the pairs, where the gaps ``g`` are drawn without replacement
    with probability ∝ ``a·(g+1)^(a-1)`` (small ``a`` puts queries near the pairs).
    The output at a query's position must be its value. The remaining positions are
    random ids (``random_non_queries``) or 0. Example, n=2, L=8, V=8 (before the
    random fill)::

        inputs  1 5 3 6 | 3 0 1 0        labels  - - - - | 6 - 5 -
    """
    half = vocab_size // 2
    keys = 1 + torch.randperm(half - 1, generator=generator)[:n_pairs]  # (n,)
    values = half + torch.randperm(vocab_size - half, generator=generator)[:n_pairs]  # (n,)
    context = 2 * n_pairs
    slots = (seq_len - context) // 2
    weights = power_a * torch.arange(1, slots + 1, dtype=torch.float64) ** (power_a - 1)
    gaps = torch.multinomial(weights, n_pairs, replacement=False, generator=generator)  # (n,)
    inputs = torch.zeros(seq_len, dtype=torch.long)
    inputs[0:context:2] = keys
    inputs[1:context:2] = values
    positions = context + 2 * gaps  # (n,): where key i is queried
    inputs[positions] = keys
    labels = _ignored(seq_len)
    labels[positions] = values
    if random_non_queries:
        noise = torch.randint(vocab_size, (seq_len,), generator=generator)
        inputs = torch.where(inputs == 0, noise, inputs)
    return {"input_ids": inputs, "labels": labels}


def selective_copy_sample(
    *, n_tokens: int, seq_len: int, vocab_size: int, generator: torch.Generator
) -> Sample:
    """Selective copying (Gu & Dao 2023, "Mamba", §3.1): ``n_tokens`` data tokens (ids
    ``2..V-1``) at random positions of a blank (id 0) context of ``seq_len - n_tokens``,
    then ``n_tokens`` markers (id 1); at the k-th marker the output must be the k-th
    data token. Example, 3 tokens, L=9::

        inputs  0 7 0 0 4 9 | 1 1 1      labels  - - - - - - | 7 4 9
    """
    context = seq_len - n_tokens
    data = 2 + torch.randint(vocab_size - 2, (n_tokens,), generator=generator)  # (n,)
    positions = torch.randperm(context, generator=generator)[:n_tokens].sort().values
    inputs = torch.full((seq_len,), BLANK, dtype=torch.long)
    inputs[positions] = data
    inputs[context:] = MARKER
    labels = _ignored(seq_len)
    labels[context:] = data
    return {"input_ids": inputs, "labels": labels}


def induction_sample(*, seq_len: int, vocab_size: int, generator: torch.Generator) -> Sample:
    """Induction heads (Olsson et al. 2022; the H3/Hyena synthetic): random ids from
    ``1..V-1``, the trigger (id 0) at a random position ``p <= L-3`` and again at the
    last position, where the output must be the token that followed the first trigger.
    Example, L=6::

        inputs  5 0 3 8 2 0              labels  - - - - - 3
    """
    inputs = 1 + torch.randint(vocab_size - 1, (seq_len,), generator=generator)  # (L,)
    p = int(torch.randint(seq_len - 2, (1,), generator=generator))
    inputs[p] = TRIGGER
    inputs[-1] = TRIGGER
    labels = _ignored(seq_len)
    labels[-1] = inputs[p + 1]
    return {"input_ids": inputs, "labels": labels}


def majority_sample(*, seq_len: int, n_classes: int, generator: torch.Generator) -> Sample:
    """Sequence classification: ids ``0..C-1``; the class is the id that occurs most
    often, and it is a strict majority (a uniformly drawn class is topped up with
    just enough random positions). ``labels`` is a scalar."""
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


class _SyntheticTask(Task):
    """A generated task: an endless training stream and a fixed validation set."""

    def __init__(self, cfg: MQARTask | SelectiveCopyTask | InductionTask | MajorityTask, seed: int):
        super().__init__(seed)
        self.cfg = cfg

    @property
    def val_size(self) -> int:
        return self.cfg.val_size

    @property
    def epoch_size(self) -> int | None:
        return self.cfg.epoch_size


class MQAR(_SyntheticTask):
    def sample(self, split: Split, step: int, index: int) -> Sample:
        cfg = self.cfg
        return mqar_sample(
            n_pairs=cfg.n_pairs,
            seq_len=cfg.seq_len,
            vocab_size=cfg.vocab_size,
            power_a=cfg.power_a,
            random_non_queries=cfg.random_non_queries,
            generator=self.generator(split, step, index),
        )


class SelectiveCopy(_SyntheticTask):
    def sample(self, split: Split, step: int, index: int) -> Sample:
        cfg = self.cfg
        return selective_copy_sample(
            n_tokens=cfg.n_tokens,
            seq_len=cfg.seq_len,
            vocab_size=cfg.vocab_size,
            generator=self.generator(split, step, index),
        )


class Induction(_SyntheticTask):
    def sample(self, split: Split, step: int, index: int) -> Sample:
        return induction_sample(
            seq_len=self.cfg.seq_len,
            vocab_size=self.cfg.vocab_size,
            generator=self.generator(split, step, index),
        )


class Majority(_SyntheticTask):
    kind = "classification"

    def sample(self, split: Split, step: int, index: int) -> Sample:
        return majority_sample(
            seq_len=self.cfg.seq_len,
            n_classes=self.cfg.n_classes,
            generator=self.generator(split, step, index),
        )
