"""Hydra: the bidirectional quasiseparable mixer of Hwang et al. (2024) (docs/math.md#hydra).

Hydra runs Mamba-2's SSD scan twice, once forward in time and once on the time-reversed
sequence, and adds a data-dependent diagonal. ``in_proj(u)`` is split
**[z | x | B_f | C_f | B_b | C_b | dt_f | dt_b]**; ``xBC = [x | B_f | C_f | B_b | C_b]``
goes through a **centred** depthwise conv ("same" padding d_conv//2, odd d_conv) and
silu; ``Δ_f = softplus(dt_f + dt_bias)``, ``Δ_b = softplus(dt_b + dt_bias)`` (dt_bias and
``A = −exp(A_log)`` are shared by both directions, ``A_log = 0`` at init so A = −1).
One SSD call (``D = None``) scans the batch-concatenation of the forward stream
``(x, B_f, C_f, Δ_f)`` and the flipped backward stream; both outputs are **shifted one
step later** (``y'[t] = y[t−1]``, ``y'[0] = 0``) *before* the backward half is flipped
back, so neither direction sees its own position. Then

    y = y_fw + y_bw + x ⊙ repeat_P(D + fc_D(x)),   out = out_proj(rms(y)·w ⊙ silu(z))

(gated RMSNorm with ``norm_before_gate=True`` and no groups). Per head, with
``a_k = exp(Δ_k A)``, the mixing matrix is quasiseparable:

* i > j: ``M[i, j] = (C_{f,i−1}·B_{f,j}) ∏_{k=j+1..i−1} a^f_k Δ_{f,j}``
* i < j: ``M[i, j] = (C_{b,i+1}·B_{b,j}) ∏_{k=i+1..j−1} a^b_k Δ_{b,j}``
* i = j: ``M[i, i] = D_h + (fc_D x_i)_h``

Parameter names are those of goombalab/hydra (``in_proj``, ``conv1d``, ``dt_bias``,
``A_log``, ``D``, ``fc_D``, ``norm.weight``, ``out_proj``).

Packed sequences (``seq_idx``): the conv and both scans stay inside documents and treat
padding as transparent (kernels/causal_conv1d.py, kernels/ssd.py); the one-step shift
does the same: position t reads the scan output of the previous non-padding position
of its own document in that direction, and 0 at a document's first position. The
backward stream is scanned with the flipped ``seq_idx``.

Matrix view: one term, v = post-conv x (B, L, H, P); ``mix`` = both shifted scans plus
the diagonal; ``finish`` = norm, gate, ``out_proj``. Capabilities: never causal, no
decode (the output at t reads the whole sequence), so no decode state. Kernels:
``centered_conv1d``, ``ssd_scan`` and ``gated_rms_norm`` (backends ``torch``,
``reference`` and, on the CPU, ``native``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from mixstack.blocks import ssd_heads as ssd
from mixstack.blocks.gated_norm import GatedRMSNorm
from mixstack.dsl.base import Capabilities, LayerConfig, LayerExample
from mixstack.dsl.context import LayerContext
from mixstack.dsl.registry import register
from mixstack.kernels.causal_conv1d import centered_conv1d
from mixstack.kernels.common import document_runs, zero_padding
from mixstack.kernels.ssd import ssd_scan
from mixstack.mixers.base import Mixer, MixTerms, ParamHint


class HydraConfig(ssd.SSDHeadsConfig, LayerConfig):
    """Hydra mixer; defaults are goombalab/hydra's ``Hydra`` (docs/math.md#hydra)."""

    type: Literal["hydra"] = "hydra"
    d_state: int = Field(64, ge=1, description="SSM state size N per head and direction")
    d_conv: int = Field(7, ge=1, description="width of the centred depthwise conv (odd)")
    expand: int = Field(2, ge=1, description="d_inner = expand · d_model")
    headdim: ssd.HeadDim
    ngroups: ssd.NGroups
    A_init: float = Field(
        1.0, gt=0, description="A = −A_init for every head at init (A_log = log A_init = 0)"
    )
    dt_min: ssd.DtMin
    dt_max: ssd.DtMax
    dt_init_floor: ssd.DtInitFloor
    dt_limit: ssd.DtLimit
    bias: bool = Field(False, description="biases on in_proj and out_proj")
    conv_bias: bool = Field(True, description="bias on the depthwise conv")
    chunk_size: int = Field(256, ge=1, description="SSD chunk length (speed/memory, not math)")

    def capabilities(self, ctx: LayerContext) -> Capabilities:
        return Capabilities(causal=False, decode=False)

    def check(self, ctx: LayerContext) -> ssd.CheckResult:
        d_inner = self.expand * ctx.d_model
        out: ssd.CheckResult = []
        out += self.check_heads(d_inner, "d_inner", f"expand·d_model = {self.expand}·{ctx.d_model}")
        if self.d_conv % 2 == 0:
            out.append(
                (
                    ("d_conv",),
                    f"d_conv ({self.d_conv}) must be odd: the centred conv pads d_conv//2 on "
                    f"each side and only an odd width keeps the length; allowed: "
                    f"{self.d_conv - 1} or {self.d_conv + 1}",
                )
            )
        return out

    @classmethod
    def examples(cls) -> list[LayerExample]:
        small = {"d_state": 8, "headdim": 8}
        return [
            LayerExample(cls(**small, chunk_size=16), arch="encoder", name="default-small"),
            LayerExample(
                cls(**small, ngroups=2, d_conv=3, chunk_size=5), arch="encoder", name="ngroups-2"
            ),
            LayerExample(
                cls(
                    **small,
                    expand=1,
                    ngroups=4,
                    bias=True,
                    conv_bias=False,
                    dt_limit=(0.01, 0.05),
                    chunk_size=8,
                ),
                arch="encoder",
                name="bias-dt-limit",
            ),
        ]


