"""Long convolution with an explicit, regularised kernel (docs/math.md#long-convolution).

Layer (safari ``LongConv``): ``C = channels`` kernels per model channel,
``y_{c,h} = k_{c,h} ∗ u_h + D_{c,h} · u_h`` (FFT convolution, kernel ``kernel_len`` taps,
``max_seq_len`` by default), an activation (GELU), then
``output_linear: Linear(C·d_model → 2·d_model)`` and a GLU over its two halves.
Bidirectional (``causal: false``): a second set of C kernels for the past-looking lags,
``y_t = Σ_{s≤t} k⁰_{t−s} u_s + Σ_{s>t} k¹_{s−t−1} u_s`` (safari's flipped 2L layout).

Kernel parameterisations (``kernel.type``):

* ``squash`` (Fu et al. 2023, "Simple Hardware-Efficient Long Convolutions"): an explicit
  ``kernel.kernel (sides·C, d_model, K)`` initialised ``N(0, init_scale²)``; at every
  forward optionally *smoothed* (average pooling of odd width ``smooth`` along the taps,
  stride 1, zero padding, same length) then *squashed* (soft threshold
  ``k ← sign(k)·relu(|k| − λ)``). λ must be small against the spread of the smoothed
  kernel at init (``init_scale/√smooth``), or the kernel and its gradient are
  identically zero (docs/math.md#pitfalls; checked at load: λ <= 3·init_scale/√smooth).
* ``sgconv`` (Li et al. 2022, "What Makes Convolutional Models Great on Long Sequence
  Modeling?"; reference ``ctlllll/SGConv`` ``GConv``): ``S = ⌈log2(K/d)⌉ + 1`` sub-kernel
  parameters ``w_i ∈ R^d`` (``kernel.weight (S, sides·C, d_model, d)``, N(0, 1); d = 64
  by default, the reference's ``kernel_dim``), the kernel
  ``concat_i α^i · Up_{2^{max(i−1,0)}}(w_i)`` (``d·2^(S−1)`` taps) divided by its L2 norm
  per row measured at initialisation (the buffer ``kernel.kernel_norm``, a constant
  afterwards), then cut to K. ``kernel.normalize`` says which norm: ``concat`` (default,
  the reference) takes it over the full concatenation before the cut; ``truncated``
  (schema <= 2 behaviour, kept for migrated files) over the K taps after the cut — the
  two differ per row by up to a few percent when K/d is not a power of two.
  ``Up`` is ``F.interpolate`` (``linear`` with ``align_corners=False``, or ``nearest``),
  as in the reference.

Matrix view: one term with ``H = C·d_model`` heads, ``P = 1``, the value stream is the
input repeated per channel (head ``c·d_model + h`` reads ``u_h``, safari's ``(c h)``
order) and ``M_{c,h}[i, j] = k_{c,h}[i−j]`` (i ≥ j; ``k¹_{c,h}[j−i−1]`` above the
diagonal when bidirectional) ``+ D_{c,h} δ_ij``. ``finish`` = activation, output_linear,
GLU, zeros at padding.

Output projection (``output_glu``): ``Linear(C·d_model → 2·d_model)`` and a GLU (safari
``LongConv``; the reference SGConv's ``postact='glu'``), or a plain
``Linear(C·d_model → d_model)`` (the reference SGConv's default, ``postact=None``).
Default: GLU for ``squash`` kernels, plain for ``sgconv`` kernels, each as in its source.

Capabilities: causal iff ``causal`` (default: the arch is causal_lm); no decode; length
dependent (the kernel spans ``max_seq_len`` by default and longer calls are refused).
Kernel: ``fftconv`` (backends ``torch``, ``reference``). Not implemented from safari:
kernel dropout defaults to 0 (safari 0.2) so the layer is deterministic unless asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from mixstack.blocks.causality import ArchCausalConfig
from mixstack.blocks.init import normal_
from mixstack.dsl.base import Capabilities, LayerConfig, LayerExample
from mixstack.dsl.context import LayerContext
from mixstack.dsl.registry import register
from mixstack.kernels.common import zero_padding
from mixstack.kernels.fftconv import fftconv_flops, fftconv_heads
from mixstack.mixers.base import Mixer, MixTerms, ParamHint, init_linear

CheckResult = list[tuple[tuple[str | int, ...], str]]


class SquashKernelConfig(BaseModel):
    """Explicit kernel, smoothed then soft-thresholded at every forward (Fu et al. 2023)."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False
    )

    type: Literal["squash"] = "squash"
    lam: float = Field(
        0.003, ge=0, description="soft threshold λ: k ← sign(k)·relu(|k| − λ); 0 = no squash"
    )
    smooth: int = Field(
        1, ge=1, description="odd width of the average pooling along the taps; 1 = no smoothing"
    )
    init_scale: float = Field(0.002, gt=0, description="kernel entries start as N(0, scale²)")

    @field_validator("smooth")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError(f"smooth must be odd (a centred window keeps the length), got {v}")
        return v


