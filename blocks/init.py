"""Initialisation helpers shared by the mixers: every draw comes from an explicit
``torch.Generator`` (never the global RNG), is made on the generator's device in fp32
(fp64 where noted) and copied into the parameter, so a module initialised on CPU, on
an accelerator or after ``to_empty`` from the meta device gets the same values.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _draw(shape: torch.Size, generator: torch.Generator | None, dtype: torch.dtype) -> Tensor:
    device = generator.device if generator is not None else None
    return torch.empty(shape, device=device, dtype=dtype)


@torch.no_grad()
def uniform_(param: Tensor, bound: float, generator: torch.Generator | None) -> None:
    """``param ← U(−bound, bound)``."""
    draw = _draw(param.shape, generator, torch.float32)
    param.copy_(draw.uniform_(-bound, bound, generator=generator))


@torch.no_grad()
def normal_(param: Tensor, std: float, generator: torch.Generator | None) -> None:
    """``param ← N(0, std²)``."""
    param.copy_(_draw(param.shape, generator, torch.float32).normal_(0.0, std, generator=generator))


def reset_linear(linear: nn.Linear, generator: torch.Generator | None) -> None:
    """PyTorch's default ``nn.Linear`` init: U(±1/√fan_in) weight and bias."""
    bound = 1.0 / math.sqrt(linear.in_features)
    uniform_(linear.weight, bound, generator)
    if linear.bias is not None:
        uniform_(linear.bias, bound, generator)


@torch.no_grad()
def reset_linear_zero_bias(linear: nn.Linear, generator: torch.Generator | None) -> None:
    """PyTorch's default weight (kaiming-uniform, a = √5: U(±1/√fan_in)) and a zero bias,
    as mamba_ssm's LM init leaves its mixers' projections."""
    uniform_(linear.weight, 1.0 / math.sqrt(linear.in_features), generator)
    if linear.bias is not None:
        linear.bias.zero_()


def reset_depthwise_conv(conv: nn.Conv1d, generator: torch.Generator | None) -> None:
    """PyTorch's default init of a depthwise conv: U(±1/√width) weight and bias (the fan-in
    of one output channel is its kernel width)."""
    bound = 1.0 / math.sqrt(conv.kernel_size[0])
    uniform_(conv.weight, bound, generator)
    if conv.bias is not None:
        uniform_(conv.bias, bound, generator)


def dt_bias_init(
    size: int, dt_min: float, dt_max: float, floor: float, generator: torch.Generator | None
) -> Tensor:
    """softplus⁻¹ of Δ drawn log-uniform in [dt_min, dt_max] and floored
    (docs/math.md#mamba-2, #mamba-1), so that ``softplus(bias)`` starts in the Δ range
    (Mamba-1, Mamba-2, Hydra). fp64."""
    u = _draw(torch.Size([size]), generator, torch.float64).uniform_(generator=generator)
    dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))  # softplus⁻¹(dt), stable for small dt


def check_dt_range(dt_min: float, dt_max: float) -> list[tuple[tuple[str | int, ...], str]]:
    """The config check of a Δ init range [dt_min, dt_max] (Mamba-1, Mamba-2, Hydra, S4D):
    ``[(path, message)]``, empty when ordered."""
    if dt_min > dt_max:
        return [(("dt_max",), f"dt_max ({dt_max}) is below dt_min ({dt_min})")]
    return []