@dataclass
class HydraCoeffs:
    """Everything ``mix`` needs besides v, both directions stacked on the batch axis
    (rows [0, B) forward, [B, 2B) the flipped backward stream):

    dt (2B, L, H) Δ; A (H,); B/C (2B, L, G, N); seq_idx (2B, L) | None (the backward
    half flipped); prev (2B, L) int64: the position whose scan output the one-step shift
    reads, and keep (2B, L) bool: whether there is one (same document); diag (B, L, H):
    D + fc_D(x), 0 at padding."""

    dt: Tensor
    A: Tensor
    B: Tensor
    C: Tensor
    seq_idx: Tensor | None
    prev: Tensor
    keep: Tensor
    diag: Tensor


def shift_index(
    seq_idx: Tensor | None, bsz: int, length: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Where the one-step shift reads from: ``prev (B, L)`` int64 and ``keep (B, L)`` bool.

    Without ``seq_idx``: ``prev = t − 1`` and ``keep = t > 0`` (the shift of
    docs/math.md#hydra). With it: ``prev`` is the last non-padding position before t and ``keep``
    says it exists, t is not padding and both are in the same document, so padding stays
    transparent and nothing crosses a document boundary.
    """
    pos = torch.arange(length, device=device).expand(bsz, length)
    if seq_idx is None:
        prev = (pos - 1).clamp(min=0)
        return prev, pos > 0
    run, pad = document_runs(seq_idx)
    last_real = torch.where(pad, -1, pos).cummax(dim=1).values  # (B, L): last non-pad <= t
    prev = F.pad(last_real[:, :-1], (1, 0), value=-1)  # (B, L): last non-pad < t
    keep = ~pad & (prev >= 0) & (run.gather(1, prev.clamp(min=0)) == run)
    return prev.clamp(min=0), keep


def _shift(y: Tensor, prev: Tensor, keep: Tensor) -> Tensor:
    """``y (B', L, H, P)`` -> ``y'[t] = y[prev[t]]`` where ``keep[t]``, else 0."""
    index = prev[:, :, None, None].expand_as(y)
    return y.gather(1, index) * keep[:, :, None, None].to(y.dtype)


@register(HydraConfig)
class Hydra(Mixer):
    """Hydra mixer; equations, matrix and capabilities in the module docstring."""

    cfg: HydraConfig

    def __init__(self, cfg: HydraConfig, ctx: LayerContext):
        super().__init__(cfg, ctx)
        cfg = self.cfg  # resolved and checked by Mixer.__init__
        D, N, G = ctx.d_model, cfg.d_state, cfg.ngroups
        self.d_inner = cfg.expand * D
        self.headdim, self.nheads = cfg.headdim, self.d_inner // cfg.headdim
        self.conv_dim = self.d_inner + 4 * G * N  # [x | B_f | C_f | B_b | C_b]
        self.in_proj = nn.Linear(D, 2 * self.d_inner + 4 * G * N + 2 * self.nheads, bias=cfg.bias)
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            cfg.d_conv,
            groups=self.conv_dim,
            padding=cfg.d_conv // 2,
            bias=cfg.conv_bias,
        )  # weights only: the convolution runs in kernels/causal_conv1d (centered_conv1d)
        self.dt_bias = nn.Parameter(torch.empty(self.nheads))  # shared by both directions
        self.A_log = nn.Parameter(torch.empty(self.nheads))  # shared by both directions
        self.D = nn.Parameter(torch.empty(self.nheads))
        self.fc_D = nn.Linear(self.d_inner, self.nheads, bias=False)
        self.norm = GatedRMSNorm(self.d_inner, eps=1e-5, norm_before_gate=True)
        self.out_proj = nn.Linear(self.d_inner, D, bias=cfg.bias)
        self.reset_parameters()

    # -- initialisation (docs/math.md#hydra, #mamba-2) ---------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """PyTorch-default linears and conv (biases of linears zeroed, as mamba_ssm's LM
        init does), log-uniform Δ through an inverse softplus, A = −A_init (A_log = 0 by
        default), D = 1, norm weight = 1. Every random draw uses ``generator``."""
        linears = (self.in_proj, self.out_proj, self.fc_D)
        ssd.reset_ssd_layer(linears, self.conv1d, self.dt_bias, self.cfg, generator)
        self.A_log.fill_(math.log(self.cfg.A_init))
        self.D.fill_(1.0)
        self.norm.reset_parameters()

    # -- pieces of the forward pass --------------------------------------------------------
    def _split(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """u (B, L, D) -> z (B, L, d_inner), xBC (B, L, conv_dim), dt_f, dt_b (B, L, H)."""
        return self.in_proj(u).split(
            [self.d_inner, self.conv_dim, self.nheads, self.nheads], dim=-1
        )

    def _delta(self, dt: Tensor) -> Tensor:
        """Raw dt (..., H) -> Δ (..., H), fp32 (fp64)."""
        return ssd.softplus_delta(dt, self.dt_bias, self.cfg.dt_limit)

    def _coefficients(
        self, u: Tensor, seq_idx: Tensor | None
    ) -> tuple[Tensor, Tensor, HydraCoeffs]:
        """Projections, centred conv, Δ and the diagonal -> z, post-conv x (B, L, H, P),
        and the coefficients of both directions (see :class:`HydraCoeffs`)."""
        bsz, length, _ = u.shape
        G, N = self.cfg.ngroups, self.cfg.d_state
        z, xBC, dt_f, dt_b = self._split(u)
        xBC = centered_conv1d(
            xBC,
            self.conv1d.weight[:, 0, :],
            self.conv1d.bias,
            activation="silu",
            seq_idx=seq_idx,
            backends=self.backends,
        )  # (B, L, conv_dim), 0 at padding
        x, B_f, C_f, B_b, C_b = xBC.split([self.d_inner, G * N, G * N, G * N, G * N], dim=-1)
        both_seq = None if seq_idx is None else torch.cat([seq_idx, seq_idx.flip(1)])  # (2B, L)
        prev, keep = shift_index(both_seq, 2 * bsz, length, u.device)
        f = torch.promote_types(x.dtype, self.D.dtype)
        diag = self.fc_D(x).to(f) + self.D.to(f)  # (B, L, H): D + fc_D(x)
        diag = zero_padding(diag, seq_idx)
        coeffs = HydraCoeffs(
            dt=torch.cat([self._delta(dt_f), self._delta(dt_b).flip(1)]),  # (2B, L, H)
            A=ssd.negative_exp(self.A_log),
            B=torch.cat([B_f, B_b.flip(1)]).unflatten(-1, (G, N)),  # (2B, L, G, N)
            C=torch.cat([C_f, C_b.flip(1)]).unflatten(-1, (G, N)),  # (2B, L, G, N)
            seq_idx=both_seq,
            prev=prev,
            keep=keep,
            diag=diag,
        )
        return z, x.unflatten(-1, (self.nheads, self.headdim)), coeffs

    def _finish(self, y: Tensor, z: Tensor, seq_idx: Tensor | None) -> Tensor:
        """y (B, L, H, P) -> rms(y)·w ⊙ silu(z) -> out_proj (B, L, D); 0 at padding."""
        out = self.out_proj(self.norm(y.flatten(-2), z, self.backends))
        return zero_padding(out, seq_idx)

    # -- forward and matrix view -----------------------------------------------------------
    def mixing_terms(
        self, x: Tensor, *, input_ids: Tensor | None = None, seq_idx: Tensor | None = None
    ) -> MixTerms:
        z, xs, coeffs = self._coefficients(x, seq_idx)
        return MixTerms([(coeffs, xs)], lambda y: self._finish(y, z, seq_idx))

    def mix(self, coeffs: HydraCoeffs, v: Tensor) -> Tensor:
        """Both shifted scans plus the diagonal on v (B, L, H, P'), any P' -> (B, L, H, P');
        linear in v."""
        bsz = v.shape[0]
        both = torch.cat([v, v.flip(1)])  # (2B, L, H, P'): forward | time-reversed
        y = ssd_scan(
            both,
            coeffs.dt,
            coeffs.A,
            coeffs.B,
            coeffs.C,
            chunk_size=self.cfg.chunk_size,
            D=None,
            seq_idx=coeffs.seq_idx,
            backends=self.backends,
        )  # (2B, L, H, P')
        y = _shift(y, coeffs.prev, coeffs.keep)  # shift BEFORE un-flipping the backward half
        y_fw, y_bw = y[:bsz], y[bsz:].flip(1)
        diag = v * coeffs.diag[..., None]  # (B, L, H, P'), in the promoted dtype
        return y_fw + y_bw + diag.to(v.dtype)

    # -- no decoding: Mixer.init_state / step refuse with this reason -------------------------
    def no_decode_reason(self) -> str:
        return (
            "hydra is bidirectional (its output at t reads the whole sequence), so it has "
            "no decoding: no init_state / step / prefill state"
        )

    # -- bookkeeping -----------------------------------------------------------------------
    def param_hints(self) -> dict[str, ParamHint]:
        return ssd.ssm_param_hints("dt_bias")

    def flops_per_token(self, seq_len: int) -> float:
        """2·MACs per token of the matmuls and the conv as the chunked path computes them:
        in_proj, fc_D, out_proj, the conv, and per direction and chunk of
        Q = min(chunk_size, seq_len) (padded up): C·Bᵀ (G·Q·N), scores·x (H·Q·P), chunk
        states and state read-out (2·H·P·N)."""
        D, H = self.ctx.d_model, self.nheads
        proj = D * self.in_proj.out_features + self.d_inner * (D + H)
        conv = self.conv_dim * self.cfg.d_conv
        return 2.0 * (proj + conv + 2 * ssd.ssd_scan_macs(self.cfg, H, seq_len))
