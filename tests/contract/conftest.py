"""Contract-test cases: every registered sequence / channel layer × its ``examples()``.

Tests ask for one of these fixtures and are parametrized over the matching cases, so
a mixer registered later (built-in or plugin) is tested the moment it exists:

``case``         every layer of kind "sequence" or "channel";
``matrix_case``  sequence layers with a matrix view (``mixing_terms`` / ``mix``);
``nomatrix_case`` layers without one (channel mixers);
``causal_case``  layers whose resolved capabilities include ``causal``;
``decode_case``  layers whose resolved capabilities include ``decode``;
``nodecode_case`` layers that declare no ``decode``.

Composites are left out: the archs builder wires their children, and their own tests
cover them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from mixstack.dsl import registry
from mixstack.dsl.base import Capabilities, LayerConfig, LayerExample
from mixstack.dsl.context import LayerContext
from mixstack.dsl.registry import LayerEntry
from mixstack.kernels.backends import BackendPolicy
from mixstack.mixers.base import Mixer, State

CONTRACT_KINDS = ("sequence", "channel")
# Token ids drawn from two values so that token-matching mixers (n-gram, match_len <= 3)
# see repeats even in the 9-token sequences of the gradient contract.
N_TOKEN_VALUES = 2


@dataclass(frozen=True)
class LayerCase:
    """One example configuration of one registered layer, with helpers to run it."""

    entry: LayerEntry
    example: LayerExample
    index: int

    @property
    def id(self) -> str:
        return f"{self.entry.name}-{self.example.name or self.index}"

    @property
    def ctx(self) -> LayerContext:
        return self.example.context()

    @property
    def config(self) -> LayerConfig:
        return self.example.config.resolve(self.ctx)

    @property
    def capabilities(self) -> Capabilities:
        return self.config.capabilities(self.ctx)

    @property
    def has_matrix_view(self) -> bool:
        return self.entry.module_cls.mixing_terms is not Mixer.mixing_terms

    @property
    def d_model(self) -> int:
        return self.example.d_model

    def build(self, dtype: torch.dtype = torch.float64, seed: int = 0) -> Mixer:
        """Module with parameters drawn from an explicit generator (seed), then cast."""
        module = self.entry.module_cls(self.config, self.ctx)
        module.reset_parameters(torch.Generator().manual_seed(seed))
        return module.to(dtype)

    def inputs(
        self, batch: int, length: int, *, dtype: torch.dtype = torch.float64, seed: int = 0
    ) -> tuple[Tensor, Tensor | None]:
        """x (B, L, D) and, for mixers that consume tokens, input ids (B, L)."""
        g = torch.Generator().manual_seed(1000 + seed)
        x = torch.randn(batch, length, self.d_model, generator=g).to(dtype)
        ids = None
        if self.capabilities.needs_input_ids:
            high = min(N_TOKEN_VALUES, self.ctx.vocab_size)
            ids = torch.randint(0, high, (batch, length), generator=g)
        return x, ids

    def run(self, module: Mixer, x: Tensor, ids: Tensor | None, **kwargs) -> Tensor:
        return module(x, input_ids=ids, **kwargs)

    def step(self, module: Mixer, x_t: Tensor, ids_t: Tensor | None, state: State) -> Tensor:
        return module.step(x_t, state, token_t=ids_t)


def all_cases() -> list[LayerCase]:
    out = []
    for entry in registry.entries():
        if entry.kind not in CONTRACT_KINDS:
            continue
        for i, example in enumerate(entry.config_cls.examples()):
            out.append(LayerCase(entry, example, i))
    return out


SELECTORS: dict[str, Callable[[LayerCase], bool]] = {
    "case": lambda c: True,
    "matrix_case": lambda c: c.has_matrix_view,
    "nomatrix_case": lambda c: not c.has_matrix_view,
    "causal_case": lambda c: c.capabilities.causal,
    "decode_case": lambda c: c.capabilities.decode,
    "nodecode_case": lambda c: not c.capabilities.decode,
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    for name, keep in SELECTORS.items():
        if name in metafunc.fixturenames:
            cases = [c for c in all_cases() if keep(c)]
            metafunc.parametrize(name, cases, ids=[c.id for c in cases])


def set_policy(module: torch.nn.Module, policy: BackendPolicy) -> None:
    """Point every mixer inside ``module`` at ``policy``."""
    for sub in module.modules():
        if isinstance(sub, Mixer):
            sub.backends = policy


def assert_near(got: Tensor, want: Tensor, rel: float, what: str = "") -> None:
    """max |got - want| <= rel · max(|want|), with a message naming the worst entry."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    scale = want.abs().max().item() if want.numel() else 0.0
    err = (got - want).abs().max().item() if want.numel() else 0.0
    assert err <= rel * max(scale, 1e-30), f"{what}: max error {err:.3g} vs scale {scale:.3g}"


@pytest.fixture
def near() -> Callable[..., None]:
    return assert_near


@pytest.fixture
def use_policy() -> Callable[[torch.nn.Module, BackendPolicy], None]:
    return set_policy
