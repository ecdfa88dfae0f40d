"""Shared builders for the generation tests: tiny causal LMs in float64 and a reference
decoder that runs the full parallel forward once per new token (no state at all)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

from mixstack.archs.builder import build
from mixstack.archs.models import MixStackModel
from mixstack.dsl.spec import ModelSpec

VOCAB = 12  # + 4 specials = 16 ids
MLP = {"type": "mlp", "hidden": 24, "activation": "gelu"}


def make_model(
    pattern: str,
    symbols: dict[str, Any],
    *,
    d_model: int = 16,
    max_seq_len: int = 32,
    seed: int = 0,
    **model: Any,
) -> MixStackModel:
    """A float64 causal LM in eval mode; init std 0.1 so logits are far from ties."""
    data = {
        "arch": "causal_lm",
        "vocab_size": VOCAB,
        "max_seq_len": max_seq_len,
        "d_model": d_model,
        "init": {"std": 0.1},
        "layers": {"pattern": pattern, "symbols": symbols},
    }
    data.update(model)
    return build(ModelSpec.model_validate(data), seed=seed, dtype=torch.float64).eval()


def reference_decode(
    model: MixStackModel,
    prompt: list[int],
    n_new: int,
    pick: Callable[[Tensor, list[int]], int] | None = None,
) -> list[int]:
    """``n_new`` tokens after ``prompt``, each from a full forward over the whole
    sequence so far (``pick(logits (V,), sequence) -> id``; default argmax)."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n_new):
            logits = model(torch.tensor([seq]))[0, -1]
            seq.append(int(logits.argmax()) if pick is None else pick(logits, seq))
    return seq[len(prompt) :]


def prompts(lengths: list[int], seed: int = 0, high: int = VOCAB) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, high, (n,), generator=g).tolist() for n in lengths]


def left_pad(rows: list[list[int]], pad: int) -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask) (B, max len), padding on the left."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@pytest.fixture
def tiny_model() -> Callable[..., MixStackModel]:
    return make_model
