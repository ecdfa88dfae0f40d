"""Token embedding with optional absolute positions and sqrt(d) scaling.

``weight (padded_vocab, D)``: rows past the real vocabulary exist only so the matrix
shape matches published checkpoints (``pad_vocab_multiple``); they are never read for
valid ids and their logits are sliced off by the model. RoPE is not here: it rotates
q/k inside attention.

Positions (``model.embedding.positional``):
  ``none``        nothing added (attention carries RoPE, or SSMs need none);
  ``learned``     ``positions.weight (max_seq_len, D)``, Normal(0, std) init (GPT-2);
  ``sinusoidal``  the fixed table of Vaswani et al. 2017,
                  ``PE[p, 2m] = sin(p / 10000^(2m/D))``, ``PE[p, 2m+1] = cos(...)``,
                  computed on the fly in fp32 (no buffer, so meta -> to_empty needs no
                  re-initialisation).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixstack.dsl.spec import EmbeddingConfig


def sinusoidal_positions(positions: Tensor, dim: int) -> Tensor:
    """``positions (L,) -> (L, D)`` fp32 table; odd ``D`` leaves the last column cosine-less."""
    half = (dim + 1) // 2
    freqs = torch.exp(
        torch.arange(half, device=positions.device, dtype=torch.float32)
        * (-math.log(1e4) * 2 / dim)
    )  # (ceil(D/2),)
    angles = positions.to(torch.float32)[:, None] * freqs[None, :]  # (L, ceil(D/2))
    table = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)  # (L, 2·ceil(D/2))
    return table[:, :dim]


class TokenEmbedding(nn.Module):
    """``input_ids (B, L) -> (B, L, D)``.

    Args:
        n_rows: embedding rows (the spec's ``padded_vocab``).
        dim: ``d_model``.
        cfg: the spec's ``embedding`` section.
        max_seq_len: rows of the learned position table.
        init_std: std of the Normal init of token and learned position rows.
    """

    def __init__(
        self, n_rows: int, dim: int, cfg: EmbeddingConfig, max_seq_len: int, init_std: float
    ) -> None:
        super().__init__()
        self.dim = dim
        self.positional = cfg.positional
        self.scale = math.sqrt(dim) if cfg.scale else 1.0
        self.init_std = init_std
        self.weight = nn.Parameter(torch.empty(n_rows, dim))
        self.positions = nn.Embedding(max_seq_len, dim) if cfg.positional == "learned" else None

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, init_std) for token rows and learned positions, from ``generator``."""
        with torch.no_grad():
            nn.init.normal_(self.weight, mean=0.0, std=self.init_std, generator=generator)
            if self.positions is not None:
                nn.init.normal_(self.positions.weight, 0.0, self.init_std, generator=generator)

    def forward(self, input_ids: Tensor, offset: int = 0) -> Tensor:
        """``input_ids (B, L)`` at absolute positions ``offset .. offset+L-1`` -> ``(B, L, D)``."""
        h = F.embedding(input_ids, self.weight)  # (B, L, D)
        if self.scale != 1.0:
            h = h * self.scale
        if self.positional == "none":
            return h
        length = input_ids.shape[-1]
        pos = torch.arange(offset, offset + length, device=input_ids.device)  # (L,)
        if self.positions is not None:
            return h + self.positions(pos)  # (L, D) broadcast over B
        return h + sinusoidal_positions(pos, self.dim).to(h.dtype)
