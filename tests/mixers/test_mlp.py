"""The MLP channel mixer against its formulas, written out with elementary functions."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from mixstack.dsl.context import LayerContext
from mixstack.mixers.base import State
from mixstack.mixers.mlp import Mlp, MlpConfig

F64 = torch.float64


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def sigmoid_linear(x):
    return x / (1 + torch.exp(-x))


PLAIN = {
    "gelu": gelu,
    "gelu_tanh": gelu_tanh,
    "relu": lambda x: torch.clamp(x, min=0),
    "squared_relu": lambda x: torch.clamp(x, min=0) ** 2,
    "silu": sigmoid_linear,
}
GATED = {"swiglu": sigmoid_linear, "geglu": gelu}


def formula(m: Mlp, x: torch.Tensor) -> torch.Tensor:
    def linear(layer, inp):
        return inp @ layer.weight.T + (0 if layer.bias is None else layer.bias)

    act = m.cfg.activation
    if act in GATED:
        return linear(m.down_proj, GATED[act](linear(m.gate_proj, x)) * linear(m.up_proj, x))
    return linear(m.down_proj, PLAIN[act](linear(m.up_proj, x)))


def build(cfg: MlpConfig, d_model: int = 12, seed: int = 0) -> Mlp:
    m = Mlp(cfg, LayerContext(d_model=d_model, init_std=0.5)).to(F64)
    g = torch.Generator().manual_seed(seed)
    m.reset_parameters(g)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=F64))
    return m


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", sorted({**PLAIN, **GATED}))
def test_matches_formula_outputs_and_grads(activation: str, bias: bool) -> None:
    m = build(MlpConfig(activation=activation, hidden=20, bias=bias))
    x0 = torch.randn(2, 7, 12, generator=torch.Generator().manual_seed(1), dtype=F64)
    results = []
    for fn in (m, lambda x: formula(m, x)):
        m.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        out = fn(x)
        out.sum().backward()
        results.append((out.detach(), x.grad, [p.grad for p in m.parameters()]))
    (got, gx, gp), (want, wx, wp) = results
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, wx, rtol=1e-10, atol=1e-12)
    for a, b in zip(gp, wp, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_parameter_layout() -> None:
    gated = build(MlpConfig(activation="swiglu", hidden=20, bias=True))
    assert {n: tuple(p.shape) for n, p in gated.named_parameters()} == {
        "gate_proj.weight": (20, 12),
        "gate_proj.bias": (20,),
        "up_proj.weight": (20, 12),
        "up_proj.bias": (20,),
        "down_proj.weight": (12, 20),
        "down_proj.bias": (12,),
    }
    plain = build(MlpConfig(activation="gelu", hidden=20))
    assert [n for n, _ in plain.named_parameters()] == ["up_proj.weight", "down_proj.weight"]
    assert set(plain.param_hints()) == {"down_proj.weight"}
    assert plain.param_hints()["down_proj.weight"].residual_out


@pytest.mark.parametrize(
    ("d_model", "activation", "multiple_of", "hidden"),
    [
        (32, "gelu", 128, 128),
        (32, "squared_relu", 7, 128),  # plain: multiple_of unused
        (32, "swiglu", 128, 128),  # int(85.3) -> 128
        (32, "geglu", 8, 88),
        (4096, "swiglu", 256, 11008),  # Llama-7B's intermediate size
        (2560, "swiglu", 128, 6912),
    ],
)
def test_default_hidden_width(d_model: int, activation: str, multiple_of: int, hidden: int):
    ctx = LayerContext(d_model=d_model)
    cfg = MlpConfig(activation=activation, multiple_of=multiple_of).resolve(ctx)
    assert cfg.hidden == hidden
    assert cfg.resolve(ctx) == cfg
    assert MlpConfig(hidden=50).resolve(ctx).hidden == 50


def test_step_forward_and_state() -> None:
    m = build(MlpConfig(activation="geglu", hidden=16))
    x = torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(2), dtype=F64)
    state = m.init_state(3, 5, device="meta", dtype=torch.bfloat16)
    assert type(state) is State and state.nbytes() == 0
    full = m(x, seq_idx=torch.zeros(3, 5, dtype=torch.long), state=state)
    torch.testing.assert_close(full, m(x), rtol=0, atol=0)
    for t in range(5):
        torch.testing.assert_close(m.step(x[:, t], state), full[:, t], rtol=1e-12, atol=1e-12)


def test_config_kind_capabilities_and_validation() -> None:
    assert MlpConfig.kind == "channel"
    caps = MlpConfig().capabilities(LayerContext(d_model=8, arch="encoder"))
    assert caps.causal and caps.decode and not caps.needs_input_ids
    with pytest.raises(ValidationError, match="Input should be 'gelu', 'gelu_tanh'"):
        MlpConfig.model_validate({"type": "mlp", "activation": "swish"})
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        MlpConfig(multiple_of=0)
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        MlpConfig.model_validate({"type": "mlp", "d_ff": 64})
    for name, field in MlpConfig.model_fields.items():
        assert name == "type" or field.description, name


def test_examples_cover_every_activation() -> None:
    names = {e.config.activation for e in MlpConfig.examples()}
    assert names == set(PLAIN) | set(GATED)
