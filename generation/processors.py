"""Score processors and token choice, applied to next-token logits ``(B, V)``.

The order is the one of transformers' ``generate``: repetition penalty, then (while
``min_new_tokens`` are not reached) EOS masked, then temperature, top-k and top-p; a
token is then the argmax (greedy, ``temperature == 0``) or drawn from the softmax with
one explicit ``torch.Generator``. Every function returns a new tensor; scores are
computed in at least fp32 (fp64 stays fp64).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mixstack.dsl.errors import MixstackError

NEG_INF = float("-inf")


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen (checked by :meth:`check`).

    temperature: 0 = greedy (argmax); > 0 divides the scores before sampling.
    top_k: keep the k highest scores (ties at the k-th score kept); None = all.
    top_p: keep the smallest set of highest-probability tokens whose mass reaches
        top_p (nucleus sampling); None = all.
    repetition_penalty: > 0; each token already in the row's history has its score
        divided by it when positive, multiplied when negative (CTRL, Keskar et al.
        2019); None or 1 = off.
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def check(self) -> None:
        """Raise :class:`MixstackError` naming the bad argument and the allowed range."""
        if isinstance(self.temperature, bool) or not self.temperature >= 0:
            raise MixstackError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if self.top_k is not None and (
            isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1
        ):
            raise MixstackError(f"top_k must be an int >= 1 (or None), got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise MixstackError(f"top_p must be in (0, 1] (or None), got {self.top_p!r}")
        penalty = self.repetition_penalty
        if penalty is not None and not penalty > 0:
            raise MixstackError(f"repetition_penalty must be > 0 (or None), got {penalty!r}")


def repetition_penalty(
    scores: Tensor, history: Tensor, penalty: float, valid: Tensor | None = None
) -> Tensor:
    """Penalise every id present in ``history (B, T)`` (where ``valid (B, T)`` is True):
    ``s / penalty`` if ``s > 0`` else ``s * penalty``. ``scores (B, V)``."""
    counts = torch.zeros_like(scores, dtype=torch.long)  # (B, V)
    seen = torch.ones_like(history) if valid is None else valid.long()
    counts.scatter_add_(1, history, seen)
    penalised = torch.where(scores > 0, scores / penalty, scores * penalty)
    return torch.where(counts > 0, penalised, scores)


def top_k_filter(scores: Tensor, k: int) -> Tensor:
    """Scores below the k-th highest of each row set to -inf (ties with it kept)."""
    k = min(k, scores.shape[-1])
    kth = torch.topk(scores, k, dim=-1).values[..., -1:]  # (B, 1)
    return scores.masked_fill(scores < kth, NEG_INF)


def top_p_filter(scores: Tensor, p: float) -> Tensor:
    """Keep, per row, the highest-probability tokens until their mass reaches ``p``: a
    token is dropped when the tokens ranked above it already hold ``>= p``. The top
    token is always kept."""
    ordered, order = torch.sort(scores, dim=-1, descending=True)  # (B, V)
    probs = torch.softmax(ordered, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # mass of the tokens ranked above
    drop_sorted = before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return scores.masked_fill(drop, NEG_INF)


def process(
    logits: Tensor,
    sampling: Sampling,
    *,
    history: Tensor | None = None,
    history_valid: Tensor | None = None,
    banned: list[int] | None = None,
) -> Tensor:
    """``logits (B, V)`` -> processed scores ``(B, V)`` (fp32 at least).

    history (B, T): ids seen so far (prompt and generated) for the repetition penalty;
    history_valid (B, T): False at padding. banned: ids set to -inf (EOS before
    ``min_new_tokens``).
    """
    scores = logits.to(torch.promote_types(logits.dtype, torch.float32))
    penalty = sampling.repetition_penalty
    if penalty is not None and penalty != 1.0 and history is not None and history.numel():
        scores = repetition_penalty(scores, history, penalty, history_valid)
    if banned:
        scores = scores.clone()
        scores[:, banned] = NEG_INF
    if sampling.greedy:
        return scores  # top-k / top-p never change the argmax
    scores = scores / sampling.temperature
    if sampling.top_k is not None:
        scores = top_k_filter(scores, sampling.top_k)
    if sampling.top_p is not None and sampling.top_p < 1.0:
        scores = top_p_filter(scores, sampling.top_p)
    return scores


def choose(scores: Tensor, sampling: Sampling, generator: torch.Generator | None) -> Tensor:
    """Next token per row ``(B,)``: argmax when greedy, else one draw from
    ``softmax(scores)`` with ``generator``."""
    if sampling.greedy:
        return scores.argmax(dim=-1)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
