"""fused_linear: one GEMM over concatenated weights gives what the separate linears give,
values and gradients, and the parameters (state-dict keys) stay separate."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mixstack.blocks.fused_linear import fused_linear


def _linears(bias: list[bool], dtype: torch.dtype = torch.float64) -> list[nn.Linear]:
    torch.manual_seed(0)
    return [nn.Linear(12, out, bias=b).to(dtype) for out, b in zip((16, 4, 4), bias, strict=False)]


@pytest.mark.parametrize("bias", [[False, False, False], [True, True, True], [True, False, True]])
def test_fused_linear_matches_separate_linears_values_and_gradients(bias: list[bool]) -> None:
    lins = _linears(bias)
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    outs = fused_linear(x, lins)
    # the plain expression x·Wᵀ + b per linear, written out
    refs = [x @ lin.weight.T + (lin.bias if lin.bias is not None else 0.0) for lin in lins]
    assert [o.shape for o in outs] == [(2, 5, 16), (2, 5, 4), (2, 5, 4)]
    cot = [torch.randn_like(r) for r in refs]
    params = [x, *(p for lin in lins for p in lin.parameters())]
    got = torch.autograd.grad(outs, params, cot)
    want = torch.autograd.grad(refs, params, cot)
    for o, r in zip(outs, refs, strict=True):
        torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_attention_and_mlp_keep_their_published_keys_and_numbers() -> None:
    import mixstack
    from mixstack.benchmarks import references as R

    shape = R.LlamaShape(
        n_layers=1, d_model=32, n_heads=4, n_kv_heads=2, ffn=48, vocab=64, batch=2, seq_len=9
    )
    model = mixstack.build(mixstack.load_spec(R.transformer_pp_spec(shape)), seed=0).double()
    keys = set(model.state_dict())
    for part in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
        assert any(f".{part}.weight" in k for k in keys), part
    mixer = next(m for m in model.modules() if hasattr(m, "q_proj"))
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    pos = torch.arange(9)
    q, k, v = mixer._project(x, pos)
    torch.testing.assert_close(k, mixer.rope(mixer.k_proj(x).view(2, 9, 2, 8), pos))
    # v has no RoPE: it is exactly v_proj(x)
    torch.testing.assert_close(v, mixer.v_proj(x).view(2, 9, 2, 8), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(q, mixer.rope(mixer.q_proj(x).view(2, 9, 4, 8), pos))
    mlp = next(m for m in model.modules() if getattr(m, "gate_proj", None) is not None)
    want = mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    torch.testing.assert_close(mlp._mlp(x), want, rtol=1e-12, atol=1e-12)
