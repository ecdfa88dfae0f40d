"""Contract 6: the default backends and the ``reference`` backends agree on outputs and
gradients (input and every parameter), and every parameter receives a gradient."""

from __future__ import annotations

import torch

from mixstack.kernels.backends import BackendPolicy


def outputs_and_grads(case, module, x, ids, seq_idx=None):
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = case.run(module, x, ids, seq_idx=seq_idx)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
    (out * cotangent).sum().backward()
    grads = {"x": x.grad}
    grads.update({name: p.grad for name, p in module.named_parameters()})
    return out.detach(), grads


def test_default_backends_match_reference_fp64(case, near, use_policy) -> None:
    module = case.build()
    x, ids = case.inputs(2, 13, seed=21)
    seq_idx = torch.tensor([[0] * 6 + [1] * 7, [-1] * 2 + [2] * 11])
    fast, fast_grads = outputs_and_grads(case, module, x, ids, seq_idx)
    use_policy(module, BackendPolicy("reference"))
    ref, ref_grads = outputs_and_grads(case, module, x, ids, seq_idx)
    near(fast, ref, 1e-9, "output")
    for name, grad in ref_grads.items():
        assert fast_grads[name] is not None, f"{name}: no gradient on the default path"
        near(fast_grads[name], grad, 1e-8, f"d{name}")


def test_every_parameter_receives_a_finite_nonzero_gradient(case) -> None:
    module = case.build(dtype=torch.float32)
    x, ids = case.inputs(2, 9, dtype=torch.float32, seed=22)
    _, grads = outputs_and_grads(case, module, x, ids)
    for name, grad in grads.items():
        assert grad is not None, f"{name} receives no gradient"
        assert torch.isfinite(grad).all(), f"{name} has a non-finite gradient"
        assert grad.abs().sum() > 0, f"{name} receives an all-zero gradient"
