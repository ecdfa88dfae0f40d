"""EMA: an exponential-moving-average mixer, the worked example of docs/adding-a-mixer.md.

Use it without installing anything: ``mixstack --plugin examples/plugins/ema.py train
my.yaml`` with a symbol bound to ``{type: ema}``.

Per channel c (H = channels = d_model, P = 1) the layer keeps a running average

    h_t = α_c·h_{t−1} + (1 − α_c)·u_t,        y_t = h_t,

with ``u`` the input (after the optional ``in_proj``) and a learnable decay
``α_c = σ(decay_logit_c) ∈ (0, 1)``: the sigmoid keeps α inside the interval for any
parameter value, and ``log α = −softplus(−decay_logit)`` and ``1 − α = σ(−decay_logit)``
are both computed without cancellation. A new document (``seq_idx``) starts from
``h = 0``; padding neither decays nor feeds the average and outputs 0.

Matrix view (one term, v = u): ``M_c[i, j] = (1 − α_c)·α_c^{i−j}`` for j <= i in the
same document, 0 otherwise: a lower-triangular Toeplitz matrix per channel.

The recurrence is the SSD scan of Mamba-2 with one state per channel (N = P = 1),
``Δ = 1``, ``A = log α`` and ``B = C = 1``, so the shared ``ssd_scan`` kernel gives the
chunked fast path, document resets and the state hand-over of a prefill for free.

Capabilities: causal, decode. Decode state per sequence: d_model numbers (fp32 at
least), independent of the length. Kernels: ``ssd_scan`` (backends ``torch``,
``reference``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from mixstack.blocks.init import uniform_
from mixstack.dsl.base import Capabilities, LayerConfig, LayerExample
from mixstack.dsl.context import LayerContext
from mixstack.dsl.registry import register
from mixstack.kernels.common import zero_padding
from mixstack.kernels.ssd import ssd_scan
from mixstack.mixers.base import Mixer, MixTerms, ParamHint, State, continue_scan


class EMAConfig(LayerConfig):
    """Exponential moving average per channel, with a learnable decay α ∈ (0, 1)."""

    type: Literal["ema"] = "ema"
    alpha_min: float = Field(
        0.5, gt=0, lt=1, description="smallest decay α at init (shortest memory, ~2 tokens)"
    )
    alpha_max: float = Field(
        0.99, gt=0, lt=1, description="largest decay α at init (longest memory, ~100 tokens)"
    )
    projections: bool = Field(
        False,
        description="wrap the average in in_proj and out_proj (D → D, with bias), so the "
        "layer learns which directions to average; without them it averages x itself",
    )
    chunk_size: int = Field(64, ge=1, description="steps per chunk of the ssd_scan kernel")

    def capabilities(self, ctx: LayerContext) -> Capabilities:
        return Capabilities(causal=True, decode=True)

    def check(self, ctx: LayerContext) -> list[tuple[tuple[str | int, ...], str]]:
        if self.alpha_min > self.alpha_max:
            message = (
                f"alpha_max ({self.alpha_max}) is below alpha_min ({self.alpha_min}); "
                "α starts in [alpha_min, alpha_max]"
            )
            return [(("alpha_max",), message)]
        return []

    @classmethod
    def examples(cls) -> list[LayerExample]:
        return [
            LayerExample(cls(), d_model=8, name="plain"),
            LayerExample(
                cls(alpha_min=0.2, alpha_max=0.9, projections=True, chunk_size=4),
                d_model=8,
                name="projections",
            ),
        ]


@dataclass
class EMAState(State):
    """Decode state: h (B, H, 1, 1), the running average, fp32 at least; laid out as the
    scan kernel's state (B, H, P, N) with P = N = 1, so a prefill hands it over as is."""

    h: Tensor


@dataclass
class EMACoeffs:
    """What ``mix`` needs besides v: log α (H,), 1 − α (H,), document ids (B, L) | None."""

    log_alpha: Tensor
    one_minus_alpha: Tensor
    seq_idx: Tensor | None


