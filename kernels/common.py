"""Small pieces of kernel arithmetic shared by several kernels and mixers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def zero_padding(x: Tensor, seq_idx: Tensor | None, *, channel_dim: int = -1) -> Tensor:
    """``x`` with every padded position (``seq_idx < 0``) set to zero.

    ``x`` is ``(B, L, ...)`` with the sequence axis 1 (``channel_dim=-1``, the mixers'
    layout), or ``(B, C, L)`` with channels before the sequence (``channel_dim=1``, the
    convolution layout). ``seq_idx (B, L)``; ``None`` means no padding.
    """
    if seq_idx is None:
        return x
    pad = seq_idx < 0  # (B, L)
    if channel_dim == 1:
        return x.masked_fill(pad[:, None, :], 0.0)
    return x.masked_fill(pad.reshape(*pad.shape, *([1] * (x.dim() - 2))), 0.0)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64 (exact tests); everything else is computed in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def document_runs(seq_idx: Tensor) -> tuple[Tensor, Tensor]:
    """Segment packed rows into documents.

    ``seq_idx (B, L)`` int -> ``run (B, L)`` int64 and ``pad (B, L)`` bool. ``run``
    counts document starts so far: 0 for the first document of a row (the one an
    initial state belongs to), +1 at each later start. A start is a non-padding position
    whose id differs from the id of the previous non-padding position; padding keeps
    the run of the position before it, so it never separates a document from itself.
    """
    bsz, length = seq_idx.shape
    pad = seq_idx < 0
    pos = torch.arange(length, device=seq_idx.device).expand(bsz, length)
    last_real = torch.where(pad, -1, pos).cummax(dim=1).values  # (B, L): last non-pad <= t
    prev_real = F.pad(last_real[:, :-1], (1, 0), value=-1)  # (B, L): last non-pad < t
    prev_id = seq_idx.gather(1, prev_real.clamp(min=0))
    start = ~pad & (prev_real >= 0) & (seq_idx != prev_id)
    return start.long().cumsum(dim=1), pad
