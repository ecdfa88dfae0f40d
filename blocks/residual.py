"""The pre-norm residual block: one symbol of a pattern (DESIGN §3, docs/math.md#hybrid-layouts).

A block receives a norm and a layer that are already built (house rule 12): blocks/
never constructs or imports mixers, so any registered layer (or a parallel composite)
can sit inside.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


class ResidualBlock(nn.Module):
    """``x + dropout(mixer(norm(x)))``, the Megatron / GPT-2 pre-norm sub-layer.

    ::

        x ──────────────────────────────┐
        │                               │ (residual stream, width D)
        └─> norm ─> mixer ─> dropout ──(+)──> out

    The residual stays in the dtype of ``x``; the norm computes in fp32 internally.
    State-dict keys: ``norm.*`` and ``mixer.*``.

    Args:
        norm: built norm over the last axis (``weight (D,)``).
        mixer: built layer following the mixer protocol (``forward(x, *, input_ids,
            seq_idx, state)``; ``init_state``/``step`` when it decodes).
        dropout: probability on the branch output (training only).
        checkpointing: recompute the branch in backward (activation checkpointing,
            ``use_reentrant=False``); only while training and without a decode state.
    """

    def __init__(
        self, norm: nn.Module, mixer: nn.Module, dropout: float = 0.0, checkpointing: bool = False
    ) -> None:
        super().__init__()
        self.norm = norm
        self.mixer = mixer
        self.dropout = nn.Dropout(dropout)
        self.checkpointing = checkpointing

    def _branch(
        self, x: Tensor, input_ids: Tensor | None, seq_idx: Tensor | None, state: Any
    ) -> Tensor:
        out = self.mixer(self.norm(x), input_ids=input_ids, seq_idx=seq_idx, state=state)
        return self.dropout(out)  # (B, L, D)

    def forward(
        self,
        x: Tensor,
        *,
        input_ids: Tensor | None = None,
        seq_idx: Tensor | None = None,
        state: Any = None,
    ) -> Tensor:
        """``x (B, L, D) -> (B, L, D)``; with ``state`` this is a prefill filling it."""
        if self.checkpointing and self.training and state is None and torch.is_grad_enabled():
            branch = checkpoint(self._branch, x, input_ids, seq_idx, None, use_reentrant=False)
        else:
            branch = self._branch(x, input_ids, seq_idx, state)
        return x + branch

    def init_state(
        self, batch: int, max_len: int, *, device: torch.device | str | None, dtype: torch.dtype
    ) -> Any:
        """The mixer's decode state (the norm and residual are stateless)."""
        return self.mixer.init_state(batch, max_len, device=device, dtype=dtype)

    def step(self, x_t: Tensor, state: Any, *, token_t: Tensor | None = None) -> Tensor:
        """One token: ``x_t (B, D) -> (B, D)``, updating ``state`` in place."""
        return x_t + self.dropout(self.mixer.step(self.norm(x_t), state, token_t=token_t))

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Norm to its identity init, mixer by its own rule (docs/math.md#initialisation),
        from ``generator``."""
        self.norm.reset_parameters(generator)
        self.mixer.reset_parameters(generator)

    def state_nbytes(self, seq_len: int, dtype: torch.dtype) -> int:
        """Decode-state bytes of the mixer for one sequence of ``seq_len`` tokens."""
        return int(self.mixer.state_nbytes(seq_len, dtype))

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token of the mixer (2·MACs; the norm's few flops are left out)."""
        return float(self.mixer.flops_per_token(seq_len))
