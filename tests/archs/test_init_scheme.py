"""``model.init.scheme``: ``mixstack`` draws exactly what schema-v1 code drew;
``normal_linear`` redraws every Linear from N(0, init.std) with zero bias and leaves
every other parameter as the mixstack scheme has it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import mixstack
from mixstack.archs.builder import build

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "modeldir_v1"
FIXTURE_SEED = 1234  # tests/fixtures/make_modeldir_v1.py
STD = 0.05

# Every mixer family with Linears of its own kind: Δ projection (mamba), filter MLP
# (hyena), gated MLP, attention, SSD, S4D. Wide enough for an empirical std.
SPEC = {
    "model": {
        "vocab_size": 64,
        "d_model": 64,
        "max_seq_len": 64,
        "tie_embeddings": False,
        "init": {"std": STD},
        "layers": {
            "pattern": "*-M-m-S-H-",
            "symbols": {
                "*": {"type": "attention", "n_heads": 4},
                "-": {"type": "mlp"},
                "M": {"type": "mamba2", "d_state": 16, "headdim": 16},
                "m": {"type": "mamba", "d_state": 8},
                "S": {"type": "s4d", "d_state": 8},
                "H": {"type": "hyena", "filter": {"width": 32}},
            },
        },
    }
}


def test_default_scheme_draws_the_weights_schema_v1_code_drew() -> None:
    saved = load_file(FIXTURE / "model.safetensors")
    spec = mixstack.from_pretrained(FIXTURE).spec
    assert spec.init.scheme == "mixstack"
    state = build(spec, seed=FIXTURE_SEED).state_dict()
    assert set(saved) <= set(state)
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name


def _linear_params(model: nn.Module) -> dict[str, nn.Linear]:
    """Full parameter name -> its Linear, for every Linear parameter of ``model``."""
    return {
        f"{prefix}.{name}": module
        for prefix, module in model.named_modules()
        if isinstance(module, nn.Linear)
        for name, _ in module.named_parameters()
    }


@pytest.fixture(scope="module")
def both_schemes() -> tuple[nn.Module, nn.Module]:
    default = build(SPEC, seed=11)
    redrawn = build(mixstack.load_spec(SPEC, ["model.init.scheme=normal_linear"]), seed=11)
    return default, redrawn


def test_normal_linear_redraws_every_linear(both_schemes) -> None:
    _, model = both_schemes
    branches = model.n_residual_branches()
    hints = model.param_hints()
    linears = _linear_params(model)
    kinds = {name.rsplit(".", 2)[-2] for name in linears}
    assert {"dt_proj", "q_proj", "in_proj", "out_proj", "lm_head"} <= kinds
    assert any("filter" in name for name in linears)  # the hyena filter MLP
    params = dict(model.named_parameters())
    for name, linear in linears.items():
        tensor = params[name]
        if name.endswith("bias"):
            assert torch.count_nonzero(tensor) == 0, name
            continue
        # Residual output projections keep the 1/sqrt(branches) scaling (safari/zoology
        # draw them from N(0, std/sqrt(2·n_layer))).
        residual = name in hints and hints[name].residual_out
        expected = STD / math.sqrt(branches) if residual else STD
        # The sample std of n normal draws has relative error ~ 1/sqrt(2n).
        tolerance = 5 / math.sqrt(2 * tensor.numel())
        assert abs(tensor.std().item() / expected - 1) < tolerance, (name, tensor.std())
        assert abs(tensor.mean().item()) < 5 * expected / math.sqrt(tensor.numel()), name
        assert linear.weight is tensor


def test_normal_linear_leaves_every_other_parameter_as_mixstack_draws_it(both_schemes) -> None:
    default, redrawn = both_schemes
    linears = _linear_params(redrawn)
    others = {n: p for n, p in redrawn.named_parameters() if n not in linears}
    assert any("A_log" in n for n in others) and any("dt_bias" in n for n in others)
    assert any("conv" in n for n in others) and any("norm" in n for n in others)
    reference = dict(default.named_parameters())
    for name, tensor in others.items():
        assert torch.equal(tensor, reference[name]), name
    for name in linears:
        if name.endswith("weight"):
            assert not torch.equal(redrawn.get_parameter(name), reference[name]), name
