"""Mamba-2: the SSD layer of Dao & Gu (2024), exactly as mamba_ssm's ``Mamba2``
(docs/math.md#mamba-2).

``in_proj(u)`` is split **[z0 | x0 | z | xBC | dt]** (z0, x0 of width d_mlp = d_inner −
d_ssm, usually empty); ``xBC ← silu(causal depthwise conv(xBC))`` and split into
``x (B, L, H, P)``, ``B, C (B, L, G, N)``; ``Δ = softplus(dt + dt_bias)`` clamped to
``dt_limit``; ``A = −exp(A_log)``; per head the SSD recurrence
``S_t = exp(Δ_t A) S_{t−1} + Δ_t x_t B_tᵀ``, ``y_t = S_t C_t + D x_t`` (head h reads
group h // (H/G)); then the group-wise gated RMSNorm ``rms_g(y ⊙ silu(z))·w``
(``norm_before_gate=False``, group size d_ssm/G), ``[silu(z0)·x0 | y]`` and
``out_proj``. Parameter names and shapes are mamba_ssm's (``in_proj``, ``conv1d``,
``dt_bias``, ``A_log``, ``D``, ``norm.weight``, ``out_proj``), so its checkpoints map
one to one.

Matrix view (one term, v = post-conv x): ``M_h[i, j] = (C_i·B_j)·exp(A_h Σ_{k=j+1..i} Δ_k)·Δ_j``
for j <= i, plus ``D_h`` on the diagonal (with ``D_has_hdim`` the per-channel skip is
applied in ``finish`` instead: it is not a per-head matrix). ``finish`` = gate, norm,
d_mlp branch, ``out_proj``.

Capabilities: causal, decode. Decode state per sequence: ``conv_dim·d_conv`` pre-conv
inputs (model dtype) + ``H·P·N`` SSM state (fp32), independent of length; conv_dim =
d_ssm + 2GN. Kernels: ``causal_conv1d``, ``ssd_scan`` and ``gated_rms_norm`` (backends
``torch``, ``reference`` and, on the CPU, ``native``); decoding uses the single-step
functions of the first two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn

from mixstack.blocks import ssd_heads as ssd
from mixstack.blocks.gated_norm import GatedRMSNorm
from mixstack.dsl.base import Capabilities, LayerConfig, LayerExample
from mixstack.dsl.context import LayerContext
from mixstack.dsl.registry import register
from mixstack.kernels.causal_conv1d import causal_conv1d_update
from mixstack.kernels.common import zero_padding
from mixstack.kernels.ssd import ssd_scan, ssd_step
from mixstack.mixers.base import Mixer, MixTerms, ParamHint, State, continue_scan, silu_short_conv


class Mamba2Config(ssd.SSDHeadsConfig, LayerConfig):
    """Mamba-2 (SSD) mixer; defaults are mamba_ssm's ``Mamba2`` (docs/math.md#mamba-2)."""

    type: Literal["mamba2"] = "mamba2"
    d_state: int = Field(128, ge=1, description="SSM state size N per head")
    d_conv: int = Field(4, ge=1, description="width of the causal depthwise conv over x, B, C")
    expand: int = Field(2, ge=1, description="d_inner = expand · d_model")
    headdim: ssd.HeadDim
    ngroups: ssd.NGroups
    A_init_range: tuple[float, float] = Field(
        (1.0, 16.0), description="A = −U(lo, hi) at init (A_log = log U(lo, hi))"
    )
    dt_min: ssd.DtMin
    dt_max: ssd.DtMax
    dt_init_floor: ssd.DtInitFloor
    dt_limit: ssd.DtLimit
    bias: bool = Field(False, description="biases on in_proj and out_proj")
    conv_bias: bool = Field(True, description="bias on the depthwise conv")
    chunk_size: int = Field(256, ge=1, description="SSD chunk length (speed/memory, not math)")
    rmsnorm: bool = Field(True, description="gated RMSNorm before out_proj (else y·silu(z))")
    norm_before_gate: bool = Field(
        False, description="rms(y)·w·silu(z) instead of rms(y·silu(z))·w"
    )
    norm_eps: float = Field(
        1e-5, gt=0, description="eps of the gated RMSNorm (transformers: the model's norm eps)"
    )
    D_has_hdim: bool = Field(False, description="D per channel (H, P) instead of per head (H)")
    d_ssm: int | None = Field(
        None,
        ge=1,
        description="channels through the SSM; the rest of d_inner is a gated "
        "MLP branch; None -> d_inner",
    )

    @field_validator("A_init_range")
    @classmethod
    def _check_a_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError(f"A_init_range must satisfy 0 < lo <= hi, got {list(v)}")
        return v

    def capabilities(self, ctx: LayerContext) -> Capabilities:
        return Capabilities(causal=True, decode=True)

    def resolve(self, ctx: LayerContext) -> Mamba2Config:
        if self.d_ssm is not None:
            return self
        return self.model_copy(update={"d_ssm": self.expand * ctx.d_model})

    def check(self, ctx: LayerContext) -> ssd.CheckResult:
        d_inner = self.expand * ctx.d_model
        d_ssm = d_inner if self.d_ssm is None else self.d_ssm
        out: ssd.CheckResult = []
        if d_ssm > d_inner:
            out.append(
                (
                    ("d_ssm",),
                    f"d_ssm ({d_ssm}) exceeds d_inner = expand·d_model "
                    f"({self.expand}·{ctx.d_model} = {d_inner})",
                )
            )
        out += self.check_heads(d_ssm, "d_ssm", f"expand·d_model = {d_inner}")
        return out

    @classmethod
    def examples(cls) -> list[LayerExample]:
        small = {"d_state": 8, "headdim": 8}
        return [
            LayerExample(cls(**small, chunk_size=16), name="default-small"),
            LayerExample(cls(**small, ngroups=2, chunk_size=8), name="ngroups-2"),
            LayerExample(cls(**small, D_has_hdim=True, chunk_size=5), name="D-per-channel"),
            LayerExample(
                cls(
                    **small, ngroups=4, norm_before_gate=True, d_conv=3, chunk_size=7, norm_eps=1e-3
                ),
                name="norm-before-gate",
            ),
            LayerExample(
                cls(**small, rmsnorm=False, bias=True, conv_bias=False, chunk_size=16),
                name="no-rmsnorm",
            ),
            LayerExample(cls(**small, d_ssm=32, ngroups=2, chunk_size=8), name="d_ssm-mlp-branch"),
            LayerExample(
                cls(**small, expand=1, dt_limit=(0.01, 0.05), chunk_size=6), name="dt-limit"
            ),
        ]