@register(EMAConfig)
class EMA(Mixer):
    """Exponential moving average per channel; equations in the module docstring."""

    cfg: EMAConfig

    def __init__(self, cfg: EMAConfig, ctx: LayerContext):
        super().__init__(cfg, ctx)
        width = ctx.d_model
        self.decay_logit = nn.Parameter(torch.empty(width))  # α = σ(decay_logit)
        self.in_proj = nn.Linear(width, width) if cfg.projections else None
        self.out_proj = nn.Linear(width, width) if cfg.projections else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Projections as every mixer's linears (N(0, init_std), zero bias); ``1 − α``
        log-uniform in [1 − alpha_max, 1 − alpha_min], so the channels' memories
        (about 1/(1 − α) tokens) spread evenly on a log scale."""
        super().reset_parameters(generator)
        low, high = math.log1p(-self.cfg.alpha_max), math.log1p(-self.cfg.alpha_min)
        logit = self.decay_logit
        uniform_(logit, 0.5, generator)  # U(−½, ½)
        log_one_minus = logit.add_(0.5).mul_(high - low).add_(low)  # log(1 − α), in place
        logit.copy_(torch.log(-torch.expm1(log_one_minus)) - log_one_minus)  # log(α/(1 − α))

    # -- pieces shared by forward, the matrix view and decoding -------------------------
    def _coefficients(self, seq_idx: Tensor | None) -> EMACoeffs:
        """log α and 1 − α in fp32 at least (the decay compounds over many steps)."""
        w = self.decay_logit.to(torch.promote_types(self.decay_logit.dtype, torch.float32))
        return EMACoeffs(-F.softplus(-w), torch.sigmoid(-w), seq_idx)

    def _project_in(self, x: Tensor) -> Tensor:
        return x if self.in_proj is None else self.in_proj(x)

    def _finish(self, y: Tensor, seq_idx: Tensor | None) -> Tensor:
        """y (B, L, H) -> out_proj -> (B, L, D), exactly 0 at padding."""
        out = y if self.out_proj is None else self.out_proj(y.to(self.out_proj.weight.dtype))
        return zero_padding(out, seq_idx)

    def _scan(
        self, v: Tensor, coeffs: EMACoeffs, initial: Tensor | None, final: bool
    ) -> Tensor | tuple[Tensor, Tensor]:
        """The recurrence on v (B, L, H, P) as an SSD scan with N = 1 -> (B, L, H, P)
        [, final state (B, H, P, 1)]."""
        bsz, length, heads, _ = v.shape
        ones = v.new_ones(bsz, length, 1, 1)  # B = C = 1 (one group, N = 1)
        return ssd_scan(
            v * coeffs.one_minus_alpha.to(v.dtype)[:, None],  # (1 − α)·v
            v.new_ones(bsz, length, heads),  # Δ = 1, so exp(Δ·A) = α
            coeffs.log_alpha,
            ones,
            ones,
            chunk_size=self.cfg.chunk_size,
            seq_idx=coeffs.seq_idx,
            initial_state=initial,
            return_final_state=final,
            backends=self.backends,
        )

    # -- forward and matrix view -------------------------------------------------------
    # The base class's forward dispatches: no state -> forward_sequence, a state ->
    # prefill (which continues from the state and fills it).
    def forward_sequence(
        self, x: Tensor, *, input_ids: Tensor | None, seq_idx: Tensor | None
    ) -> Tensor:
        """x (B, L, D) -> (B, L, D): the recurrence from h = 0, through the scan kernel."""
        v = self._project_in(x)[..., None]  # (B, L, H, 1)
        y = self._scan(v, self._coefficients(seq_idx), None, False)
        return self._finish(y[..., 0], seq_idx)

    def prefill(
        self, x: Tensor, state: State, *, input_ids: Tensor | None, seq_idx: Tensor | None
    ) -> Tensor:
        """Like forward_sequence, continuing from ``state`` and storing the average after
        the last position in it."""
        st = self.own_state(state, EMAState)
        coeffs = self._coefficients(seq_idx)
        v = self._project_in(x)[..., None]  # (B, L, H, 1)
        y = continue_scan(st.h, lambda initial, final: self._scan(v, coeffs, initial, final))
        return self._finish(y[..., 0], seq_idx)

    def mixing_terms(
        self, x: Tensor, *, input_ids: Tensor | None = None, seq_idx: Tensor | None = None
    ) -> MixTerms:
        v = self._project_in(x)[..., None]  # (B, L, H, 1)
        coeffs = self._coefficients(seq_idx)
        return MixTerms([(coeffs, v)], lambda y: self._finish(y[..., 0], seq_idx))

    def mix(self, coeffs: EMACoeffs, v: Tensor) -> Tensor:
        """The average of v (B, L, H, P), any P -> (B, L, H, P); linear in v."""
        out = self._scan(v, coeffs, None, False)
        assert isinstance(out, Tensor)  # no final state was asked for
        return out

    # -- decoding ------------------------------------------------------------------------
    def init_state(
        self, batch: int, max_len: int, *, device: torch.device | str | None, dtype: torch.dtype
    ) -> EMAState:
        """h = 0; its size does not depend on ``max_len``."""
        h_dtype = torch.promote_types(dtype, torch.float32)
        h = torch.zeros(batch, self.ctx.d_model, 1, 1, device=device, dtype=h_dtype)
        return EMAState(h=h)

    def step(self, x_t: Tensor, state: State, *, token_t: Tensor | None = None) -> Tensor:
        """One token x_t (B, D) -> (B, D); updates ``state`` in place."""
        st = self.own_state(state, EMAState)
        coeffs = self._coefficients(None)
        u = self._project_in(x_t).to(st.h.dtype)  # (B, H)
        # read a copy: autograd saves the old average, and it is overwritten below
        h = torch.exp(coeffs.log_alpha) * st.h[..., 0, 0].clone() + coeffs.one_minus_alpha * u
        st.h.copy_(h[..., None, None])
        return self._finish(h.to(x_t.dtype)[:, None], None)[:, 0]

    @property
    def bounded_state(self) -> bool:
        """One average per head whatever the length: decoding may run past max_seq_len."""
        return True

    # -- bookkeeping ---------------------------------------------------------------------
    def param_hints(self) -> dict[str, ParamHint]:
        """The decay is an SSM-like scalar per channel: no weight decay (it would pull α
        towards ½), and fp32 under bf16 (α^t over many steps needs the precision)."""
        hints = {"decay_logit": ParamHint(no_weight_decay=True, keep_fp32=True)}
        if self.out_proj is not None:
            hints["out_proj.weight"] = ParamHint(residual_out=True)
        return hints

    def flops_per_token(self, seq_len: int) -> float:
        """Per token: one multiply-add and one scale per channel, plus the projections."""
        width = self.ctx.d_model
        projections = 2 * (2.0 * width * width) if self.cfg.projections else 0.0
        return 3.0 * width + projections
