"""Contract 7: bf16 forward is finite and close to fp32; ``keep_fp32`` parameters stay
fp32 after :func:`mixstack.blocks.precision.cast_module`."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mixstack.blocks.precision import cast_module, keep_fp32_names
from mixstack.mixers.base import ParamHint


def hinted_fp32(module: nn.Module) -> set[str]:
    return {
        name
        for name, hint in module.param_hints().items()
        if hint.keep_fp32 and name in dict(module.named_parameters())
    }


def test_bf16_forward_is_finite_and_close_to_fp32(case) -> None:
    module = case.build(dtype=torch.float32, seed=31)
    x, ids = case.inputs(2, 13, dtype=torch.float32, seed=31)
    with torch.no_grad():
        want = case.run(module, x, ids)
        cast_module(module, torch.bfloat16)
        got = case.run(module, x.bfloat16(), ids)
    assert got.dtype == torch.bfloat16, f"bf16 model returned {got.dtype}"
    assert torch.isfinite(got).all()
    err = ((got.float() - want).norm() / want.norm()).item()
    assert err < 5e-2, f"bf16 vs fp32 relative error {err:.3g}"


def test_keep_fp32_parameters_stay_fp32(case) -> None:
    module = case.build(dtype=torch.float32)
    keep = hinted_fp32(module)
    cast_module(module, torch.bfloat16)
    for name, p in module.named_parameters():
        want = torch.float32 if name in keep else torch.bfloat16
        assert p.dtype == want, f"{name}: {p.dtype}, expected {want}"


def test_param_hint_names_exist(case) -> None:
    module = case.build(dtype=torch.float32)
    names = dict(module.named_parameters()) | dict(module.named_buffers())
    unknown = set(module.param_hints()) - set(names)
    assert not unknown, f"param_hints() names no such parameter: {sorted(unknown)}"


class _Toy(nn.Module):
    """A mixer-like module with hints, nested inside a plain container below."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 3)
        self.A_log = nn.Parameter(torch.ones(3, dtype=torch.float64))
        self.register_buffer("scale", torch.ones(2))
        self.register_buffer("count", torch.zeros(2, dtype=torch.long))

    def param_hints(self) -> dict[str, ParamHint]:
        return {"A_log": ParamHint(keep_fp32=True), "proj.bias": ParamHint(no_weight_decay=True)}


def test_cast_module_keeps_hinted_tensors_fp32_in_nested_modules() -> None:
    model = nn.Sequential(nn.Linear(3, 3), _Toy())
    assert keep_fp32_names(model) == {"1.A_log"}
    same = cast_module(model, torch.bfloat16)
    assert same is model
    dtypes = {n: t.dtype for n, t in [*model.named_parameters(), *model.named_buffers()]}
    assert dtypes == {
        "0.weight": torch.bfloat16,
        "0.bias": torch.bfloat16,
        "1.proj.weight": torch.bfloat16,
        "1.proj.bias": torch.bfloat16,
        "1.A_log": torch.float32,  # fp64 in, fp32 out: hinted tensors are exactly fp32
        "1.scale": torch.bfloat16,
        "1.count": torch.long,
    }
    assert isinstance(model[1].A_log, nn.Parameter) and model[1].A_log.requires_grad
    with pytest.raises(ValueError, match="not a floating dtype"):
        cast_module(model, torch.int8)
