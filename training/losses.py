"""Losses per arch, as plain functions (usable from Lightning, Fabric or a bare loop).

Targets follow :mod:`mixstack.tasks.base`: LM labels are aligned with the inputs
(``labels[t]`` is the target of the output at ``t``) and ``IGNORE_INDEX`` marks
positions that are not scored, so one cross-entropy serves next-token prediction
(synthetic tasks, text) and masked-LM alike; the classifier has one label per row.
Every loss is the mean over scored targets; :func:`loss_sum` gives the sum and the
count, so means over several batches can be weighted by tokens exactly.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from mixstack.tasks.base import IGNORE_INDEX

Objective = Literal["next_token", "masked_lm", "classification"]
OBJECTIVES: dict[str, Objective] = {
    "causal_lm": "next_token",
    "encoder": "masked_lm",
    "classifier": "classification",
}


def objective_for(arch: str) -> Objective:
    """What an arch is trained to do: causal_lm next-token, encoder masked-LM,
    classifier classification."""
    return OBJECTIVES[arch]


def next_token_labels(input_ids: Tensor, seq_idx: Tensor | None = None) -> Tensor:
    """Labels for next-token prediction on raw token rows: ``labels[:, t] = ids[:, t+1]``;
    the last position, and a position whose next token starts another document
    (``seq_idx`` changes) or is padding (``seq_idx == -1``), are ignored. ``(B, L)``."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    if seq_idx is not None:
        other = torch.ones_like(input_ids, dtype=torch.bool)
        other[:, :-1] = (seq_idx[:, 1:] != seq_idx[:, :-1]) | (seq_idx[:, 1:] < 0)
        labels[other] = IGNORE_INDEX
    return labels


def mask_tokens(
    input_ids: Tensor,
    *,
    mask_rate: float,
    mask_id: int,
    generator: torch.Generator,
    maskable: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Masked-LM corruption (BERT's objective, every chosen id replaced by ``mask_id``).

    Each position of ``input_ids (..., L)`` is chosen independently with probability
    ``mask_rate`` (drawn from ``generator``, so it is reproducible), among ``maskable``
    positions (default all). At least one maskable position per row is chosen, so every
    row has a target. Returns ``(corrupted ids, labels)``: labels hold the original id
    at chosen positions and ``IGNORE_INDEX`` elsewhere.
    """
    allowed = torch.ones_like(input_ids, dtype=torch.bool) if maskable is None else maskable
    draw = torch.rand(input_ids.shape, generator=generator)
    chosen = (draw < mask_rate) & allowed
    # Rows where nothing was drawn: take the allowed position with the smallest draw.
    empty = ~chosen.any(dim=-1, keepdim=True) & allowed.any(dim=-1, keepdim=True)
    first = draw.masked_fill(~allowed, 2.0).argmin(dim=-1, keepdim=True)
    chosen |= empty & torch.zeros_like(chosen).scatter(-1, first, True)
    labels = torch.where(chosen, input_ids, IGNORE_INDEX)
    return input_ids.masked_fill(chosen, mask_id), labels


def loss_sum(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum of cross-entropy over scored targets, their count)`` in fp32.

    LM: ``logits (B, L, V)``, ``labels (B, L)``; classifier: ``(B, C)``, ``(B,)``.
    """
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()  # (N, V)
    flat_labels = labels.reshape(-1)  # (N,)
    if torch.compiler.is_compiling():  # the plain form, which inductor fuses on its own
        total = F.cross_entropy(
            flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum"
        )
    else:
        total = _CrossEntropySum.apply(flat_logits, flat_labels)
    return total, (flat_labels != IGNORE_INDEX).sum()


class _CrossEntropySum(torch.autograd.Function):
    """``Σ_{scored n} −log_softmax(logits[n])[labels[n]]`` for ``logits (N, V)``,
    ``labels (N,)`` (``IGNORE_INDEX``: not scored), as ``F.cross_entropy(reduction="sum")``
    computes it, with a leaner backward.

    The forward keeps the (N, V) log-probabilities it computes anyway; the backward turns
    that buffer into the gradient in place, ``softmax · g_n`` minus ``g_n`` at the label.
    Autograd through ``F.cross_entropy`` instead fills a fresh (N, V) zero tensor,
    scatters the one-hot into it and writes a third (N, V) tensor (the LM head's logits
    are the largest activation of a small LM: 2048 × 8192 in the benchmark, where this
    is 132 → 83 ms per step, 1 thread). Because the buffer is consumed, the graph can be
    differentiated once only; a second backward raises instead of giving wrong numbers.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, logits: Tensor, labels: Tensor) -> Tensor:
        logp = torch.log_softmax(logits, dim=-1)  # (N, V)
        scored = labels != IGNORE_INDEX  # (N,)
        safe = labels.masked_fill(~scored, 0)[:, None]  # (N, 1): any column where unscored
        picked = logp.gather(1, safe)[:, 0]  # (N,) log-probability of each label
        ctx.save_for_backward(logp, safe, scored)
        ctx.consumed = False
        return -(picked * scored).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        if ctx.consumed:
            raise RuntimeError(
                "the cross-entropy of mixstack.training.losses was differentiated twice "
                "(retain_graph): its backward reuses its buffer, so only one backward is "
                "supported; compute the loss again for a second one"
            )
        ctx.consumed = True
        logp, safe, scored = ctx.saved_tensors
        weight = (grad * scored).to(logp.dtype)[:, None]  # (N, 1): 0 for unscored rows
        out = logp.exp_().mul_(weight)  # softmax · g, in the log-probabilities' buffer
        return out.scatter_add_(1, safe, -weight), None


def mean_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over scored targets (0, with a gradient, when none is scored)."""
    total, count = loss_sum(logits, labels)
    return total / count.clamp(min=1)


_LOGITS_RANK: dict[Objective, int] = {"next_token": 3, "masked_lm": 3, "classification": 2}


def compute_loss(objective: Objective, logits: Tensor, labels: Tensor) -> Tensor:
    """The training loss of ``objective``: mean cross-entropy over scored targets.

    - ``next_token`` (causal_lm): ``logits (B, L, V)``, aligned next-token ``labels (B, L)``
      (from the task, or :func:`next_token_labels`);
    - ``masked_lm`` (encoder): ``logits (B, L, V)``, ``labels (B, L)`` from
      :func:`mask_tokens` (only masked positions are scored);
    - ``classification`` (classifier): ``logits (B, C)``, ``labels (B,)``.
    """
    rank = _LOGITS_RANK[objective]
    if logits.dim() != rank or labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"{objective} loss needs logits of rank {rank} and labels of shape logits.shape[:-1]; "
            f"got logits {tuple(logits.shape)} and labels {tuple(labels.shape)}"
        )
    return mean_loss(logits, labels)
