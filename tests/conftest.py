"""Shared test set-up: hypothesis profiles, default dtype reset, shared input makers."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch
from hypothesis import HealthCheck, settings

# The repository root is the package: importing it here, before any test module, makes
# pytest find it as `mixstack` (a test file that imports nothing of it, such as
# test_packaging.py alone, would otherwise fail to import the root __init__.py).
import mixstack  # noqa: F401

settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=30)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(autouse=True)
def _reset_torch_defaults():
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


def _random_packing(length: int, seed: int, bsz: int = 2) -> torch.Tensor:
    """(B, L) document ids: random document lengths (1 to L/3 + 1), increasing ids per row,
    padding runs (−1) at random places (start, between and inside documents, end)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(bsz):
        row: list[int] = []
        doc = 10 * b
        while len(row) < length:
            n = int(torch.randint(1, length // 3 + 2, (1,), generator=g))
            if torch.rand(1, generator=g).item() < 0.25:
                row += [-1] * min(n, 4)
            else:
                row += [doc] * n
                doc += 1
        rows.append(row[:length])
    return torch.tensor(rows)


@pytest.fixture
def random_packing() -> Callable[..., torch.Tensor]:
    """``random_packing(length, seed, bsz=2)``: packed ``seq_idx`` for scan tests."""
    return _random_packing
