"""Contract 8: every backend of every kernel matches the reference; mixers agree under
every available provider.

Kernel level: for each registered kernel, each backend usable on CPU for the case's
dtype is run on the kernel's parity cases (``tests/kernels/parity_cases.py``) and
compared with ``reference`` on
outputs and on gradients of every floating input (a random cotangent is pulled back).
Mixer level: each layer is run with each provider available for the kernels it may
use and compared with the all-``reference`` policy.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import pytest
import torch
from torch import Tensor

from mixstack.dsl import registry
from mixstack.kernels import backends as kb
from mixstack.kernels.backends import BackendPolicy
from tests.kernels.parity_cases import PARITY_CASES

CPU = torch.device("cpu")
# Relative tolerance (max error / max magnitude) by the dtype of a parity case.
REL_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def case_dtype(case: dict[str, Any]) -> torch.dtype:
    floats = [v.dtype for v in case.values() if isinstance(v, Tensor) and v.is_floating_point()]
    return floats[0] if floats else torch.float32


def kernel_params() -> list:
    out = []
    for name in sorted(kb.kernels()):
        for i, case in enumerate(PARITY_CASES.get(name, list)()):
            dtype = case_dtype(case)
            for provider in kb.available_backends(name, CPU, dtype):
                if provider != "reference":
                    out.append(pytest.param(name, i, provider, id=f"{name}-{i}-{provider}"))
    return out


def flat_tensors(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in flat_tensors(o)]
    return []


def run_with_grads(fn, case: dict[str, Any]) -> tuple[list[Tensor], dict[str, Tensor]]:
    leaves = {
        k: v.detach().clone().requires_grad_() if isinstance(v, Tensor) and v.is_floating_point()
        else v
        for k, v in case.items()
    }  # fmt: skip
    outs = flat_tensors(fn(**leaves))
    g = torch.Generator().manual_seed(0)
    loss = sum(
        (o * torch.randn(o.shape, generator=g).to(o.dtype)).sum()
        for o in outs
        if o.is_floating_point() and o.requires_grad
    )
    grads: dict[str, Tensor] = {}
    if isinstance(loss, Tensor):
        loss.backward()
        grads = {
            k: v.grad for k, v in leaves.items() if isinstance(v, Tensor) and v.grad is not None
        }
    return [o.detach() for o in outs], grads


def test_every_kernel_has_reference_torch_and_parity_cases() -> None:
    for name, spec in kb.kernels().items():
        assert "reference" in spec.backends, f"kernel {name!r} has no reference backend"
        assert "torch" in spec.backends, f"kernel {name!r} has no torch backend"
        assert name in PARITY_CASES and PARITY_CASES[name](), f"{name!r}: no parity cases"


@pytest.mark.parametrize(("kernel", "index", "provider"), kernel_params())
def test_backend_matches_reference_on_parity_cases(kernel: str, index: int, provider: str, near):
    spec = kb.get_kernel(kernel)
    case = PARITY_CASES[kernel]()[index]
    rel = REL_TOL[case_dtype(case)]
    want, want_grads = run_with_grads(spec.backends["reference"].fn, case)
    got, got_grads = run_with_grads(spec.backends[provider].fn, case)
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.dtype == b.dtype, f"output {i}: {a.dtype} vs reference {b.dtype}"
        if a.is_floating_point():
            assert torch.isfinite(a).all(), f"output {i} is not finite"
            near(a, b, rel, f"output {i}")
        else:
            assert torch.equal(a, b), f"output {i}"
    assert set(got_grads) == set(want_grads)
    for name, grad in want_grads.items():
        assert torch.isfinite(got_grads[name]).all(), f"d{name} is not finite"
        near(got_grads[name], grad, 10 * rel, f"d{name}")


def dispatcher_of(kernel: str) -> Any:
    """The kernel module's public dispatcher, named after the kernel."""
    module = importlib.import_module(kb.get_kernel(kernel).backends["reference"].fn.__module__)
    return getattr(module, kernel)


@pytest.mark.parametrize("kernel", sorted(kb.kernels()))
def test_dispatcher_has_the_reference_signature_and_follows_the_policy(kernel: str) -> None:
    spec = kb.get_kernel(kernel)
    reference, dispatcher = spec.backends["reference"].fn, dispatcher_of(kernel)
    *params, backends = inspect.signature(dispatcher).parameters.values()
    assert params == list(inspect.signature(reference).parameters.values())
    assert (backends.name, backends.kind, backends.default) == (
        "backends",
        inspect.Parameter.KEYWORD_ONLY,
        None,
    )
    case = PARITY_CASES[kernel]()[-1]
    policy = BackendPolicy("reference")
    # None means auto: on the CPU mixstack's compiled kernels where a kernel has them and
    # a compiler is there, else torch
    auto = BackendPolicy("auto").resolve(kernel, CPU, torch.float32).provider
    assert auto in {"native", "torch"}
    for got, want in [
        (dispatcher(**case, backends=policy), reference(**case)),
        (dispatcher(**case), spec.backends[auto].fn(**case)),
    ]:
        for a, b in zip(flat_tensors(got), flat_tensors(want), strict=True):
            assert torch.equal(a, b)
    assert list(policy.resolved().values()) == ["reference"]


def providers_on_cpu() -> list[str]:
    found = set()
    for name in kb.kernels():
        found.update(kb.available_backends(name, CPU, torch.float64))
    found.discard("reference")
    return sorted(found)


@pytest.mark.parametrize("provider", providers_on_cpu())
def test_mixer_under_each_provider_matches_reference_policy(case, provider, near, use_policy):
    # kernels lacking this provider keep `auto`, so every mixer runs under every provider
    request = {
        name: provider
        for name in kb.kernels()
        if provider in kb.available_backends(name, CPU, torch.float64)
    }
    module = case.build()
    x, ids = case.inputs(2, 11, seed=41)
    seq_idx = torch.tensor([[0] * 4 + [1] * 7, [2] * 8 + [-1] * 3])
    results = []
    for policy in (BackendPolicy(request), BackendPolicy("reference")):
        use_policy(module, policy)
        module.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_()
        out = case.run(module, xg, ids, seq_idx=seq_idx)
        out.square().sum().backward()
        results.append((out.detach(), xg.grad, [p.grad for p in module.parameters()]))
    (out, gx, gp), (ref, rx, rp) = results
    near(out, ref, 1e-9, "output")
    near(gx, rx, 1e-8, "dx")
    for i, (a, b) in enumerate(zip(gp, rp, strict=True)):
        assert (a is None) == (b is None), f"parameter {i}: gradient on one path only"
        if a is not None:
            near(a, b, 1e-8, f"dparam {i}")


def test_registry_layers_have_examples() -> None:
    for entry in registry.entries():
        if entry.kind in ("sequence", "channel"):
            assert entry.config_cls.examples(), f"{entry.name}: examples() is empty"
