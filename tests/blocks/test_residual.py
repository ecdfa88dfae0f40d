"""Pre-norm residual wiring against hand computation (fp64), decode, dropout, checkpointing."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mixstack.blocks.norms import RMSNorm
from mixstack.blocks.residual import ResidualBlock


@dataclass
class SumState:
    total: Tensor  # (B, D)


class CumSumMixer(nn.Module):
    """Toy causal mixer ``y_i = W Σ_{j<=i} x_j`` with an exact decode state."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim, bias=False)
        self.calls = 0

    def forward(self, x, *, input_ids=None, seq_idx=None, state=None):
        self.calls += 1
        y = x.cumsum(dim=1)
        if state is not None:
            state.total.copy_(y[:, -1])
        return self.proj(y)

    def init_state(self, batch, max_len, *, device, dtype):
        return SumState(torch.zeros(batch, self.proj.in_features, device=device, dtype=dtype))

    def step(self, x_t, state, *, token_t=None):
        state.total += x_t
        return self.proj(state.total)

    def reset_parameters(self, generator=None):
        nn.init.normal_(self.proj.weight, generator=generator)


def _block(dim: int = 6, **kw) -> ResidualBlock:
    gen = torch.Generator().manual_seed(0)
    block = ResidualBlock(RMSNorm(dim), CumSumMixer(dim), **kw).double()
    with torch.no_grad():
        block.norm.weight.copy_(torch.rand(dim, generator=gen, dtype=torch.float64) + 0.5)
        block.mixer.proj.weight.copy_(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    return block


def _hand(x: Tensor, w_norm: Tensor, w_proj: Tensor) -> Tensor:
    normed = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w_norm
    L = x.shape[1]
    prefix = torch.tril(torch.ones(L, L, dtype=x.dtype))  # (L, L): row i sums j <= i
    return x + torch.einsum("ij,bjd->bid", prefix, normed) @ w_proj.T


def test_forward_is_x_plus_mixer_of_norm_outputs_and_gradients() -> None:
    block = _block()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    w_norm = block.norm.weight.detach().clone().requires_grad_(True)
    w_proj = block.mixer.proj.weight.detach().clone().requires_grad_(True)
    out, ref = block(x), _hand(x_ref, w_norm, w_proj)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(block.norm.weight.grad, w_norm.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(block.mixer.proj.weight.grad, w_proj.grad, rtol=0, atol=1e-12)


def test_state_dict_keys() -> None:
    assert list(_block().state_dict()) == ["norm.weight", "mixer.proj.weight"]


def test_prefill_then_steps_equal_full_forward() -> None:
    block = _block()
    x = torch.randn(3, 6, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    full = block(x)
    state = block.init_state(3, 8, device="cpu", dtype=torch.float64)
    prefill = block(x[:, :3], state=state)  # odd-length prefill
    torch.testing.assert_close(prefill, full[:, :3], rtol=0, atol=1e-12)
    for t in range(3, 6):
        torch.testing.assert_close(block.step(x[:, t], state), full[:, t], rtol=0, atol=1e-12)


def test_dropout_on_the_branch_only() -> None:
    block = _block(dropout=0.5)
    x = torch.randn(4, 7, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    block.eval()
    branch = block(x) - x  # deterministic branch in eval
    block.train()
    torch.manual_seed(0)
    kept = block(x) - x
    dropped = kept == 0
    assert 0 < int(dropped.sum()) < kept.numel()
    torch.testing.assert_close(kept[~dropped], 2 * branch[~dropped], rtol=1e-12, atol=1e-12)


def test_activation_checkpointing_recomputes_and_keeps_gradients() -> None:
    x = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    grads = []
    for checkpointing, expected_calls in ((False, 1), (True, 2)):
        block = _block(checkpointing=checkpointing).train()
        xg = x.clone().requires_grad_(True)
        block(xg).pow(2).sum().backward()
        assert block.mixer.calls == expected_calls  # recomputed in backward
        grads.append((xg.grad, block.mixer.proj.weight.grad, block.norm.weight.grad))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_checkpointing_is_off_in_eval_and_with_a_state() -> None:
    x = torch.randn(1, 3, 6, dtype=torch.float64, requires_grad=True)
    block = _block(checkpointing=True).eval()
    block(x).sum().backward()
    assert block.mixer.calls == 1
    block = _block(checkpointing=True).train()
    state = block.init_state(1, 4, device="cpu", dtype=torch.float64)
    block(x, state=state).sum().backward()
    assert block.mixer.calls == 1
    torch.testing.assert_close(state.total, block.norm(x).sum(dim=1).detach(), rtol=0, atol=1e-12)
