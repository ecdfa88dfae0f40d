"""Token embedding, sqrt(d) scaling and absolute positions against explicit formulas."""

from __future__ import annotations

import math

import pytest
import torch

from mixstack.blocks.embedding import TokenEmbedding, sinusoidal_positions
from mixstack.dsl.spec import EmbeddingConfig


def _embedding(positional: str = "none", scale: bool = False, dim: int = 6) -> TokenEmbedding:
    emb = TokenEmbedding(16, dim, EmbeddingConfig(positional=positional, scale=scale), 12, 0.02)
    emb.reset_parameters(torch.Generator().manual_seed(0))
    return emb


def test_rows_are_looked_up_and_scaled() -> None:
    ids = torch.tensor([[3, 0, 15], [7, 7, 1]])
    plain, scaled = _embedding(), _embedding(scale=True)
    assert torch.equal(plain(ids), plain.weight[ids])
    torch.testing.assert_close(scaled(ids), scaled.weight[ids] * math.sqrt(6), rtol=0, atol=0)


def test_sinusoidal_table_matches_vaswani_formula() -> None:
    dim = 7  # odd: the last column is a sine
    table = sinusoidal_positions(torch.arange(5), dim)
    for p in range(5):
        for c in range(dim):
            angle = p / 10000 ** (2 * (c // 2) / dim)
            expected = math.sin(angle) if c % 2 == 0 else math.cos(angle)
            assert abs(table[p, c].item() - expected) < 1e-6, (p, c)


@pytest.mark.parametrize("positional", ["learned", "sinusoidal"])
def test_positions_are_added_at_the_absolute_offset(positional: str) -> None:
    emb = _embedding(positional)
    ids = torch.tensor([[1, 2, 3, 4]])
    table = (
        emb.positions.weight.detach()
        if positional == "learned"
        else sinusoidal_positions(torch.arange(12), 6)
    )
    torch.testing.assert_close(emb(ids), emb.weight[ids] + table[:4], rtol=0, atol=0)
    # a decode step at position 5 sees row 5 of the table
    torch.testing.assert_close(
        emb(ids[:, :1], offset=5), emb.weight[ids[:, :1]] + table[5:6], rtol=0, atol=0
    )


def test_init_is_seeded_normal_and_independent_of_the_global_rng() -> None:
    a, b = _embedding("learned"), _embedding("learned")
    torch.manual_seed(123)
    c = _embedding("learned")
    assert torch.equal(a.weight, b.weight) and torch.equal(a.weight, c.weight)
    assert torch.equal(a.positions.weight, c.positions.weight)
    big = TokenEmbedding(512, 64, EmbeddingConfig(), 8, 0.05)
    big.reset_parameters(torch.Generator().manual_seed(1))
    assert abs(big.weight.std().item() - 0.05) < 0.002
    assert list(_embedding("learned").state_dict()) == ["weight", "positions.weight"]