@dataclass
class Mamba2State(State):
    """Decode state. conv_state (B, conv_dim, d_conv): the last d_conv pre-conv xBC
    columns, oldest first (model dtype); ssm_state (B, H, P, N), fp32 (fp64 for fp64)."""

    conv_state: Tensor
    ssm_state: Tensor


@dataclass
class Mamba2Coeffs:
    """Everything ``mix`` needs besides v: Δ (B, L, H), A (H,), B/C (B, L, G, N), the
    per-head D on the diagonal (None when D is per channel), document ids (B, L)."""

    dt: Tensor
    A: Tensor
    B: Tensor
    C: Tensor
    D: Tensor | None
    seq_idx: Tensor | None


@dataclass
class _Projected:
    """in_proj(u) split [z0 | x0 | z | xBC | dt]; shapes (B, L, width)."""

    z0: Tensor
    x0: Tensor
    z: Tensor
    xBC: Tensor
    dt: Tensor


@register(Mamba2Config)
class Mamba2(Mixer):
    """Mamba-2 mixer; equations, state size and backends in the module docstring."""

    cfg: Mamba2Config

    def __init__(self, cfg: Mamba2Config, ctx: LayerContext):
        super().__init__(cfg, ctx)
        cfg = self.cfg  # resolved and checked by Mixer.__init__
        assert cfg.d_ssm is not None  # set by resolve
        D, N, G = ctx.d_model, cfg.d_state, cfg.ngroups
        self.d_inner, self.d_ssm = cfg.expand * D, cfg.d_ssm
        self.d_mlp = self.d_inner - self.d_ssm
        self.headdim, self.nheads = cfg.headdim, cfg.d_ssm // cfg.headdim
        self.conv_dim = self.d_ssm + 2 * G * N
        d_in_proj = 2 * self.d_inner + 2 * G * N + self.nheads
        self.in_proj = nn.Linear(D, d_in_proj, bias=cfg.bias)
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            cfg.d_conv,
            groups=self.conv_dim,
            padding=cfg.d_conv - 1,
            bias=cfg.conv_bias,
        )  # weights only: the convolution itself runs in kernels/causal_conv1d
        self.dt_bias = nn.Parameter(torch.empty(self.nheads))
        self.A_log = nn.Parameter(torch.empty(self.nheads))
        self.D = nn.Parameter(torch.empty(self.d_ssm if cfg.D_has_hdim else self.nheads))
        self.norm = (
            GatedRMSNorm(
                self.d_ssm,
                group_size=self.d_ssm // G,
                eps=cfg.norm_eps,
                norm_before_gate=cfg.norm_before_gate,
            )
            if cfg.rmsnorm
            else None
        )
        self.out_proj = nn.Linear(self.d_inner, D, bias=cfg.bias)
        self.reset_parameters()

    # -- initialisation (docs/math.md#mamba-2) ----------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """PyTorch-default linears and conv (biases of linears zeroed, as mamba_ssm's LM
        init does), log-uniform Δ through an inverse softplus, A = −U(A_init_range),
        D = 1, norm weight = 1. Every random draw uses ``generator``."""
        ssd.reset_ssd_layer(
            (self.in_proj, self.out_proj), self.conv1d, self.dt_bias, self.cfg, generator
        )
        device = generator.device if generator is not None else None
        A_range = self.cfg.A_init_range
        A = torch.empty(self.nheads, device=device).uniform_(*A_range, generator=generator)
        self.A_log.copy_(torch.log(A))
        self.D.fill_(1.0)
        if self.norm is not None:
            self.norm.reset_parameters()

    # -- pieces shared by forward, the matrix view and decoding -------------------------
    def _project(self, u: Tensor) -> _Projected:
        """u (B, L, D) -> in_proj split [z0 | x0 | z | xBC | dt]."""
        parts = self.in_proj(u).split(
            [self.d_mlp, self.d_mlp, self.d_ssm, self.conv_dim, self.nheads], dim=-1
        )
        return _Projected(*parts)

    def _split_xbc(self, xBC: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """xBC (..., conv_dim) -> x (..., H, P), B (..., G, N), C (..., G, N)."""
        GN = self.cfg.ngroups * self.cfg.d_state
        x, B, C = xBC.split([self.d_ssm, GN, GN], dim=-1)
        lead = xBC.shape[:-1]
        return (
            x.reshape(*lead, self.nheads, self.headdim),
            B.reshape(*lead, self.cfg.ngroups, self.cfg.d_state),
            C.reshape(*lead, self.cfg.ngroups, self.cfg.d_state),
        )

    def _dt(self, dt: Tensor) -> Tensor:
        """Raw dt (..., H) -> Δ (..., H), fp32 (fp64)."""
        return ssd.softplus_delta(dt, self.dt_bias, self.cfg.dt_limit)

    def _A(self) -> Tensor:
        """A = −exp(A_log) (H,), fp32 at least."""
        return ssd.negative_exp(self.A_log)

    def _conv_weight(self) -> Tensor:
        return self.conv1d.weight[:, 0, :]  # (conv_dim, d_conv)

    def _finish(self, y: Tensor, parts: _Projected, seq_idx: Tensor | None) -> Tensor:
        """y (B, L, H, P) -> gate (+ norm), d_mlp branch, out_proj -> (B, L, D).

        Padding positions (seq_idx −1) output exactly 0.
        """
        y = y.reshape(*y.shape[:2], self.d_ssm)
        z = parts.z
        y = self.norm(y, z, self.backends) if self.norm is not None else y * F.silu(z)
        if self.d_mlp > 0:
            y = torch.cat([F.silu(parts.z0) * parts.x0, y], dim=-1)  # (B, L, d_inner)
        out = self.out_proj(y)
        return zero_padding(out, seq_idx)

    def _scan(
        self, v: Tensor, coeffs: Mamba2Coeffs, initial_state: Tensor | None, final: bool
    ) -> Tensor | tuple[Tensor, Tensor]:
        return ssd_scan(
            v,
            coeffs.dt,
            coeffs.A,
            coeffs.B,
            coeffs.C,
            chunk_size=self.cfg.chunk_size,
            D=coeffs.D,
            seq_idx=coeffs.seq_idx,
            initial_state=initial_state,
            return_final_state=final,
            backends=self.backends,
        )

    def _coefficients(
        self, u: Tensor, seq_idx: Tensor | None, state: Mamba2State | None
    ) -> tuple[_Projected, Tensor, Mamba2Coeffs]:
        """Projections, conv and Δ/A: -> parts, post-conv x (B, L, H, P), coefficients.

        With ``state``, the conv continues from ``state.conv_state`` and writes its new
        value (the last d_conv pre-conv columns).
        """
        parts = self._project(u)
        conv = silu_short_conv(
            parts.xBC,
            self._conv_weight(),
            self.conv1d.bias,
            seq_idx=seq_idx,
            conv_state=None if state is None else state.conv_state,
            backends=self.backends,
        )
        x, B, C = self._split_xbc(conv)
        D = self.D if not self.cfg.D_has_hdim else None
        return parts, x, Mamba2Coeffs(self._dt(parts.dt), self._A(), B, C, D, seq_idx)

    def _channel_skip(self, x: Tensor) -> Tensor | float:
        """The D x term when D is per channel, x (B, L, H, P); 0 otherwise (it is in M)."""
        if not self.cfg.D_has_hdim:
            return 0.0
        return x * self.D.view(self.nheads, self.headdim).to(x.dtype)

    # -- forward and matrix view -------------------------------------------------------
    def prefill(
        self, x: Tensor, state: State, *, input_ids: Tensor | None, seq_idx: Tensor | None
    ) -> Tensor:
        """Continues from ``state`` and fills it (conv columns and the final SSM state),
        so prefills can be chunked. Without state the matrix view is the forward pass."""
        st = self.own_state(state, Mamba2State)
        parts, xs, coeffs = self._coefficients(x, seq_idx, st)
        y = continue_scan(st.ssm_state, lambda init, final: self._scan(xs, coeffs, init, final))
        return self._finish(y + self._channel_skip(xs), parts, seq_idx)

    def mixing_terms(
        self, x: Tensor, *, input_ids: Tensor | None = None, seq_idx: Tensor | None = None
    ) -> MixTerms:
        parts, xs, coeffs = self._coefficients(x, seq_idx, None)
        skip = self._channel_skip(xs)
        return MixTerms([(coeffs, xs)], lambda y: self._finish(y + skip, parts, seq_idx))

    def mix(self, coeffs: Mamba2Coeffs, v: Tensor) -> Tensor:
        """The SSD scan applied to v (B, L, H, P'), any P' -> (B, L, H, P'); linear in v."""
        out = self._scan(v, coeffs, None, False)
        assert isinstance(out, Tensor)
        return out

    # -- decoding ------------------------------------------------------------------------
    def init_state(
        self, batch: int, max_len: int, *, device: torch.device | str | None, dtype: torch.dtype
    ) -> Mamba2State:
        """Zero state; its size does not depend on ``max_len``."""
        ssm_dtype = torch.promote_types(dtype, torch.float32)
        return Mamba2State(
            conv_state=torch.zeros(
                batch, self.conv_dim, self.cfg.d_conv, device=device, dtype=dtype
            ),
            ssm_state=torch.zeros(
                batch, self.nheads, self.headdim, self.cfg.d_state, device=device, dtype=ssm_dtype
            ),
        )

    def step(self, x_t: Tensor, state: State, *, token_t: Tensor | None = None) -> Tensor:
        """One token u_t (B, D) -> (B, D); updates both parts of ``state`` in place."""
        st = self.own_state(state, Mamba2State)
        parts = self._project(x_t[:, None])  # widths as forward, L = 1
        xBC = causal_conv1d_update(
            parts.xBC[:, 0],
            st.conv_state,
            self._conv_weight(),
            self.conv1d.bias,
            activation="silu",
        )  # (B, conv_dim)
        x, B, C = self._split_xbc(xBC)  # (B, H, P), (B, G, N), (B, G, N)
        D = self.D if not self.cfg.D_has_hdim else self.D.view(self.nheads, self.headdim)
        y = ssd_step(st.ssm_state, x, self._dt(parts.dt[:, 0]), self._A(), B, C, D)
        return self._finish(y[:, None], parts, None)[:, 0]

    @property
    def bounded_state(self) -> bool:
        """A recurrence: conv columns and SSM state of fixed size, whatever the length."""
        return True

    # -- bookkeeping ---------------------------------------------------------------------
    def param_hints(self) -> dict[str, ParamHint]:
        return ssd.ssm_param_hints("dt_bias")

    def flops_per_token(self, seq_len: int) -> float:
        """2·MACs of the matmuls and the conv, per token, as the chunked path computes them:
        projections, conv, and per chunk of Q = min(chunk_size, seq_len) (padded up):
        C·Bᵀ (G·Q·N), scores·x (H·Q·P), chunk states and state read-out (2·H·P·N)."""
        D = self.ctx.d_model
        proj = D * self.in_proj.out_features + self.d_inner * D
        conv = self.conv_dim * self.cfg.d_conv
        return 2.0 * (proj + conv + ssd.ssd_scan_macs(self.cfg, self.nheads, seq_len))