class SGConvKernelConfig(BaseModel):
    """Multi-scale kernel of geometrically growing, decaying sub-kernels (Li et al. 2022)."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False
    )

    type: Literal["sgconv"] = "sgconv"
    sub_kernel_len: int = Field(
        64, ge=1, description="d: parameters per sub-kernel (the reference's kernel_dim 64)"
    )
    decay: float = Field(0.5, gt=0, le=1, description="α: sub-kernel i is scaled by α^i")
    interpolation: Literal["linear", "nearest"] = Field(
        "linear", description="upsampling of sub-kernel i by 2^max(i-1, 0)"
    )
    normalize: Literal["concat", "truncated"] = Field(
        "concat",
        description="norm the kernel is divided by: of the full concatenation before it is "
        "cut to kernel_len (concat, the reference) or of the cut kernel (truncated, "
        "schema <= 2 files)",
    )


KernelConfig = Annotated[SquashKernelConfig | SGConvKernelConfig, Field(discriminator="type")]


class LongConvConfig(ArchCausalConfig, LayerConfig):
    """Long convolution layer (safari ``LongConv``) with a regularised kernel."""

    type: Literal["long_conv"] = "long_conv"
    channels: int = Field(
        2, ge=1, description="kernels per model channel C; the conv output has C·d_model features"
    )
    causal: bool | None = Field(
        None,
        description="one-sided kernel; false adds a backward kernel; None -> true iff the arch "
        "is causal_lm",
    )
    kernel_len: int | None = Field(
        None, ge=1, description="taps K per kernel (<= max_seq_len); None -> max_seq_len"
    )
    kernel: KernelConfig = Field(
        default_factory=SquashKernelConfig, description="kernel parameterisation: squash | sgconv"
    )
    kernel_dropout: float = Field(
        0.0, ge=0, lt=1, description="dropout on kernel entries while training (safari: 0.2)"
    )
    activation: Literal["gelu", "id"] = Field(
        "gelu", description="between the convolution and output_linear"
    )
    output_glu: bool | None = Field(
        None,
        description="output_linear to 2·d_model and a GLU (true) or a plain Linear to d_model "
        "(false); None -> true for squash kernels (safari), false for sgconv (reference "
        "postact=None)",
    )

    def capabilities(self, ctx: LayerContext) -> Capabilities:
        return Capabilities(causal=self.is_causal(ctx), decode=False, length_dependent=True)

    def resolve(self, ctx: LayerContext) -> LongConvConfig:
        return self.model_copy(
            update={
                "causal": self.is_causal(ctx),
                "kernel_len": ctx.max_seq_len if self.kernel_len is None else self.kernel_len,
                "output_glu": self.glu,
            }
        )

    @property
    def glu(self) -> bool:
        """Whether the output projection ends in a GLU (``output_glu`` or its default)."""
        if self.output_glu is not None:
            return self.output_glu
        return isinstance(self.kernel, SquashKernelConfig)

    def check(self, ctx: LayerContext) -> CheckResult:
        out: CheckResult = []
        if self.kernel_len is not None and self.kernel_len > ctx.max_seq_len:
            out.append(
                (
                    ("kernel_len",),
                    f"kernel_len ({self.kernel_len}) exceeds max_seq_len ({ctx.max_seq_len}): "
                    "taps beyond the longest sequence are never used; allowed: "
                    f"1..{ctx.max_seq_len} or null",
                )
            )
        kernel = self.kernel
        if isinstance(kernel, SquashKernelConfig):
            # the threshold acts on the smoothed kernel: an average of `smooth` independent
            # N(0, init_scale²) taps has std init_scale / √smooth
            spread = kernel.init_scale / kernel.smooth**0.5
            if kernel.lam > 3 * spread:
                smoothed = f" / sqrt(smooth {kernel.smooth}) = {spread:.3g}"
                out.append(
                    (
                        ("kernel", "lam"),
                        f"lam ({kernel.lam}) is more than 3x the initial spread of the kernel "
                        f"(init_scale {kernel.init_scale}"
                        f"{smoothed if kernel.smooth > 1 else ''}): the soft threshold would "
                        "zero almost every kernel entry at init, and zeroed entries get no "
                        "gradient (docs/math.md#pitfalls); safari uses lam 0.003 with 0.002, "
                        "no smoothing; "
                        f"allowed: lam <= {3 * spread:.3g}",
                    )
                )
        return out

    @classmethod
    def examples(cls) -> list[LayerExample]:
        sg = SGConvKernelConfig(sub_kernel_len=4)
        return [
            LayerExample(cls(), name="causal-squash"),
            LayerExample(
                cls(channels=1, kernel_len=20, kernel=SquashKernelConfig(lam=0.001, smooth=3)),
                name="smooth-short-kernel",
            ),
            LayerExample(cls(activation="id"), arch="encoder", name="bidirectional-squash"),
            LayerExample(cls(channels=1, kernel=sg), name="sgconv"),
            LayerExample(
                cls(channels=2, kernel=sg.model_copy(update={"interpolation": "nearest"})),
                arch="encoder",
                name="sgconv-bidirectional-nearest",
            ),
            LayerExample(
                cls(
                    channels=1,
                    kernel_len=20,
                    output_glu=True,
                    kernel=sg.model_copy(update={"normalize": "truncated"}),
                ),
                name="sgconv-truncated-glu",
            ),
        ]


# -- kernels ------------------------------------------------------------------------------------


class SquashKernel(nn.Module):
    """``kernel (rows, d_model, K)``; forward -> smoothed, squashed kernel (rows, d_model, K)."""

    def __init__(self, rows: int, d_model: int, length: int, cfg: SquashKernelConfig):
        super().__init__()
        self.cfg = cfg
        self.kernel = nn.Parameter(torch.empty(rows, d_model, length))

    def reset_parameters(self, generator: torch.Generator | None) -> None:
        normal_(self.kernel, self.cfg.init_scale, generator)

    def forward(self) -> Tensor:
        k = self.kernel
        if self.cfg.smooth > 1:
            rows, d_model, length = k.shape
            flat = k.reshape(rows * d_model, 1, length)
            half = self.cfg.smooth // 2
            k = F.avg_pool1d(flat, self.cfg.smooth, stride=1, padding=half).view_as(k)
        if self.cfg.lam > 0:
            k = torch.sign(k) * F.relu(k.abs() - self.cfg.lam)
        return k


def sgconv_scales(length: int, sub_kernel_len: int) -> int:
    """S: the fewest sub-kernels whose lengths d, d, 2d, 4d, ... add up to >= length."""
    scales = 1
    while sub_kernel_len * 2 ** (scales - 1) < length:
        scales += 1
    return scales


class SGConvKernel(nn.Module):
    """``weight (S, rows, d_model, d)`` and the constant ``kernel_norm (rows, d_model, 1)``."""

    def __init__(self, rows: int, d_model: int, length: int, cfg: SGConvKernelConfig):
        super().__init__()
        self.cfg, self.length = cfg, length
        scales = sgconv_scales(length, cfg.sub_kernel_len)
        self.weight = nn.Parameter(torch.empty(scales, rows, d_model, cfg.sub_kernel_len))
        self.register_buffer("kernel_norm", torch.empty(rows, d_model, 1))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None) -> None:
        normal_(self.weight, 1.0, generator)
        full = self._full()  # (rows, d_model, d·2^(S−1))
        ref = full if self.cfg.normalize == "concat" else full[..., : self.length]
        self.kernel_norm.copy_(ref.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    def _full(self) -> Tensor:
        """``concat_i α^i · Up_{2^max(i-1,0)}(w_i)``: (rows, d_model, d·2^(S−1)), not cut."""
        scales, rows, d_model, d = self.weight.shape
        mode = self.cfg.interpolation
        pieces = []
        for i in range(scales):
            w = self.weight[i].reshape(1, rows * d_model, d)
            size = d * 2 ** max(i - 1, 0)
            if size != d:
                extra = {"align_corners": False} if mode == "linear" else {}
                w = F.interpolate(w, size=size, mode=mode, **extra)
            pieces.append(self.cfg.decay**i * w.view(rows, d_model, size))
        return torch.cat(pieces, dim=-1)

    def forward(self) -> Tensor:
        """The kernel cut to K taps, divided by the constant norm: (rows, d_model, K)."""
        return self._full()[..., : self.length] / self.kernel_norm.to(self.weight.dtype)


# -- the layer ----------------------------------------------------------------------------------


@dataclass
class LongConvCoeffs:
    """Kernels per head (H = C·d_model): forward (H, K), backward (H, K) or None, skip (H,)."""

    k: Tensor
    k_back: Tensor | None
    skip: Tensor
    seq_idx: Tensor | None


@register(LongConvConfig)
class LongConv(Mixer):
    """Long convolution mixer; equations, capabilities and backends in the module docstring."""

    cfg: LongConvConfig

    def __init__(self, cfg: LongConvConfig, ctx: LayerContext):
        super().__init__(cfg, ctx)
        cfg = self.cfg  # resolved and checked by Mixer.__init__
        assert cfg.kernel_len is not None  # set by resolve
        D, C = ctx.d_model, cfg.channels
        self.causal = bool(cfg.causal)
        rows = C * (1 if self.causal else 2)  # backward kernels after the forward ones
        kernel_cls = SquashKernel if isinstance(cfg.kernel, SquashKernelConfig) else SGConvKernel
        self.kernel = kernel_cls(rows, D, cfg.kernel_len, cfg.kernel)  # type: ignore[arg-type]
        self.D = nn.Parameter(torch.empty(C, D))
        self.glu = cfg.glu
        self.output_linear = nn.Linear(C * D, (2 if self.glu else 1) * D)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Kernel per its parameterisation, D ~ N(0, 1) (safari), output_linear N(0, init_std)."""
        self.kernel.reset_parameters(generator)
        normal_(self.D, 1.0, generator)
        init_linear(self.output_linear, self.ctx.init_std, generator)

    def _coefficients(self, seq_idx: Tensor | None) -> LongConvCoeffs:
        C, D = self.cfg.channels, self.ctx.d_model
        k = F.dropout(self.kernel(), self.cfg.kernel_dropout, self.training)  # (rows, D, K)
        fwd = k[:C].reshape(C * D, -1)
        back = None if self.causal else k[C:].reshape(C * D, -1)
        return LongConvCoeffs(fwd, back, self.D.reshape(C * D), seq_idx)

    def _finish(self, y: Tensor, seq_idx: Tensor | None) -> Tensor:
        """y (B, L, C·D, 1) -> activation, output_linear (GLU) -> (B, L, D); 0 at padding."""
        y = y.flatten(2)  # (B, L, C·D) in (c h) order
        if self.cfg.activation == "gelu":
            y = F.gelu(y)
        out = self.output_linear(y)  # (B, L, 2D) with GLU, else (B, L, D)
        if self.glu:
            out = F.glu(out, dim=-1)
        return zero_padding(out, seq_idx)

    def mixing_terms(
        self, x: Tensor, *, input_ids: Tensor | None = None, seq_idx: Tensor | None = None
    ) -> MixTerms:
        self.check_length(x.shape[1])
        x = zero_padding(x, seq_idx)  # padding never enters
        v = x.repeat(1, 1, self.cfg.channels)[..., None]  # (B, L, C·D, 1): head c·D + h
        coeffs = self._coefficients(seq_idx)
        return MixTerms([(coeffs, v)], lambda y: self._finish(y, seq_idx))

    def mix(self, coeffs: LongConvCoeffs, v: Tensor) -> Tensor:
        """Per-head convolution plus skip on v (B, L, H, P), any P; linear in v."""
        mode = "causal" if coeffs.k_back is None else "two_sided"
        y = fftconv_heads(
            self.backends, v, coeffs.k, mode=mode, k_back=coeffs.k_back, seq_idx=coeffs.seq_idx
        )
        return y + coeffs.skip.to(v.dtype)[:, None] * v

    def param_hints(self) -> dict[str, ParamHint]:
        """Kernel parameters are regularised by squash / structure, not by weight decay."""
        hints = {
            name: ParamHint(no_weight_decay=True)
            for name, _ in self.named_parameters()
            if name.startswith("kernel.")
        }
        hints["D"] = ParamHint(no_weight_decay=True)
        hints["output_linear.weight"] = ParamHint(residual_out=True)
        if isinstance(self.kernel, SGConvKernel):
            hints["kernel.kernel_norm"] = ParamHint(keep_fp32=True)
        return hints

    def flops_per_token(self, seq_len: int) -> float:
        C, D = self.cfg.channels, self.ctx.d_model
        conv = fftconv_flops(seq_len, C * D) / seq_len  # two-sided: same FFT sizes
        return conv + 2.0 * C * D + 2.0 * C * D * (2 if self.glu else 1) * D
