"""S4D: the diagonal structured state space layer of Gu et al. (2022) (docs/math.md#s4d).

Per channel h (H = d_model independent single-input single-output SSMs), N/2 complex
modes ``A_n = −exp(log_A_real) + i·A_imag`` (the other N/2 are their conjugates, hence
the ``2·Re``), step ``Δ_h = exp(log_dt)``, ``B = 1`` and ``C`` learned. Discretised by
zero-order hold (``Ā = exp(ΔA)``, ``B̄ = (exp(ΔA) − 1)/A``) or bilinear
(``Ā = (1 + ΔA/2)/(1 − ΔA/2)``, ``B̄ = Δ/(1 − ΔA/2)``), the layer is a long convolution
with the Vandermonde kernel ``K_l = 2·Re Σ_n C_n B̄_n Ā_n^l`` plus the skip ``D``:
``y = K ∗ u + D u``, then activation (GELU), dropout and ``output_linear`` + GLU.
Inits: S4D-Lin ``A = −½ + iπn``, S4D-Inv ``A = −½ + i(N/π)(N/(2n+1) − 1)``, S4D-Real
``A = −(n+1)``. Parameter names follow ``state-spaces/s4`` ``models/s4/s4d.py``
(``kernel.log_dt``, ``kernel.C`` as the real view of complex C, ``kernel.log_A_real``,
``kernel.A_imag``, ``D``); ``output_linear`` is an ``nn.Linear(H, 2H)`` where s4d.py has
a ``Conv1d(H, 2H, 1)``: same numbers, its weight without the trailing kernel axis.

Bidirectional (S4's ``bidirectional=True``): a second kernel ``K¹`` (its own C, shared
Δ and A) runs backwards, ``y_t = Σ_{s<=t} K⁰_{t−s} u_s + Σ_{s>t} K¹_{s−t−1} u_s + D u_t``
(S4's layout: the backward kernel starts one step off the diagonal); non-causal, no
decode. ``kernel.C`` is then (2, H, N/2, 2).

Matrix view (one term, H = d_model channels, P = 1, v = u): Toeplitz
``M_h[i, j] = K⁰_{i−j}`` for i >= j (``K¹_{j−i−1}`` above the diagonal when
bidirectional), plus ``D_h`` on the diagonal; ``finish`` = activation, dropout,
``output_linear``, GLU.

Capabilities: causal and decode unless bidirectional. Decode state per sequence: H·N/2
complex numbers (complex64; complex128 for fp64), independent of length. Kernels:
``fftconv`` (backends ``torch``, ``reference``); decoding is the diagonal recurrence
``x_t = Ā x_{t−1} + u_t``, ``y_t = 2·Re(C B̄ · x_t) + D u_t`` (B̄ folded into C).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn

from mixstack.blocks.init import check_dt_range, normal_, reset_linear, uniform_
from mixstack.dsl.base import Capabilities, LayerConfig, LayerExample
from mixstack.dsl.context import LayerContext
from mixstack.dsl.registry import register
from mixstack.kernels.common import document_runs, zero_padding
from mixstack.kernels.fftconv import fftconv_flops, fftconv_heads
from mixstack.mixers.base import Mixer, MixTerms, ParamHint, State

CheckResult = list[tuple[tuple[str | int, ...], str]]
Init = Literal["lin", "inv", "real"]

ACTIVATIONS = {"gelu": F.gelu, "silu": F.silu, "identity": lambda t: t}


class S4DConfig(LayerConfig):
    """S4D mixer; defaults are ``state-spaces/s4`` ``models/s4/s4d.py`` (docs/math.md#s4d)."""

    type: Literal["s4d"] = "s4d"
    d_state: int = Field(64, ge=2, description="N: state size per channel (N/2 complex modes)")
    init: Init = Field("lin", description="A at init: S4D-Lin, S4D-Inv or S4D-Real")
    discretization: Literal["zoh", "bilinear"] = Field(
        "zoh", description="zero-order hold or bilinear (Tustin) discretisation"
    )
    dt_min: float = Field(1e-3, gt=0, description="Δ at init is log-uniform in [dt_min, dt_max]")
    dt_max: float = Field(0.1, gt=0, description="upper end of the Δ init range")
    bidirectional: bool = Field(False, description="add a backward kernel (non-causal, no decode)")
    activation: Literal["gelu", "silu", "identity"] = Field(
        "gelu", description="applied to K ∗ u + D u before the output projection"
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout after the activation")
    ssm_lr_scale: float | None = Field(
        None,
        gt=0,
        description="learning-rate multiplier for log_dt, log_A_real, A_imag (S4 trains "
        "them at lr 1e-3: e.g. 1e-3 / model lr); null = the model's lr",
    )

    @field_validator("d_state")
    @classmethod
    def _check_even(cls, v: int) -> int:
        if v % 2:
            raise ValueError(
                f"d_state must be even (N/2 complex conjugate pairs), got {v}; "
                f"try {v - 1} or {v + 1}"
            )
        return v

    def capabilities(self, ctx: LayerContext) -> Capabilities:
        return Capabilities(causal=not self.bidirectional, decode=not self.bidirectional)

    def check(self, ctx: LayerContext) -> CheckResult:
        return check_dt_range(self.dt_min, self.dt_max)

    @classmethod
    def examples(cls) -> list[LayerExample]:
        return [
            LayerExample(cls(d_state=8), d_model=8, name="lin-zoh"),
            LayerExample(
                cls(d_state=6, init="inv", discretization="bilinear", activation="silu"),
                d_model=8,
                name="inv-bilinear",
            ),
            LayerExample(cls(d_state=4, init="real", ssm_lr_scale=0.1), d_model=8, name="real"),
            LayerExample(
                cls(d_state=8, bidirectional=True), d_model=8, arch="encoder", name="bidirectional"
            ),
        ]


def init_A(init: Init, d_state: int, channels: int) -> tuple[Tensor, Tensor]:
    """(log_A_real, A_imag), both (H, N/2) fp64, for A = −exp(log_A_real) + i·A_imag.

    S4D-Lin: re ½, im πn. S4D-Inv: re ½, im (N/π)(N/(2n+1) − 1) with N the full state
    size. S4D-Real: re n + 1, im 0. n = 0..N/2−1 (docs/math.md#s4d; ``kernels/dplr.py``).
    """
    n = torch.arange(d_state // 2, dtype=torch.float64)
    if init == "lin":
        re, im = torch.full_like(n, 0.5), math.pi * n
    elif init == "inv":
        re = torch.full_like(n, 0.5)
        im = d_state / math.pi * (d_state / (2 * n + 1) - 1)
    else:
        re, im = n + 1, torch.zeros_like(n)
    return torch.log(re).expand(channels, -1), im.expand(channels, -1)


class S4DKernel(nn.Module):
    """The diagonal SSM's parameters and its discretisation.

    log_dt (H,), C (H, N/2, 2) or (2, H, N/2, 2) when bidirectional (real view of complex
    C, one per direction), log_A_real (H, N/2), A_imag (H, N/2).
    """

    def __init__(self, channels: int, d_state: int, directions: int, discretization: str):
        super().__init__()
        c_shape = (channels, d_state // 2, 2)
        self.directions, self.discretization = directions, discretization
        self.log_dt = nn.Parameter(torch.empty(channels))
        self.C = nn.Parameter(torch.empty((directions, *c_shape) if directions > 1 else c_shape))
        self.log_A_real = nn.Parameter(torch.empty(channels, d_state // 2))
        self.A_imag = nn.Parameter(torch.empty(channels, d_state // 2))

    def modes(self) -> tuple[Tensor, Tensor]:
        """``(log Ā (H, N/2), C̄ = C·B̄ (directions, H, N/2))``, complex64 (complex128 for
        fp64 parameters): the step ``x ← Ā x + u``, read out as ``2·Re(C̄·x)``."""
        f = torch.promote_types(self.log_dt.dtype, torch.float32)
        dt = torch.exp(self.log_dt.to(f))[:, None]  # (H, 1)
        A = torch.complex(-torch.exp(self.log_A_real.to(f)), self.A_imag.to(f))  # (H, N/2)
        C = torch.view_as_complex(self.C.to(f).contiguous()).reshape(-1, *A.shape)
        dtA = dt * A
        if self.discretization == "zoh":
            log_abar, bbar = dtA, torch.expm1(dtA) / A
        else:
            half = 1 - dtA / 2
            log_abar, bbar = torch.log((1 + dtA / 2) / half), dt / half
        return log_abar, C * bbar

    def forward(self, length: int) -> Tensor:
        """K (directions, H, L): ``K_l = 2·Re Σ_n C̄_n Ā_n^l``, real, fp32 (fp64)."""
        log_abar, cbar = self.modes()
        steps = torch.arange(length, device=log_abar.device, dtype=log_abar.real.dtype)
        vandermonde = torch.exp(log_abar[..., None] * steps)  # (H, N/2, L)
        return 2 * torch.einsum("dhn,hnl->dhl", cbar, vandermonde).real


@dataclass
class S4DState(State):
    """Decode state: ssm_state (B, H, N/2) complex, ``x_t = Σ_{s<=t} Ā^{t−s} u_s``."""

    ssm_state: Tensor


@dataclass
class S4DCoeffs:
    """Everything ``mix`` needs besides v: kernels K (directions, H, L), D (H,), ids."""

    K: Tensor
    D: Tensor
    seq_idx: Tensor | None


@register(S4DConfig)
class S4D(Mixer):
    """S4D mixer; equations, state size and backends in the module docstring."""

    cfg: S4DConfig

    def __init__(self, cfg: S4DConfig, ctx: LayerContext):
        super().__init__(cfg, ctx)
        cfg = self.cfg  # resolved and checked by Mixer.__init__
        H = ctx.d_model
        directions = 2 if cfg.bidirectional else 1
        self.kernel = S4DKernel(H, cfg.d_state, directions, cfg.discretization)
        self.D = nn.Parameter(torch.empty(H))
        self.dropout = nn.Dropout(cfg.dropout)
        self.output_linear = nn.Linear(H, 2 * H)
        self.reset_parameters()

    # -- initialisation (docs/math.md#s4d) ----------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """As s4d.py: log Δ ~ U(ln dt_min, ln dt_max), C ~ complex N(0, 1), A by ``init``,
        D ~ N(0, 1); ``output_linear`` PyTorch's default (kaiming-uniform weight, uniform
        bias). Every random draw uses ``generator``."""
        cfg, kernel = self.cfg, self.kernel
        log_lo, log_hi = math.log(cfg.dt_min), math.log(cfg.dt_max)
        uniform_(kernel.log_dt, (log_hi - log_lo) / 2, generator)
        kernel.log_dt.add_((log_hi + log_lo) / 2)  # U(ln dt_min, ln dt_max)
        normal_(kernel.C, math.sqrt(0.5), generator)  # real and imaginary parts: var ½ each
        log_re, im = init_A(cfg.init, cfg.d_state, self.ctx.d_model)
        kernel.log_A_real.copy_(log_re)
        kernel.A_imag.copy_(im)
        normal_(self.D, 1.0, generator)
        reset_linear(self.output_linear, generator)

    # -- pieces shared by forward, the matrix view and decoding -------------------------
    def _finish(self, y: Tensor, seq_idx: Tensor | None) -> Tensor:
        """y (B, L, H) -> activation, dropout, output_linear, GLU -> (B, L, H); 0 at padding."""
        y = self.dropout(ACTIVATIONS[self.cfg.activation](y))
        out = F.glu(self.output_linear(y.to(self.output_linear.weight.dtype)), dim=-1)
        return zero_padding(out, seq_idx)

    def _coefficients(self, length: int, seq_idx: Tensor | None) -> S4DCoeffs:
        return S4DCoeffs(self.kernel(length), self.D, seq_idx)

    # -- forward and matrix view -------------------------------------------------------
    def forward_sequence(
        self, x: Tensor, *, input_ids: Tensor | None, seq_idx: Tensor | None
    ) -> Tensor:
        """u (B, L, H) -> (B, L, H) by convolution."""
        return self._convolve(x, seq_idx, None)

    def prefill(
        self, x: Tensor, state: State, *, input_ids: Tensor | None, seq_idx: Tensor | None
    ) -> Tensor:
        """Continues from ``state`` and stores the final recurrent state."""
        return self._convolve(x, seq_idx, self.own_state(state, S4DState))

    def _convolve(self, x: Tensor, seq_idx: Tensor | None, state: S4DState | None) -> Tensor:
        """The convolution of u (B, L, H), plus the carried state's contribution."""
        coeffs = self._coefficients(x.shape[1], seq_idx)
        u = x.to(coeffs.K.dtype)
        y = self.mix(coeffs, u[..., None])[..., 0]  # (B, L, H)
        if state is not None:
            y = y + self._prefill(u, seq_idx, state)
        return self._finish(y, seq_idx)

    def mixing_terms(
        self, x: Tensor, *, input_ids: Tensor | None = None, seq_idx: Tensor | None = None
    ) -> MixTerms:
        coeffs = self._coefficients(x.shape[1], seq_idx)
        v = x.to(coeffs.K.dtype)[..., None]  # (B, L, H, 1)
        return MixTerms([(coeffs, v)], lambda y: self._finish(y[..., 0], seq_idx))

    def mix(self, coeffs: S4DCoeffs, v: Tensor) -> Tensor:
        """``K ∗ v + D v`` per channel on v (B, L, H, P), any P -> (B, L, H, P); linear in v."""
        v = v.to(coeffs.K.dtype)
        if self.cfg.bidirectional:
            conv = fftconv_heads(
                self.backends,
                v,
                coeffs.K[0],
                mode="two_sided",
                k_back=coeffs.K[1],
                seq_idx=coeffs.seq_idx,
            )
        else:
            conv = fftconv_heads(self.backends, v, coeffs.K[0], seq_idx=coeffs.seq_idx)
        return conv + v * coeffs.D.to(v.dtype)[:, None]

    # -- decoding ------------------------------------------------------------------------
    def _prefill(self, u: Tensor, seq_idx: Tensor | None, state: S4DState) -> Tensor:
        """What the entering state adds to y (B, L, H); stores the final state.

        Positions are counted over the row's non-padding tokens (padding is inert, as in
        every kernel): with r_t the rank of token t, the entering state x₀ reaches token
        t of the row's first document as ``2·Re(C̄ Ā^{r_t+1} x₀)``, and the final state is
        ``Σ_{s in last document} Ā^{r_e − r_s} u_s`` (``+ Ā^{n} x₀`` when that document is
        the first, n = tokens in the row).
        """
        bsz, length, _ = u.shape
        log_abar, cbar = self.kernel.modes()  # (H, N/2), (1, H, N/2)
        # a copy: autograd saves what it multiplies, and the state is overwritten below
        x0 = state.ssm_state.clone().to(cbar.dtype)  # (B, H, N/2)
        run, pad = _runs(seq_idx, bsz, length, u.device)
        rank = (~pad).long().cumsum(dim=1) - 1  # (B, L)
        count = rank[:, -1] + 1  # tokens per row (B,)
        steps = torch.arange(length + 1, device=u.device, dtype=log_abar.real.dtype)
        powers = torch.exp(log_abar[..., None] * steps)  # (H, N/2, L+1): Ā^0 .. Ā^L
        weighted = cbar[0] * x0  # (B, H, N/2); two-operand einsum: a bmm over h, no (B,H,N,L)
        by_rank = 2 * torch.einsum("bhn,hnl->blh", weighted, powers[..., 1:]).real
        first = (run == 0) & ~pad
        carried = by_rank.gather(1, rank.clamp(min=0)[..., None].expand_as(u)) * first[..., None]
        last = (run == run[:, -1:]) & ~pad  # tokens of the row's last document
        slot = torch.where(last, length - count[:, None] + rank, length)  # Ā^{r_e−r_s} at slot
        aligned = u.new_zeros(bsz, length + 1, u.shape[2]).scatter(
            1, slot[..., None].expand_as(u), u.masked_fill(~last[..., None], 0.0)
        )[:, :length]  # (B, L, H): last document's tokens, right-aligned
        final = torch.einsum("blh,hnl->bhn", aligned.to(cbar.dtype), powers[..., :length].flip(-1))
        from_x0 = torch.exp(log_abar * count[:, None, None]) * x0  # (B, H, N/2)
        state.ssm_state.copy_(final + from_x0 * (run[:, -1] == 0)[:, None, None])
        return carried

    def init_state(
        self, batch: int, max_len: int, *, device: torch.device | str | None, dtype: torch.dtype
    ) -> S4DState:
        """Zero state; its size does not depend on ``max_len``."""
        self.require_decode()
        cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        return S4DState(
            ssm_state=torch.zeros(
                batch, self.ctx.d_model, self.cfg.d_state // 2, device=device, dtype=cdtype
            )
        )

    def step(self, x_t: Tensor, state: State, *, token_t: Tensor | None = None) -> Tensor:
        """One token u_t (B, H) -> (B, H); updates ``state`` in place."""
        st = self.own_state(state, S4DState)
        log_abar, cbar = self.kernel.modes()
        f = log_abar.real.dtype
        u = x_t.to(f)
        prev = st.ssm_state.to(cbar.dtype)  # (B, H, N/2)
        if torch.is_grad_enabled():  # autograd saves it and it is overwritten below
            prev = prev.clone()
        x = torch.exp(log_abar) * prev + u[..., None]  # (B, H, N/2)
        st.ssm_state.copy_(x)
        y = 2 * (cbar[0] * x).sum(dim=-1).real + self.D.to(f) * u
        return self._finish(y[:, None], None)[:, 0]

    def no_decode_reason(self) -> str:
        return "with bidirectional: true its backward kernel reads future tokens"

    @property
    def bounded_state(self) -> bool:
        """A recurrence: conv columns and SSM state of fixed size, whatever the length."""
        return True

    # -- bookkeeping ---------------------------------------------------------------------
    def param_hints(self) -> dict[str, ParamHint]:
        ssm = ParamHint(no_weight_decay=True, lr_scale=self.cfg.ssm_lr_scale or 1.0, keep_fp32=True)
        return {
            "kernel.log_dt": ssm,
            "kernel.log_A_real": ssm,
            "kernel.A_imag": ssm,
            "kernel.C": ParamHint(keep_fp32=True),  # enters a complex fp32 computation
            "D": ParamHint(keep_fp32=True),
        }

    def flops_per_token(self, seq_len: int) -> float:
        """Per token: the output projection (2·H·2H), the FFT convolution(s) and the
        kernel's Vandermonde product (H·N/2 complex MACs of 8 FLOPs per position and
        direction)."""
        H, half = self.ctx.d_model, self.cfg.d_state // 2
        directions = 2 if self.cfg.bidirectional else 1
        conv = fftconv_flops(seq_len, H) * directions / seq_len
        return 2.0 * H * 2 * H + conv + 8.0 * directions * H * half


def _runs(
    seq_idx: Tensor | None, bsz: int, length: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """(run (B, L), pad (B, L)) from seq_idx; one document and no padding without it."""
    if seq_idx is not None:
        return document_runs(seq_idx)
    zeros = torch.zeros(bsz, length, dtype=torch.long, device=device)
    return zeros, zeros.bool()
