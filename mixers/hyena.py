"""Hyena operator of configurable order (Poli et al. 2023; docs/math.md#hyena).

``in_proj(u)`` (d_model → (N+1)·d_model, bias) then a depthwise short convolution
(``short_filter``, ``short_filter_order`` taps, bias) over all ``(N+1)·d_model``
channels, split in that channel order into ``x_0, x_1, …, x_{N−1}, v``. Then, for
``o = 0 … N−2`` with gate ``x_{N−1−o}``::

    v ← x_{N−1−o} ⊙ v
    v ← h_o ∗ v + bias_o ⊙ v          (long convolution, FFT)

and ``y = out_proj(x_0 ⊙ v)``. The filters ``h_o`` come from one implicit filter network
(:mod:`mixstack.blocks.implicit_filter`) with ``d_model·(N−1)`` output channels in
safari's ``(v o)`` layout (channel ``c·(N−1) + o`` is filter o of model channel c, also
for ``bias``), evaluated on positional features built at ``max_seq_len`` and sliced to L.
Parameter names are safari's ``HyenaOperator`` (``in_proj``, ``short_filter``,
``filter_fn.*``, ``out_proj``).

Bidirectional (``causal: false``): the short convolution is centred (odd width) and the
filter network has a backward MLP (``filter_fn.implicit_filter_rev``), so each long
convolution is two-sided: ``y_t = Σ_{s≤t} h_{t−s} v_s + Σ_{s>t} h^rev_{s−t−1} v_s``.

Matrix view (H = d_model, P = 1, v = the post-conv v): the gates between convolutions
belong inside M (DESIGN §4), ``M = diag(x_0)·T_{N−2}·diag(x_1)·…·T_0·diag(x_{N−1})`` with
Toeplitz ``T_o[i, j] = h_o[i−j] + bias_o·δ_ij`` (order 2: ``diag(x_0)·T·diag(x_1)``).
``finish`` = ``out_proj`` (and zeros at padding).

Capabilities: causal iff ``causal`` (default: the arch is causal_lm); no decode (a cached
step would need the whole input history, O(L) per token; safari has none either);
length dependent: sequences longer than ``max_seq_len`` are refused (safari silently
truncated them). Kernels: ``causal_conv1d`` / ``centered_conv1d`` and ``fftconv``.
Not ported: multi-head Hyena, inner_factor, post-order FFN, dropout, filter
normalisation (its L1 norm over L would make a causal prefix depend on the total length).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from mixstack.blocks.causality import ArchCausalConfig
from mixstack.blocks.implicit_filter import ImplicitFilter, ImplicitFilterConfig
from mixstack.blocks.init import reset_depthwise_conv
from mixstack.dsl.base import Capabilities, LayerConfig, LayerExample
from mixstack.dsl.context import LayerContext
from mixstack.dsl.registry import register
from mixstack.kernels.causal_conv1d import causal_conv1d, centered_conv1d
from mixstack.kernels.common import zero_padding
from mixstack.kernels.fftconv import fftconv_flops, fftconv_heads
from mixstack.mixers.base import Mixer, MixTerms, ParamHint, init_linear

CheckResult = list[tuple[tuple[str | int, ...], str]]


class HyenaConfig(ArchCausalConfig, LayerConfig):
    """Hyena operator; defaults are safari's hyena layer config (docs/math.md#hyena)."""

    type: Literal["hyena"] = "hyena"
    order: int = Field(
        2, ge=2, description="N: N-1 gated long convolutions, then the outer gate x_0"
    )
    short_filter_order: int = Field(
        3, ge=1, description="taps of the depthwise short conv over the (N+1)·d_model projections"
    )
    causal: bool | None = Field(
        None,
        description="causal short conv and one-sided filters; false: centred short conv and "
        "two-sided filters; None -> true iff the arch is causal_lm",
    )
    filter: ImplicitFilterConfig = Field(
        default_factory=ImplicitFilterConfig, description="implicit filter network (filter_fn)"
    )

    def capabilities(self, ctx: LayerContext) -> Capabilities:
        return Capabilities(causal=self.is_causal(ctx), decode=False, length_dependent=True)

    def resolve(self, ctx: LayerContext) -> HyenaConfig:
        return self.model_copy(update={"causal": self.is_causal(ctx)})

    def check(self, ctx: LayerContext) -> CheckResult:
        if not self.is_causal(ctx) and self.short_filter_order % 2 == 0:
            return [
                (
                    ("short_filter_order",),
                    f"a bidirectional Hyena centres its short conv, which needs an odd width; "
                    f"got {self.short_filter_order} (use {self.short_filter_order + 1})",
                )
            ]
        return []

    @classmethod
    def examples(cls) -> list[LayerExample]:
        small = ImplicitFilterConfig(width=16)
        return [
            LayerExample(cls(filter=small), name="order2-causal"),
            LayerExample(cls(order=3, short_filter_order=4, filter=small), name="order3-causal"),
            LayerExample(cls(filter=small), arch="encoder", name="order2-bidirectional"),
            LayerExample(
                cls(
                    order=4,
                    filter=ImplicitFilterConfig(
                        width=8, emb_dim=5, inner_layers=1, w=10.0, modulation=None, bias=False
                    ),
                ),
                arch="encoder",
                name="order4-bidirectional-bands-no-modulation",
            ),
        ]


@dataclass
class HyenaCoeffs:
    """Gates ``x_{N−1}, …, x_1`` in application order and ``x_0`` (B, L, D); filters per
    step (D, L) (and backward ones when bidirectional); skips per step (D,) or None."""

    gates: list[Tensor]
    outer: Tensor
    filters: list[Tensor]
    filters_back: list[Tensor] | None
    skips: list[Tensor] | None
    seq_idx: Tensor | None


