"""Hyena's implicit long filter: a small network over positional features (docs/math.md#hyena).

A filter of ``channels`` rows is not stored tap by tap: it is the output of an MLP
evaluated at every position, ``ĥ(t) = MLP(z(t))``, then modulated by an exponential
decay per channel, ``h(t) = ĥ(t) · (exp(−t·|δ_c|) + shift)``. The features
``z(t) = [t, Re e^{−i f ω_t}, Im e^{−i f ω_t}]`` (``t = linspace(0, 1, max_len)``,
``ω_t = 2π·idx/max_len``, ``f = linspace(1e-4, bands − 1, bands)``, ``bands =
(emb_dim − 1)/2``) are built once at ``max_len`` and **sliced** to the first L
positions, so a filter tap never depends on the length of the call (which is what makes
a causal prefix independent of the total length). The MLP is ``Linear(emb_dim → width)``,
``Sin``, ``inner_layers × (Linear(width → width), Sin)``, ``Linear(width → channels, no
bias)``; its Sin activations are **one module** (shared ``freq (1, width)``, initialised
to ``w``), exactly as in safari, so the state dict lists that tensor under each index.

Parameter names follow safari's ``HyenaFilter`` (``pos_emb.z``, ``pos_emb.t``,
``implicit_filter.{i}``, ``modulation.deltas``, ``bias``), so its weights map one to one.
``implicit_filter_rev`` (own Sin) is the backward filter of bidirectional mixers, as in
Orchid's ``ConvKernel_Static(bidirectional=True)``.

The filter is computed in fp32 at least whatever the parameter dtype: positions in bf16
would collapse neighbouring taps (``pos_emb.z``, ``pos_emb.t`` and ``modulation.deltas``
are also hinted ``keep_fp32``). Buffers are recomputed by ``reset_parameters``, so a
module built on the meta device and moved with ``to_empty`` is complete after it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from mixstack.blocks.init import normal_, reset_linear


class ModulationConfig(BaseModel):
    """Exponential decay of the filter; defaults are safari's ``ExponentialModulation``."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False
    )

    fast_decay_pct: float = Field(
        0.3, gt=0, description="fastest channel decays to `target` at this fraction of max_len"
    )
    slow_decay_pct: float = Field(
        1.5, gt=0, description="slowest channel decays to `target` at this fraction of max_len"
    )
    target: float = Field(1e-2, gt=0, lt=1, description="decay level reached at the pct above")
    shift: float = Field(0.0, description="added to the decay: h · (exp(−t|δ|) + shift)")


