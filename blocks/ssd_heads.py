"""What the SSD mixers (Mamba-2, Hydra) share about their heads and their Δ
(docs/math.md#mamba-2, docs/math.md#hydra).

Config side: the head/Δ fields as annotated types (constraint, default, description and
validator travel with the type, so each config declares them in its own field order and
canonical dumps keep their key order) and :class:`SSDHeadsConfig`, the mixin with the
cross-field check of those fields. Module side: Δ = softplus(dt + dt_bias) clamped to
``dt_limit``, A = −exp(A_log), the parameter hints of ``A_log``/``D``/``dt_bias`` and the
FLOPs of one chunked SSD scan. Lives in blocks/ so that no mixer imports another.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any

import torch
import torch.nn.functional as F
from pydantic import AfterValidator, BeforeValidator, Field
from torch import Tensor, nn

from mixstack.blocks.init import (
    check_dt_range,
    dt_bias_init,
    reset_depthwise_conv,
    reset_linear_zero_bias,
)
from mixstack.dsl.errors import divisors
from mixstack.mixers.base import ParamHint

CheckResult = list[tuple[tuple[str | int, ...], str]]


def _infinite_hi_to_null(v: Any) -> Any:
    """``[lo, +inf]`` -> ``[lo, None]`` before the fields' finite-number check: the
    references spell "no upper bound" as ``inf``; null keeps config.json strict JSON."""
    is_pair = isinstance(v, (list, tuple)) and len(v) == 2
    if is_pair and isinstance(v[1], float) and math.isinf(v[1]) and v[1] > 0:
        return (v[0], None)
    return v


def _normalise_dt_limit(v: tuple[float, float | None]) -> tuple[float, float | None]:
    """Require ``0 <= lo < hi`` (``hi`` None: no upper bound)."""
    if not (v[0] >= 0 and (v[1] is None or v[0] < v[1])):
        raise ValueError(f"dt_limit must satisfy 0 <= lo < hi, got {list(v)}")
    return v


HeadDim = Annotated[
    int, Field(64, ge=1, description="P: channels per SSM head; H = (SSM width) / P")
]
NGroups = Annotated[int, Field(1, ge=1, description="G: groups sharing B and C (divides H)")]
DtMin = Annotated[
    float, Field(1e-3, gt=0, description="Δ at init is log-uniform in [dt_min, dt_max]")
]
DtMax = Annotated[float, Field(0.1, gt=0, description="upper end of the Δ init range")]
DtInitFloor = Annotated[float, Field(1e-4, ge=0, description="Δ at init is at least this")]
DtLimit = Annotated[
    tuple[float, float | None],
    BeforeValidator(_infinite_hi_to_null),
    AfterValidator(_normalise_dt_limit),
    Field(
        (0.0, None),
        description="Δ is clamped to [lo, hi] after the softplus; hi null = no upper bound "
        "(the references' (0, inf); null keeps config.json strict JSON)",
    ),
]


class SSDHeadsConfig:
    """Config mixin of the SSD mixers: the check that ``headdim`` divides the SSM width,
    ``ngroups`` divides the heads and the Δ init range is ordered. The config declares
    the fields with the types above."""

    if TYPE_CHECKING:  # declared by the config itself (field order is its own)
        d_state: int
        headdim: int
        ngroups: int
        dt_min: float
        dt_max: float
        dt_init_floor: float
        chunk_size: int

    def check_heads(self, width: int, name: str, note: str) -> CheckResult:
        """Issues of the head layout over an SSM width ``width`` (called ``name``; ``note``
        says where it comes from)."""
        out: CheckResult = []
        if width % self.headdim:
            out.append(
                (
                    ("headdim",),
                    f"headdim ({self.headdim}) must divide {name} ({width}; {note}); allowed "
                    f"headdim: {', '.join(str(d) for d in divisors(width))}",
                )
            )
        elif (width // self.headdim) % self.ngroups:
            heads = width // self.headdim
            out.append(
                (
                    ("ngroups",),
                    f"ngroups ({self.ngroups}) must divide the number of heads {name}/headdim "
                    f"= {heads}; allowed ngroups: {', '.join(str(d) for d in divisors(heads))}",
                )
            )
        return out + check_dt_range(self.dt_min, self.dt_max)


def softplus_delta(dt: Tensor, dt_bias: Tensor, dt_limit: tuple[float, float | None]) -> Tensor:
    """Raw dt (..., H) -> Δ = softplus(dt + dt_bias) (..., H), clamped to ``dt_limit``, in
    fp32 at least (fp64 for fp64)."""
    f = torch.promote_types(dt.dtype, torch.float32)
    delta = F.softplus(dt.to(f) + dt_bias.to(f))
    lo, hi = dt_limit
    if lo > 0.0 or hi is not None:
        delta = delta.clamp(min=lo, max=hi)
    return delta


def negative_exp(A_log: Tensor) -> Tensor:
    """A = −exp(A_log), in fp32 at least (an fp16 A_log could give −inf). Mamba-1 too."""
    return -torch.exp(A_log.to(torch.promote_types(A_log.dtype, torch.float32)))


def ssm_param_hints(dt_bias: str) -> dict[str, ParamHint]:
    """The SSM scalars (``A_log``, ``D`` and the Δ bias named ``dt_bias``) stay fp32 and
    out of weight decay; ``out_proj`` writes into the residual stream. Mamba-1 too."""
    scalar = ParamHint(no_weight_decay=True, keep_fp32=True)
    return {
        "A_log": scalar,
        "D": scalar,
        dt_bias: scalar,
        "out_proj.weight": ParamHint(residual_out=True),
    }


def ssd_scan_macs(cfg: SSDHeadsConfig, nheads: int, seq_len: int) -> float:
    """MACs per token of one chunked SSD scan over ``seq_len`` as the chunked path computes
    them: per chunk of Q = min(chunk_size, seq_len) (padded up) C·Bᵀ (G·Q·N), scores·x
    (H·Q·P), chunk states and state read-out (2·H·P·N)."""
    G, N, H, P = cfg.ngroups, cfg.d_state, nheads, cfg.headdim
    q = min(cfg.chunk_size, seq_len)
    padded = math.ceil(seq_len / q) * q / seq_len  # padded steps are computed too
    return padded * (G * q * N + H * q * P + 2 * H * P * N)


@torch.no_grad()
def reset_ssd_layer(
    linears: Sequence[nn.Linear],
    conv: nn.Conv1d,
    dt_bias: Tensor,
    cfg: SSDHeadsConfig,
    generator: torch.Generator | None,
) -> None:
    """The init Mamba-2 and Hydra share, drawn in this order from ``generator``:
    PyTorch-default ``linears`` with zero biases (as mamba_ssm's LM init leaves them), the
    default depthwise ``conv``, and ``dt_bias`` = softplus⁻¹ of a log-uniform Δ in
    [dt_min, dt_max] floored at dt_init_floor."""
    for linear in linears:
        reset_linear_zero_bias(linear, generator)
    reset_depthwise_conv(conv, generator)
    delta_init = dt_bias_init(dt_bias.numel(), cfg.dt_min, cfg.dt_max, cfg.dt_init_floor, generator)
    dt_bias.copy_(delta_init)
