"""Norms against their textbook formulas (fp64), outputs and gradients."""

from __future__ import annotations

import pytest
import torch

from mixstack.blocks.norms import LayerNorm, RMSNorm, build_norm
from mixstack.dsl.errors import SpecError
from mixstack.dsl.spec import NormConfig


def _rms_reference(x, w, eps):
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) / x.shape[-1] + eps) * w


def _ln_reference(x, w, b, eps):
    mean = x.sum(-1, keepdim=True) / x.shape[-1]
    var = ((x - mean) ** 2).sum(-1, keepdim=True) / x.shape[-1]
    out = (x - mean) / torch.sqrt(var + eps) * w
    return out if b is None else out + b


def _random_params(norm: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))


def test_rmsnorm_matches_formula_and_gradients() -> None:
    gen = torch.Generator().manual_seed(0)
    norm = RMSNorm(7, eps=1e-3).double()
    _random_params(norm, gen)
    x = torch.randn(2, 5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = norm.weight.detach().clone().requires_grad_(True)
    out, ref = norm(x), _rms_reference(x_ref, w_ref, 1e-3)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(norm.weight.grad, w_ref.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("bias", [False, True])
def test_layernorm_matches_formula_and_gradients(bias: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    norm = LayerNorm(6, eps=1e-4, bias=bias).double()
    _random_params(norm, gen)
    x = torch.randn(3, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_(True) for p in norm.parameters()]
    x_ref = x.detach().clone().requires_grad_(True)
    out = norm(x)
    ref = _ln_reference(x_ref, params[0], params[1] if bias else None, 1e-4)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-12)
    for p, r in zip(norm.parameters(), params, strict=True):
        torch.testing.assert_close(p.grad, r.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
def test_low_precision_input_is_normalised_in_fp32_and_cast_back(kind: str) -> None:
    gen = torch.Generator().manual_seed(2)
    norm = build_norm(NormConfig(type=kind), 16)
    _random_params(norm, gen)
    x = (torch.randn(4, 16, generator=gen) * 30).to(torch.bfloat16)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    w = norm.weight.detach()
    ref = (
        _rms_reference(x.float(), w, 1e-5)
        if kind == "rmsnorm"
        else _ln_reference(x.float(), w, None, 1e-5)
    )
    torch.testing.assert_close(out, ref.to(torch.bfloat16), rtol=0, atol=0)


def test_build_norm_dispatch_and_init_after_meta() -> None:
    rms = build_norm(NormConfig(type="rmsnorm", eps=1e-6), 4)
    ln = build_norm(NormConfig(type="layernorm", bias=True), 4)
    assert isinstance(rms, RMSNorm) and rms.eps == 1e-6
    assert isinstance(ln, LayerNorm) and ln.bias is not None
    with torch.device("meta"):
        meta = build_norm(NormConfig(type="layernorm", bias=True), 4)
    meta.to_empty(device="cpu")
    meta.reset_parameters()
    assert meta.weight.tolist() == [1.0] * 4 and meta.bias.tolist() == [0.0] * 4


def test_rmsnorm_with_bias_is_refused_clearly() -> None:
    with pytest.raises(SpecError, match=r"model\.norm\.bias: a bias is only learned by layernorm"):
        build_norm(NormConfig(type="rmsnorm", bias=True), 4)
