"""Helpers shared by the mixer tests, as fixtures (the pattern of tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from torch import Tensor, nn

Grads = dict[str, Tensor | None]


def _grads_against(
    module: nn.Module, fns: list[Callable[[Tensor], Tensor]], u: Tensor, cotangent: Tensor
) -> list[Grads]:
    """Per function f: the gradients of ``sum(f(x) · cotangent)`` at ``x = u``, for the
    input (key ``"u"``) and every named parameter of ``module`` (None where f does not
    read it). Compares a layer with an independent reimplementation that reads the same
    parameters."""
    out = []
    for fn in fns:
        module.zero_grad(set_to_none=True)
        x = u.clone().requires_grad_()
        (fn(x) * cotangent).sum().backward()
        out.append({"u": x.grad, **{n: p.grad for n, p in module.named_parameters()}})
    return out


@pytest.fixture
def grads_against() -> Callable[..., list[Grads]]:
    return _grads_against
