"""Mamba-1: the selective SSM layer of Gu & Dao (2023), as mamba_ssm's ``Mamba``
(docs/math.md#mamba-1).

``in_proj(u)`` is split **[x | z]** (the opposite order to Mamba-2); ``x ← silu(causal
depthwise conv(x))``; ``x_proj(x)`` is split [dt_r (R) | B (N) | C (N)];
``Δ = softplus(dt_proj.weight · dt_r + dt_proj.bias)`` (bias inside the softplus);
``A = −exp(A_log)`` (d_inner, N); per channel d the diagonal recurrence
``h_t = exp(Δ_t[d] A[d]) ⊙ h_{t−1} + Δ_t[d] x_t[d] B_t``, ``y_t[d] = h_t[d]·C_t + D[d] x_t[d]``;
then ``y ⊙ silu(z)`` and ``out_proj``. Parameter names and shapes are mamba_ssm's
(``in_proj``, ``conv1d``, ``x_proj``, ``dt_proj``, ``A_log``, ``D``, ``out_proj``), so its
checkpoints map one to one.

Matrix view (one term, H = d_inner channels, P = 1, v = post-conv x):
``M_d[i, j] = Σ_n C_i[n] B_j[n] exp(A[d, n] Σ_{k=j+1..i} Δ_k[d]) Δ_j[d]`` for j <= i, plus
``D[d]`` on the diagonal; ``finish`` = the gate ``silu(z)`` and ``out_proj``.

Capabilities: causal, decode. Decode state per sequence: ``d_inner·d_conv`` pre-conv
inputs (model dtype) + ``d_inner·N`` SSM state (fp32, fp64 for fp64), independent of
length. Kernels: ``causal_conv1d`` and ``selective_scan`` (backends ``torch``,
``reference`` and, on the CPU, ``native``); decoding uses their single-step functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn

from mixstack.blocks.init import (
    check_dt_range,
    dt_bias_init,
    reset_depthwise_conv,
    reset_linear_zero_bias,
    uniform_,
)
from mixstack.blocks.ssd_heads import negative_exp, ssm_param_hints
from mixstack.dsl.base import Capabilities, LayerConfig, LayerExample
from mixstack.dsl.context import LayerContext
from mixstack.dsl.registry import register
from mixstack.kernels.causal_conv1d import causal_conv1d_update
from mixstack.kernels.common import zero_padding
from mixstack.kernels.selective_scan import selective_scan, selective_scan_step
from mixstack.mixers.base import Mixer, MixTerms, ParamHint, State, continue_scan, silu_short_conv

CheckResult = list[tuple[tuple[str | int, ...], str]]


class MambaConfig(LayerConfig):
    """Mamba-1 (selective SSM) mixer; defaults are mamba_ssm's ``Mamba`` (docs/math.md#mamba-1)."""

    type: Literal["mamba"] = "mamba"
    d_state: int = Field(16, ge=1, description="SSM state size N per channel")
    d_conv: int = Field(4, ge=1, description="width of the causal depthwise conv over x")
    expand: int = Field(2, ge=1, description="d_inner = expand · d_model")
    dt_rank: int | Literal["auto"] = Field(
        "auto", description="R: rank of the Δ projection; 'auto' = ceil(d_model / 16)"
    )
    dt_min: float = Field(1e-3, gt=0, description="Δ at init is log-uniform in [dt_min, dt_max]")
    dt_max: float = Field(0.1, gt=0, description="upper end of the Δ init range")
    dt_init: Literal["random", "constant"] = Field(
        "random", description="dt_proj.weight at init: U(±R^-1/2·dt_scale) or that constant"
    )
    dt_scale: float = Field(1.0, gt=0, description="scales the dt_proj.weight init")
    dt_init_floor: float = Field(1e-4, ge=0, description="Δ at init is at least this")
    conv_bias: bool = Field(True, description="bias on the depthwise conv")
    bias: bool = Field(False, description="biases on in_proj and out_proj")

    @field_validator("dt_rank")
    @classmethod
    def _check_dt_rank(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError(f"dt_rank must be 'auto' or an integer >= 1, got {v}")
        return v

    def capabilities(self, ctx: LayerContext) -> Capabilities:
        return Capabilities(causal=True, decode=True)

    def rank(self, d_model: int) -> int:
        """R as an int ('auto' -> ceil(d_model / 16), mamba_ssm's rule)."""
        return math.ceil(d_model / 16) if self.dt_rank == "auto" else self.dt_rank

    def resolve(self, ctx: LayerContext) -> MambaConfig:
        if self.dt_rank != "auto":
            return self
        return self.model_copy(update={"dt_rank": self.rank(ctx.d_model)})

    def check(self, ctx: LayerContext) -> CheckResult:
        return check_dt_range(self.dt_min, self.dt_max)

    @classmethod
    def examples(cls) -> list[LayerExample]:
        return [
            LayerExample(cls(d_state=4), d_model=16, name="default-small"),
            LayerExample(
                cls(
                    d_state=3,
                    d_conv=3,
                    expand=1,
                    dt_rank=3,
                    dt_init="constant",
                    conv_bias=False,
                    bias=True,
                ),
                d_model=16,
                name="bias-constant-dt",
            ),
            LayerExample(cls(d_state=2, d_conv=1, dt_rank=1), d_model=8, name="conv-width-1"),
        ]


@dataclass
class MambaState(State):
    """Decode state. conv_state (B, d_inner, d_conv): the last d_conv pre-conv x columns,
    oldest first (model dtype); ssm_state (B, d_inner, N), fp32 (fp64 for fp64)."""

    conv_state: Tensor
    ssm_state: Tensor


@dataclass
class MambaCoeffs:
    """Everything ``mix`` needs besides v: Δ (B, L, d_inner) (fp32 at least), A (d_inner, N),
    B/C (B, L, N), D (d_inner,), document ids (B, L) | None."""

    delta: Tensor
    A: Tensor
    B: Tensor
    C: Tensor
    D: Tensor
    seq_idx: Tensor | None


@register(MambaConfig)
class Mamba(Mixer):
    """Mamba-1 mixer; equations, state size and backends in the module docstring."""

    cfg: MambaConfig

    def __init__(self, cfg: MambaConfig, ctx: LayerContext):
        super().__init__(cfg, ctx)
        cfg = self.cfg  # resolved and checked by Mixer.__init__
        D, N = ctx.d_model, cfg.d_state
        self.d_inner = cfg.expand * D
        self.dt_rank = cfg.rank(D)
        self.in_proj = nn.Linear(D, 2 * self.d_inner, bias=cfg.bias)
        self.conv1d = nn.Conv1d(
            self.d_inner,
            self.d_inner,
            cfg.d_conv,
            groups=self.d_inner,
            padding=cfg.d_conv - 1,
            bias=cfg.conv_bias,
        )  # weights only: the convolution itself runs in kernels/causal_conv1d
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * N, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, N))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, D, bias=cfg.bias)
        self.reset_parameters()

    # -- initialisation (docs/math.md#mamba-1) ----------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """PyTorch-default linears and conv (biases of linears zeroed, as mamba_ssm's LM
        init does); dt_proj.weight U(±R^-1/2·dt_scale) (or that constant); dt_proj.bias
        = softplus⁻¹ of a log-uniform Δ; S4D-real ``A_log[d, n] = ln(n + 1)``; D = 1.
        Every random draw uses ``generator``."""
        cfg = self.cfg
        for lin in (self.in_proj, self.x_proj, self.out_proj):
            reset_linear_zero_bias(lin, generator)
        reset_depthwise_conv(self.conv1d, generator)
        std = self.dt_rank**-0.5 * cfg.dt_scale
        if cfg.dt_init == "random":
            uniform_(self.dt_proj.weight, std, generator)
        else:
            self.dt_proj.weight.fill_(std)
        self.dt_proj.bias.copy_(
            dt_bias_init(self.d_inner, cfg.dt_min, cfg.dt_max, cfg.dt_init_floor, generator)
        )
        n = torch.arange(1, cfg.d_state + 1, dtype=torch.float64, device=self.A_log.device)
        self.A_log.copy_(torch.log(n).expand(self.d_inner, -1))
        self.D.fill_(1.0)

    # -- pieces shared by forward, the matrix view and decoding -------------------------
    def _split_xproj(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Post-conv x (..., d_inner) -> Δ (..., d_inner) (fp32 at least), B, C (..., N)."""
        N = self.cfg.d_state
        dt_r, B, C = self.x_proj(x).split([self.dt_rank, N, N], dim=-1)
        dt = F.linear(dt_r, self.dt_proj.weight)
        f = torch.promote_types(dt.dtype, torch.float32)
        return F.softplus(dt.to(f) + self.dt_proj.bias.to(f)), B, C

    def _A(self) -> Tensor:
        """A = −exp(A_log) (d_inner, N), fp32 at least."""
        return negative_exp(self.A_log)

    def _conv_weight(self) -> Tensor:
        return self.conv1d.weight[:, 0, :]  # (d_inner, d_conv)

    def _out(self, y: Tensor, seq_idx: Tensor | None) -> Tensor:
        """Gated y (B, L, d_inner) -> out_proj -> (B, L, D); exactly 0 at padding."""
        out = self.out_proj(y.to(self.out_proj.weight.dtype))
        return zero_padding(out, seq_idx)

    def _coefficients(
        self, u: Tensor, seq_idx: Tensor | None, state: MambaState | None
    ) -> tuple[Tensor, Tensor, MambaCoeffs]:
        """in_proj, conv, x_proj, Δ/A: -> post-conv x (B, L, d_inner), z, coefficients.

        With ``state``, the conv continues from ``state.conv_state`` and writes its new
        value (the last d_conv pre-conv columns).
        """
        xs, z = self.in_proj(u).chunk(2, dim=-1)  # [x | z]
        conv = silu_short_conv(
            xs,
            self._conv_weight(),
            self.conv1d.bias,
            seq_idx=seq_idx,
            conv_state=None if state is None else state.conv_state,
            backends=self.backends,
        )
        delta, B, C = self._split_xproj(conv)
        return conv, z, MambaCoeffs(delta, self._A(), B, C, self.D, seq_idx)

    def _scan(
        self,
        v: Tensor,
        coeffs: MambaCoeffs,
        z: Tensor | None,
        initial_state: Tensor | None,
        final: bool,
    ) -> Tensor | tuple[Tensor, Tensor]:
        return selective_scan(
            v,
            coeffs.delta,
            coeffs.A,
            coeffs.B,
            coeffs.C,
            D=coeffs.D,
            z=z,
            seq_idx=coeffs.seq_idx,
            initial_state=initial_state,
            return_final_state=final,
            backends=self.backends,
        )

    # -- forward and matrix view -------------------------------------------------------
    def forward_sequence(
        self, x: Tensor, *, input_ids: Tensor | None, seq_idx: Tensor | None
    ) -> Tensor:
        """u (B, L, D) -> (B, L, D); the gate z is fused into the scan."""
        xs, z, coeffs = self._coefficients(x, seq_idx, None)
        return self._out(self._scan(xs, coeffs, z, None, False), seq_idx)

    def prefill(
        self, x: Tensor, state: State, *, input_ids: Tensor | None, seq_idx: Tensor | None
    ) -> Tensor:
        """Continues from ``state`` and fills it (conv columns and the final SSM state),
        so prefills can be chunked."""
        st = self.own_state(state, MambaState)
        xs, z, coeffs = self._coefficients(x, seq_idx, st)
        y = continue_scan(st.ssm_state, lambda init, final: self._scan(xs, coeffs, z, init, final))
        return self._out(y, seq_idx)

    def mixing_terms(
        self, x: Tensor, *, input_ids: Tensor | None = None, seq_idx: Tensor | None = None
    ) -> MixTerms:
        xs, z, coeffs = self._coefficients(x, seq_idx, None)

        def finish(y: Tensor) -> Tensor:  # y (B, L, d_inner, 1)
            return self._out(y[..., 0] * F.silu(z.to(y.dtype)), seq_idx)

        return MixTerms([(coeffs, xs[..., None])], finish)

    def mix(self, coeffs: MambaCoeffs, v: Tensor) -> Tensor:
        """The selective scan (with the D skip) on v (B, L, d_inner, P), any P ->
        (B, L, d_inner, P); linear in v. The P columns become batch rows of the scan."""
        bsz, length, channels, cols = v.shape
        u = v.permute(0, 3, 1, 2).reshape(bsz * cols, length, channels)  # row b·P + p

        def rows(t: Tensor) -> Tensor:
            return t.repeat_interleave(cols, dim=0)

        seq_idx = None if coeffs.seq_idx is None else rows(coeffs.seq_idx)
        per_row = MambaCoeffs(
            rows(coeffs.delta), coeffs.A, rows(coeffs.B), rows(coeffs.C), coeffs.D, seq_idx
        )
        y = self._scan(u, per_row, None, None, False)
        assert isinstance(y, Tensor)
        return y.reshape(bsz, cols, length, channels).permute(0, 2, 3, 1)

    # -- decoding ------------------------------------------------------------------------
    def init_state(
        self, batch: int, max_len: int, *, device: torch.device | str | None, dtype: torch.dtype
    ) -> MambaState:
        """Zero state; its size does not depend on ``max_len``."""
        ssm_dtype = torch.promote_types(dtype, torch.float32)
        return MambaState(
            conv_state=torch.zeros(
                batch, self.d_inner, self.cfg.d_conv, device=device, dtype=dtype
            ),
            ssm_state=torch.zeros(
                batch, self.d_inner, self.cfg.d_state, device=device, dtype=ssm_dtype
            ),
        )

    def step(self, x_t: Tensor, state: State, *, token_t: Tensor | None = None) -> Tensor:
        """One token u_t (B, D) -> (B, D); updates both parts of ``state`` in place."""
        st = self.own_state(state, MambaState)
        xs, z = self.in_proj(x_t).chunk(2, dim=-1)  # (B, d_inner) each
        xs = causal_conv1d_update(
            xs, st.conv_state, self._conv_weight(), self.conv1d.bias, activation="silu"
        )
        delta, B, C = self._split_xproj(xs)
        y = selective_scan_step(st.ssm_state, xs, delta, self._A(), B, C, D=self.D, z=z)
        return self._out(y, None)

    @property
    def bounded_state(self) -> bool:
        """A recurrence: conv columns and SSM state of fixed size, whatever the length."""
        return True

    # -- bookkeeping ---------------------------------------------------------------------
    def param_hints(self) -> dict[str, ParamHint]:
        return ssm_param_hints("dt_proj.bias")  # Mamba-2's dt_bias: Δ sits in its softplus

    def flops_per_token(self, seq_len: int) -> float:
        """2·MACs per token: the projections (in, x, dt, out), the depthwise conv, and the
        recurrence's 3 MACs per (channel, state) entry (decay·h, Δx·B, h·C)."""
        D, N, R, Di = self.ctx.d_model, self.cfg.d_state, self.dt_rank, self.d_inner
        proj = D * 2 * Di + Di * (R + 2 * N) + R * Di + Di * D
        return 2.0 * (proj + Di * self.cfg.d_conv + 3 * Di * N)
