"""Small pieces of kernel arithmetic shared by several kernels and mixers."""

from __future__ import annotations

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