@register(HyenaConfig)
class Hyena(Mixer):
    """Hyena mixer; equations, capabilities and backends in the module docstring."""

    cfg: HyenaConfig

    def __init__(self, cfg: HyenaConfig, ctx: LayerContext):
        super().__init__(cfg, ctx)
        cfg = self.cfg  # resolved and checked by Mixer.__init__
        D, N, K = ctx.d_model, cfg.order, cfg.short_filter_order
        self.causal = bool(cfg.causal)
        width = (N + 1) * D
        self.in_proj = nn.Linear(D, width)
        self.short_filter = nn.Conv1d(width, width, K, groups=width, padding=K - 1)
        self.filter_fn = ImplicitFilter(
            D * (N - 1), ctx.max_seq_len, cfg.filter, bidirectional=not self.causal
        )
        self.out_proj = nn.Linear(D, D)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Projections N(0, init_std) with zero bias; short conv PyTorch-default uniform
        (bound 1/√K); filter network as in safari (blocks/implicit_filter.py)."""
        init_linear(self.in_proj, self.ctx.init_std, generator)
        init_linear(self.out_proj, self.ctx.init_std, generator)
        reset_depthwise_conv(self.short_filter, generator)
        self.filter_fn.reset_parameters(generator)

    def _short_conv(self, proj: Tensor, seq_idx: Tensor | None) -> Tensor:
        conv = causal_conv1d if self.causal else centered_conv1d
        weight = self.short_filter.weight[:, 0, :]  # (C, K)
        bias = self.short_filter.bias
        return conv(proj, weight, bias, seq_idx=seq_idx, backends=self.backends)

    def _filters(self, length: int) -> tuple[list[Tensor], list[Tensor] | None]:
        """Per step o: filter (D, L) from the ``(v o)`` channel layout; backward ones too."""
        D, steps = self.ctx.d_model, self.cfg.order - 1
        fwd = self.filter_fn.filter(length).view(D, steps, length)
        filters = [fwd[:, o] for o in range(steps)]
        if self.causal:
            return filters, None
        back = self.filter_fn.filter_rev(length).view(D, steps, length)
        return filters, [back[:, o] for o in range(steps)]

    def _coefficients(self, x: Tensor, seq_idx: Tensor | None) -> tuple[HyenaCoeffs, Tensor]:
        """x (B, L, D) -> coefficients and the value stream v (B, L, D)."""
        self.check_length(x.shape[1])
        D, N = self.ctx.d_model, self.cfg.order
        parts = self._short_conv(self.in_proj(x), seq_idx).split(D, dim=-1)
        *xs, v = parts  # x_0 … x_{N-1}, v; each (B, L, D)
        filters, back = self._filters(x.shape[1])
        skip = self.filter_fn.skip(filters[0].dtype)
        skips = None if skip is None else list(skip.view(D, N - 1).unbind(dim=1))
        gates = [xs[i] for i in range(N - 1, 0, -1)]  # x_{N-1} first
        return HyenaCoeffs(gates, xs[0], filters, back, skips, seq_idx), v

    def _finish(self, y: Tensor, seq_idx: Tensor | None) -> Tensor:
        out = self.out_proj(y[..., 0])  # (B, L, D)
        return zero_padding(out, seq_idx)

    def mixing_terms(
        self, x: Tensor, *, input_ids: Tensor | None = None, seq_idx: Tensor | None = None
    ) -> MixTerms:
        coeffs, v = self._coefficients(x, seq_idx)
        return MixTerms([(coeffs, v[..., None])], lambda y: self._finish(y, seq_idx))

    def mix(self, coeffs: HyenaCoeffs, v: Tensor) -> Tensor:
        """The gated convolution chain on v (B, L, D, P), any P; linear in v."""
        mode = "causal" if coeffs.filters_back is None else "two_sided"
        for o, gate in enumerate(coeffs.gates):
            v = gate[..., None] * v
            back = None if coeffs.filters_back is None else coeffs.filters_back[o]
            conv = fftconv_heads(
                self.backends,
                v,
                coeffs.filters[o],
                mode=mode,
                k_back=back,
                seq_idx=coeffs.seq_idx,
            )
            if coeffs.skips is not None:
                conv = conv + coeffs.skips[o].to(v.dtype)[:, None] * v
            v = conv
        return coeffs.outer[..., None] * v

    def param_hints(self) -> dict[str, ParamHint]:
        hints = {
            f"filter_fn.{name}": ParamHint(**kw)
            for name, kw in self.filter_fn.hint_kwargs().items()
        }
        hints["out_proj.weight"] = ParamHint(residual_out=True)
        return hints

    def flops_per_token(self, seq_len: int) -> float:
        """Projections, short conv, N−1 FFT convolutions with skips and gates, and the
        filter network evaluated once per sequence (amortised over its tokens)."""
        D, N, K = self.ctx.d_model, self.cfg.order, self.cfg.short_filter_order
        f = self.cfg.filter
        proj = 2.0 * (D * (N + 1) * D + D * D)
        short = 2.0 * (N + 1) * D * K
        convs = (N - 1) * (fftconv_flops(seq_len, D) / seq_len + 4.0 * D)
        mlp_macs = f.emb_dim * f.width + f.inner_layers * f.width**2 + f.width * D * (N - 1)
        mlps = 1 if self.causal else 2
        return proj + short + convs + 2.0 * D + 2.0 * mlps * mlp_macs