class ImplicitFilterConfig(BaseModel):
    """The implicit filter network of Hyena / Orchid; defaults are safari's hyena-filter."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False
    )

    width: int = Field(64, ge=1, description="MLP width (safari `filter_order`)")
    emb_dim: int = Field(
        3, ge=3, description="positional features: t plus (emb_dim-1)/2 complex bands (odd)"
    )
    inner_layers: int = Field(
        2, ge=0, description="hidden Linear(width, width) + Sin layers (safari `num_inner_mlps`)"
    )
    w: float = Field(1.0, description="initial frequency of the Sin activations")
    modulation: ModulationConfig | None = Field(
        default_factory=ModulationConfig, description="exponential decay; null = none"
    )
    bias: bool = Field(
        True, description="learned per-channel skip `bias · v` added to each convolution"
    )
    lr_scale: float = Field(
        1.0, gt=0, description="learning-rate multiplier of the MLP (safari trains it at 1e-3)"
    )
    pos_emb_lr_scale: float = Field(
        0.01, gt=0, description="learning-rate multiplier of pos_emb.z (safari: 1e-5 vs 1e-3)"
    )

    @field_validator("emb_dim")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError(
                f"emb_dim must be odd (t, then a cosine and a sine per band), got {v}; "
                f"use {v - 1} or {v + 1}"
            )
        return v


# -- modules ------------------------------------------------------------------------------------


def positional_features(max_len: int, emb_dim: int) -> tuple[Tensor, Tensor]:
    """``z (max_len, emb_dim)`` and ``t (max_len, 1)`` of the module docstring, fp64."""
    t = torch.linspace(0, 1, max_len, dtype=torch.float64)[:, None]  # (L, 1)
    bands = (emb_dim - 1) // 2
    omega = 2 * math.pi * torch.arange(max_len, dtype=torch.float64)[:, None] / max_len
    f = torch.linspace(1e-4, bands - 1, bands, dtype=torch.float64)[None]  # (1, bands)
    z = torch.cat([t, torch.cos(f * omega), -torch.sin(f * omega)], dim=-1)  # e^{−i f ω}
    return z, t


class Sin(nn.Module):
    """``sin(freq ⊙ x)`` with a learned ``freq (1, width)``."""

    def __init__(self, width: int, w: float):
        super().__init__()
        self.w = w
        self.freq = nn.Parameter(torch.empty(1, width))

    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(self.freq.to(x.dtype) * x)


class PositionalEmbedding(nn.Module):
    """Trainable features ``z (1, max_len, emb_dim)`` and the time axis ``t (1, max_len, 1)``."""

    def __init__(self, emb_dim: int, max_len: int):
        super().__init__()
        self.emb_dim, self.max_len = emb_dim, max_len
        self.z = nn.Parameter(torch.empty(1, max_len, emb_dim))
        self.register_buffer("t", torch.empty(1, max_len, 1))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        z, t = positional_features(self.max_len, self.emb_dim)
        self.z.copy_(z[None])
        self.t.copy_(t[None])

    def forward(self, length: int) -> tuple[Tensor, Tensor]:
        """The first ``length`` positions: z (length, emb_dim), t (length, 1)."""
        return self.z[0, :length], self.t[0, :length]


class ExponentialModulation(nn.Module):
    """``h · (exp(−t·|δ_c|) + shift)`` with ``δ = linspace(ln(target)/slow, ln(target)/fast)``."""

    def __init__(self, channels: int, cfg: ModulationConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("deltas", torch.empty(1, 1, channels))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        lo = math.log(self.cfg.target) / self.cfg.slow_decay_pct
        hi = math.log(self.cfg.target) / self.cfg.fast_decay_pct
        self.deltas.copy_(torch.linspace(lo, hi, self.deltas.shape[-1], dtype=torch.float64))

    def forward(self, t: Tensor, h: Tensor) -> Tensor:
        """t (L, 1), h (L, C) -> (L, C)."""
        decay = torch.exp(-t * self.deltas[0].to(t.dtype).abs())
        return h * (decay + self.cfg.shift)


def _mlp(cfg: ImplicitFilterConfig, channels: int) -> nn.Sequential:
    act = Sin(cfg.width, cfg.w)  # one instance: safari shares freq across the activations
    layers: list[nn.Module] = [nn.Linear(cfg.emb_dim, cfg.width), act]
    for _ in range(cfg.inner_layers):
        layers += [nn.Linear(cfg.width, cfg.width), act]
    layers.append(nn.Linear(cfg.width, channels, bias=False))
    return nn.Sequential(*layers)


class ImplicitFilter(nn.Module):
    """Filters of ``channels`` rows for any length ``L <= max_len`` (module docstring).

    ``filter(L)`` / ``filter_rev(L)`` -> (channels, L) in fp32 (fp64 for fp64 parameters).
    ``bias`` (channels,) is the skip term the caller adds, or None.
    """

    def __init__(
        self,
        channels: int,
        max_len: int,
        cfg: ImplicitFilterConfig,
        *,
        bidirectional: bool = False,
    ):
        super().__init__()
        self.cfg, self.channels, self.max_len = cfg, channels, max_len
        self.pos_emb = PositionalEmbedding(cfg.emb_dim, max_len)
        self.implicit_filter = _mlp(cfg, channels)
        self.implicit_filter_rev = _mlp(cfg, channels) if bidirectional else None
        self.modulation = (
            ExponentialModulation(channels, cfg.modulation) if cfg.modulation else None
        )
        self.bias = nn.Parameter(torch.empty(channels)) if cfg.bias else None

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Default Linear init, Sin freq = w, bias ~ N(0, 1) (safari), buffers recomputed."""
        self.pos_emb.reset_parameters()
        if self.modulation is not None:
            self.modulation.reset_parameters()
        for mlp in (self.implicit_filter, self.implicit_filter_rev):
            if mlp is None:
                continue
            for layer in mlp:
                if isinstance(layer, nn.Linear):
                    reset_linear(layer, generator)
                elif isinstance(layer, Sin):
                    layer.freq.fill_(layer.w)
        if self.bias is not None:
            normal_(self.bias, 1.0, generator)

    def _evaluate(self, mlp: nn.Sequential, length: int) -> Tensor:
        if length > self.max_len:
            raise ValueError(f"implicit filter built for {self.max_len} positions, asked {length}")
        z, t = self.pos_emb(length)
        f = torch.promote_types(z.dtype, torch.float32)
        h = z.to(f)  # (L, emb_dim)
        for layer in mlp:
            if isinstance(layer, nn.Linear):
                bias = None if layer.bias is None else layer.bias.to(f)
                h = F.linear(h, layer.weight.to(f), bias)
            else:
                h = layer(h)
        if self.modulation is not None:
            h = self.modulation(t.to(f), h)
        return h.T  # (channels, L)

    def filter(self, length: int) -> Tensor:
        """Forward filter (lags 0..L−1): (channels, L)."""
        return self._evaluate(self.implicit_filter, length)

    def filter_rev(self, length: int) -> Tensor:
        """Backward filter (lags −1..−L) of a bidirectional filter: (channels, L)."""
        if self.implicit_filter_rev is None:
            raise ValueError("this implicit filter was built without a backward filter")
        return self._evaluate(self.implicit_filter_rev, length)

    def skip(self, dtype: torch.dtype) -> Tensor | None:
        """The per-channel skip ``bias`` in ``dtype`` (None when the config has none)."""
        return None if self.bias is None else self.bias.to(dtype)

    def hint_kwargs(self) -> dict[str, dict[str, Any]]:
        """``ParamHint`` fields per parameter / buffer name (the owning mixer builds the
        hints; blocks/ does not import mixers/): MLP without weight decay at its own lr,
        pos_emb.z at its own (small) lr, positions and decays kept fp32."""
        hints: dict[str, dict[str, Any]] = {
            "pos_emb.z": {
                "no_weight_decay": True,
                "lr_scale": self.cfg.pos_emb_lr_scale,
                "keep_fp32": True,
            },
            "pos_emb.t": {"keep_fp32": True},
        }
        for prefix in ("implicit_filter", "implicit_filter_rev"):
            mlp = getattr(self, prefix)
            if mlp is not None:
                for name, _ in mlp.named_parameters():
                    hints[f"{prefix}.{name}"] = {
                        "no_weight_decay": True,
                        "lr_scale": self.cfg.lr_scale,
                    }
        if self.modulation is not None:
            hints["modulation.deltas"] = {"keep_fp32": True}
        if self.bias is not None:
            hints["bias"] = {"no_weight_decay": True}
        return hints
