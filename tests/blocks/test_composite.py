"""Sequential / parallel composites: configs (validation, capabilities, resolve, check)
and modules equal to hand-composed computations."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from pydantic import ValidationError
from torch import Tensor, nn

from mixstack.blocks.composite import (
    ParallelConfig,
    ParallelMixer,
    SequentialConfig,
    SequentialLayer,
)
from mixstack.blocks.norms import RMSNorm
from mixstack.blocks.residual import ResidualBlock
from mixstack.dsl import registry
from mixstack.dsl.context import LayerContext
from mixstack.mixers.base import ParamHint

CTX = LayerContext(d_model=16, max_seq_len=32, arch="causal_lm")
ATTN = {"type": "attention", "n_heads": 4}
MLP = {"type": "mlp", "hidden": 32}


# -- configs ------------------------------------------------------------------------------
def test_registered_under_their_type_names() -> None:
    assert registry.get("sequential").module_cls is SequentialLayer
    assert registry.get("parallel").module_cls is ParallelMixer
    assert registry.get("sequential").kind == "composite"
    assert SequentialConfig.child_fields == ("layers",)


def test_nested_composites_are_refused() -> None:
    inner = {"type": "sequential", "layers": [ATTN]}
    with pytest.raises(
        ValidationError,
        match=r"layers\[1\] is a 'sequential' composite inside "
        r"a 'parallel' composite; composites do not nest",
    ):
        ParallelConfig.model_validate({"type": "parallel", "layers": [MLP, inner]})
    with pytest.raises(ValidationError, match="composites do not nest"):
        SequentialConfig.model_validate({"type": "sequential", "layers": [inner]})


def test_minimum_number_of_layers() -> None:
    with pytest.raises(ValidationError, match="at least 1 item"):
        SequentialConfig.model_validate({"type": "sequential", "layers": []})
    with pytest.raises(ValidationError, match="at least 2 items"):
        ParallelConfig.model_validate({"type": "parallel", "layers": [ATTN]})
    with pytest.raises(ValidationError, match="combine"):
        ParallelConfig.model_validate({"type": "parallel", "layers": [ATTN, MLP], "combine": "max"})


def test_capabilities_combine_children() -> None:
    causal = SequentialConfig.model_validate({"type": "sequential", "layers": [ATTN, MLP]})
    assert causal.capabilities(CTX).causal and causal.capabilities(CTX).decode
    mixed = ParallelConfig.model_validate(
        {"type": "parallel", "layers": [{**ATTN, "causal": False}, MLP]}
    )
    caps = mixed.capabilities(CTX)
    assert not caps.causal and not caps.decode  # one bidirectional branch spoils both


def test_resolve_and_check_go_through_children_with_prefixed_paths() -> None:
    cfg = SequentialConfig.model_validate(
        {"type": "sequential", "layers": [MLP, {"type": "attention", "n_heads": 3}]}
    )
    resolved = cfg.resolve(CTX)
    assert resolved.layers[1].n_kv_heads == 3 and resolved.layers[1].causal is True
    problems = cfg.check(CTX)
    assert [path for path, _ in problems] == [("layers", 1, "n_heads")]
    assert "d_model (16) is not divisible by n_heads (3)" in problems[0][1]


# -- modules ------------------------------------------------------------------------------
@dataclass
class SumState:
    total: Tensor


class ScaledCumSum(nn.Module):
    """Toy causal mixer ``y_i = a · W Σ_{j<=i} x_j`` (decode state: the running sum)."""

    def __init__(self, dim: int, seed: int, scale: float = 1.0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.proj = nn.Linear(dim, dim, bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
        self.scale = scale

    def forward(self, x, *, input_ids=None, seq_idx=None, state=None):
        y = x.cumsum(dim=1)
        if state is not None:
            state.total.copy_(y[:, -1])
        return self.scale * self.proj(y)

    def init_state(self, batch, max_len, *, device, dtype):
        return SumState(torch.zeros(batch, self.proj.in_features, device=device, dtype=dtype))

    def step(self, x_t, state, *, token_t=None):
        state.total += x_t
        return self.scale * self.proj(state.total)

    def param_hints(self):
        return {"proj.weight": ParamHint(residual_out=True)}

    def flops_per_token(self, seq_len):
        return 10.0

    def state_nbytes(self, seq_len, dtype):
        return 7


def _norm(dim: int, seed: int) -> RMSNorm:
    norm = RMSNorm(dim).double()
    with torch.no_grad():
        norm.weight.copy_(torch.rand(dim, generator=torch.Generator().manual_seed(seed)) + 0.5)
    return norm


def _sequential(dim: int = 4) -> SequentialLayer:
    cfg = SequentialConfig.model_validate({"type": "sequential", "layers": [ATTN, MLP]})
    blocks = [
        ResidualBlock(_norm(dim, j), ScaledCumSum(dim, 10 + j, 0.5 * (j + 1))) for j in (0, 1)
    ]
    return SequentialLayer(cfg, CTX, blocks)


def _parallel(combine: str, dim: int = 4) -> ParallelMixer:
    cfg = ParallelConfig.model_validate(
        {"type": "parallel", "layers": [ATTN, MLP, MLP], "combine": combine}
    )
    return ParallelMixer(cfg, CTX, [ScaledCumSum(dim, 20 + j, j + 1.0) for j in range(3)])


def _x(shape, seed=0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_sequential_equals_blocks_applied_by_hand() -> None:
    layer = _sequential()
    x = _x((2, 5, 4)).requires_grad_(True)
    b0, b1 = layer.blocks
    x_ref = x.detach().clone().requires_grad_(True)
    h = x_ref + b0.mixer(b0.norm(x_ref))
    ref = h + b1.mixer(b1.norm(h))
    out = layer(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-12)
    assert list(layer.state_dict()) == [
        "blocks.0.norm.weight",
        "blocks.0.mixer.proj.weight",
        "blocks.1.norm.weight",
        "blocks.1.mixer.proj.weight",
    ]


@pytest.mark.parametrize("combine", ["sum", "mean"])
def test_parallel_combines_branches_on_the_same_input(combine: str) -> None:
    mixer = _parallel(combine)
    x = _x((2, 5, 4), seed=1)
    L = x.shape[1]
    prefix = torch.tril(torch.ones(L, L, dtype=torch.float64))
    total = sum(
        (j + 1.0) * torch.einsum("ij,bjd->bid", prefix, x) @ branch.proj.weight.T
        for j, branch in enumerate(mixer.branches)
    )
    expected = total / 3 if combine == "mean" else total
    torch.testing.assert_close(mixer(x), expected, rtol=0, atol=1e-12)
    assert list(mixer.state_dict()) == [f"branches.{j}.proj.weight" for j in range(3)]
    assert mixer.param_hints() == {
        f"branches.{j}.proj.weight": ParamHint(residual_out=True) for j in range(3)
    }


@pytest.mark.parametrize("make", [_sequential, lambda: _parallel("mean")])
def test_composite_decoding_with_lists_of_child_states(make) -> None:
    layer = make()
    x = _x((2, 6, 4), seed=2)
    full = layer(x)
    state = layer.init_state(2, 8, device="cpu", dtype=torch.float64)
    assert isinstance(state, list) and len(state) == len(layer._parts())
    torch.testing.assert_close(layer(x[:, :3], state=state), full[:, :3], rtol=0, atol=1e-12)
    for t in range(3, 6):
        torch.testing.assert_close(layer.step(x[:, t], state), full[:, t], rtol=0, atol=1e-12)
    with pytest.raises(TypeError, match="list of"):
        layer.step(x[:, 0], state[:1])


def test_bookkeeping_sums_children() -> None:
    layer = _parallel("sum")
    assert layer.flops_per_token(16) == 30.0
    assert layer.state_nbytes(16, torch.bfloat16) == 21
    assert _sequential().flops_per_token(16) == 20.0


def test_wrong_number_of_children_is_refused() -> None:
    cfg = SequentialConfig.model_validate({"type": "sequential", "layers": [ATTN, MLP]})
    with pytest.raises(ValueError, match="has 2 layers but got 1 built children"):
        SequentialLayer(cfg, CTX, [nn.Identity()])


def test_module_imports_without_mixers() -> None:
    code = (
        "import sys, mixstack.blocks.composite as c; "
        "bad = [m for m in sys.modules if m.startswith('mixstack.mixers')]; "
        "assert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
