"""Initialisation contract (DESIGN §4, §6): ``reset_parameters(generator)`` re-draws every
parameter from the explicit generator, so a model built on the meta device, moved with
``to_empty`` and reset equals one built normally; the global RNG is never touched."""

from __future__ import annotations

import torch


def test_meta_build_to_empty_reset_equals_eager_build(case) -> None:
    eager = case.entry.module_cls(case.config, case.ctx)
    eager.reset_parameters(torch.Generator().manual_seed(7))
    with torch.device("meta"):
        lazy = case.entry.module_cls(case.config, case.ctx)
    assert all(p.is_meta for p in lazy.parameters()), "the constructor allocated real memory"
    lazy = lazy.to_empty(device="cpu")
    lazy.reset_parameters(torch.Generator().manual_seed(7))
    got, want = dict(lazy.named_parameters()), dict(eager.named_parameters())
    assert got.keys() == want.keys()
    for name, p in want.items():
        assert torch.equal(got[name], p), f"{name} is not re-drawn by reset_parameters"


def test_reset_parameters_leaves_global_rng_alone(case) -> None:
    module = case.entry.module_cls(case.config, case.ctx)
    before = torch.random.get_rng_state()
    module.reset_parameters(torch.Generator().manual_seed(3))
    assert torch.equal(torch.random.get_rng_state(), before), "reset_parameters used global RNG"
