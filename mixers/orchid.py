"""Orchid: data-dependent global convolution (Karami & Ghodsi 2024; docs/math.md#orchid).

``P = in_linear(u)`` (d_model → 3·d_model, bias). The conditioning input is
``s = P[..., 2D:]``, taken **before** the short convolution; ``[x_0, x_1, v]`` is the
depthwise short convolution of P (``conv1d_short``). A static kernel ``h_0`` and skip
``b`` come from a Hyena implicit filter (``fixed_conv``), an adaptive kernel from a
conditioning network over s (``conditioning``), and

    y = x_0 ⊙ (κ ∗ (x_1 ⊙ v) + b ⊙ x_1 ⊙ v) + (h_res ∗ u + b_res ⊙ u),   κ = h_0 + h_ad

with ``h_res, b_res`` a second implicit filter on the raw input (``fixed_conv_res``,
``residual_long_conv: sconv``), then ``out_linear``.

Conditioning networks (``conditioning``), each conv depthwise along its axis and each
norm a LayerNorm over channels:

* ``absfreq`` (Type I, "Eq. 2"): ``a = LN(conv_t(s))``, ``m = |F(a)|²``,
  ``ĥ = LN(conv_f(m))`` with two outputs per channel read as ``Re + i·Im``: a spectrum.
* ``corrTime`` (Type II, "Eq. 3"): ``k = LN(conv_k(s))``, ``q = LN(conv_q(s))``,
  ``ĥ = conj(F(k)) ⊙ F(q)`` (σ = identity), then a frequency conv over each channel's
  ``[Re, Im]`` pair and LN: a spectrum.

Both ignore circular shifts of s (|·|² and conj(F k)·F q cancel the phase).

Modes (``mode``):

* ``linear`` (non-causal, encoders): FFT size 2n for a document of n tokens; the
  spectrum ``ĥ`` defines a two-sided kernel on 2n points (index ``2n − d`` is lag −d),
  added to a two-sided static filter (forward and backward implicit MLPs), and applied
  as a zero-padded **linear** convolution: no wrap-around. Conditioning conv: 'same',
  zero padding; short conv causal (as the original).
* ``circular`` (non-causal): every convolution is circular with period n: the
  short conv, the conditioning conv, the FFT size n of the conditioning and of the global
  convolutions (static and residual filters of n taps wrap). The layer is then exactly
  equivariant to circular shifts of its input (tested).
* ``block_causal`` (causal, language models; not in the original): positions are cut
  into blocks of ``block_size``; the adaptive kernel used for the outputs of block c is
  conditioned only on blocks ``< c`` (the conditioning signal is zeroed from ``c·bs`` on;
  its conv is causal), its spectrum has a fixed size ``N = 2·max_seq_len`` and its time
  kernel ``F⁻¹_N(ĥ)[:n]`` is applied causally. Output t depends on inputs ≤ t through
  the convolution and on inputs before its block through the kernel: causal, and a
  prefix does not depend on the total length. Block 0 uses the kernel of an empty
  prefix (input independent). Cost: ``⌈n/bs⌉`` spectra and convolutions per sequence.

Fixed with respect to the original code (docs/math.md#orchid), and why:

1. Batch > 1: each sample's kernel is applied to that sample only (the original
   broadcast (B,1,D,L) kernels against (B,D,L) signals into (B,B,L,D)).
2. Scaling: convolutions are the true convolution; only the inverse transform divides
   by n (the original divided both transforms by n: an extra 1/L).
3. No future-dependent "causal" flag: the original's causal mode was circular and its
   kernel saw the whole sequence. Here ``linear`` and ``circular`` declare themselves
   non-causal (a causal_lm refuses them at load) and ``block_causal`` really is causal.
4. Type II spectra and the global convolution always share one FFT size (the original
   mixed 2L and L bins).
5. Type II's frequency conv pairs each channel's Re and Im parts (the original
   concatenated [Re | Im] and grouped neighbouring channels).

Packed sequences: the conditioning of a document must see that document only, so the
layer runs per document (documents of equal length batched together; padding removed);
each output is what that document alone gives.

Matrix view (H = d_model, P = 1): term 1, v = post-conv v,
``M = diag(x_0)·(C_κ + b·I)·diag(x_1)`` with ``C_κ`` the two-sided Toeplitz (linear),
circulant (circular) or block-row lower-triangular Toeplitz (block_causal) matrix of
the data-dependent kernel; term 2, v = u, ``M = T(h_res) + b_res·I``. ``finish`` =
``out_linear`` (zeros at padding). Capabilities: causal iff ``block_causal``; no decode;
length dependent. Kernels: ``fftconv`` (``torch``, ``reference``), ``causal_conv1d``.
Parameter names follow the original where its modules exist (``in_linear``,
``conv1d_short``, ``fixed_conv``, ``fixed_conv_res``, ``out_linear``). The conditioning
network is flattened: ``conditioning.time_conv`` / ``time_norm`` are the original's
``conv_kernel_nn.nn_model.{conv1d_ls.0, norm_ls.0.norm_conv_kernel}``, ``freq_conv`` /
``freq_norm`` its ``nn_model2`` (Type I) or ``nn_model_frq`` (Type II; channel order
differs, fix 5), ``k_conv`` / ``q_conv`` (and norms) its ``nn_model_k`` / ``nn_model_q``
(the original's nested names; a weight converter would map them). DCT modes, heads
and order > 2 are not ported (only order 2 builds in the original).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from mixstack.blocks.implicit_filter import ImplicitFilter, ImplicitFilterConfig
from mixstack.blocks.init import reset_depthwise_conv, uniform_
from mixstack.dsl.base import Capabilities, LayerConfig, LayerExample
from mixstack.dsl.context import LayerContext
from mixstack.dsl.registry import register
from mixstack.kernels.causal_conv1d import causal_conv1d
from mixstack.kernels.common import document_runs, zero_padding
from mixstack.kernels.fftconv import fftconv_flops, fftconv_heads
from mixstack.mixers.base import Mixer, MixTerms, ParamHint, init_linear

CheckResult = list[tuple[tuple[str | int, ...], str]]
Mode = Literal["linear", "circular", "block_causal"]
Padding = Literal["same", "causal", "circular", "circular_causal"]


class OrchidConfig(LayerConfig):
    """Orchid data-dependent global convolution (order 2, one head)."""

    type: Literal["orchid"] = "orchid"
    mode: Mode | None = Field(
        None,
        description="linear (non-causal, zero-padded 2n FFT) | circular (non-causal, period "
        "n) | block_causal (causal); None -> block_causal for causal_lm, else linear",
    )
    conditioning: Literal["absfreq", "corrTime"] = Field(
        "absfreq", description="Type I |F(a)|² (absfreq) or Type II conj(F k)·F q (corrTime)"
    )
    conv_filter_size: int = Field(
        3, ge=1, description="taps of the conditioning convs (time and frequency axes; odd)"
    )
    norm: Literal["layernorm", "none"] = Field(
        "layernorm", description="norm over channels after each conditioning conv"
    )
    short_filter_order: int = Field(3, ge=1, description="taps of the depthwise short conv")
    residual_long_conv: Literal["sconv", "none"] = Field(
        "sconv", description="sconv: implicit-filter convolution of the raw input added"
    )
    block_size: int | None = Field(
        None,
        ge=1,
        description="block_causal only: positions per conditioning block; None -> "
        "ceil(max_seq_len / 8)",
    )
    filter: ImplicitFilterConfig = Field(
        default_factory=ImplicitFilterConfig,
        description="implicit filter network of fixed_conv and fixed_conv_res",
    )

    def resolved_mode(self, ctx: LayerContext) -> Mode:
        if self.mode is not None:
            return self.mode
        return "block_causal" if ctx.causal_arch else "linear"

    def capabilities(self, ctx: LayerContext) -> Capabilities:
        causal = self.resolved_mode(ctx) == "block_causal"
        return Capabilities(causal=causal, decode=False, length_dependent=True)

    def resolve(self, ctx: LayerContext) -> OrchidConfig:
        mode = self.resolved_mode(ctx)
        block = self.block_size
        if mode == "block_causal" and block is None:
            block = math.ceil(ctx.max_seq_len / 8)
        return self.model_copy(update={"mode": mode, "block_size": block})

    def check(self, ctx: LayerContext) -> CheckResult:
        out: CheckResult = []
        if self.conv_filter_size % 2 == 0:
            out.append(
                (
                    ("conv_filter_size",),
                    f"conv_filter_size must be odd (the conditioning convs are centred on "
                    f"their axis), got {self.conv_filter_size}",
                )
            )
        mode = self.resolved_mode(ctx)
        if self.block_size is not None and mode != "block_causal":
            out.append(
                (
                    ("block_size",),
                    f"block_size only applies to mode block_causal; this layer is {mode!r} "
                    "(remove block_size or set mode: block_causal)",
                )
            )
        elif self.block_size is not None and self.block_size > ctx.max_seq_len:
            out.append(
                (
                    ("block_size",),
                    f"block_size ({self.block_size}) exceeds max_seq_len ({ctx.max_seq_len}); "
                    f"allowed: 1..{ctx.max_seq_len}",
                )
            )
        return out

    @classmethod
    def examples(cls) -> list[LayerExample]:
        small = ImplicitFilterConfig(width=16)
        return [
            LayerExample(cls(filter=small), arch="encoder", name="linear-absfreq"),
            LayerExample(
                cls(mode="linear", conditioning="corrTime", conv_filter_size=5, filter=small),
                arch="encoder",
                name="linear-corrTime",
            ),
            LayerExample(
                cls(mode="circular", conditioning="corrTime", norm="none", filter=small),
                arch="encoder",
                name="circular-corrTime-no-norm",
            ),
            LayerExample(cls(block_size=4, filter=small), name="block-causal-absfreq"),
            LayerExample(
                cls(conditioning="corrTime", residual_long_conv="none", filter=small),
                name="block-causal-corrTime-no-residual",
            ),
        ]


# -- documents of a packed batch ------------------------------------------------------------------


@dataclass(frozen=True)
class DocLayout:
    """Documents of a (B, L) batch, grouped by length.

    ``index`` holds, per group, the flat positions ``(G, n)`` (into B·L) of its G
    documents of n tokens, or is None when every row is one document (no seq_idx).
    Padding (seq_idx −1) belongs to no document: it is skipped and scattered back as 0.
    """

    shape: tuple[int, int]
    index: tuple[Tensor, ...] | None

    @staticmethod
    def of(seq_idx: Tensor | None, batch: int, length: int) -> DocLayout:
        if seq_idx is None:
            return DocLayout((batch, length), None)
        run, pad = document_runs(seq_idx)
        flat = (~pad).flatten().nonzero().squeeze(1)  # token positions, row-major
        rows = torch.div(flat, length, rounding_mode="floor")
        keys = rows * (length + 1) + run.flatten()[flat]  # non-decreasing along flat
        _, counts = torch.unique_consecutive(keys, return_counts=True)
        starts = counts.cumsum(0) - counts
        groups = []
        for n in sorted(set(counts.tolist())):
            first = starts[counts == n]  # (G,)
            groups.append(flat[first[:, None] + torch.arange(n, device=flat.device)])
        return DocLayout((batch, length), tuple(groups))

    def gather(self, t: Tensor) -> list[Tensor]:
        """t (B, L, ...) -> per group (G, n, ...)."""
        if self.index is None:
            return [t]
        flat = t.reshape(self.shape[0] * self.shape[1], *t.shape[2:])
        return [flat[idx] for idx in self.index]

    def scatter(self, parts: Sequence[Tensor], ref: Tensor) -> Tensor:
        """Per group (G, n, ...) -> (B, L, ...), zeros at padding; ``ref`` gives dtype and
        device when there is no token at all."""
        if self.index is None:
            return parts[0]
        B, L = self.shape
        if not self.index:
            return ref.new_zeros(B, L, *ref.shape[2:])
        positions = torch.cat([idx.reshape(-1) for idx in self.index])
        values = torch.cat([p.reshape(-1, *p.shape[2:]) for p in parts])
        out = values.new_zeros(B * L, *values.shape[1:]).index_copy(0, positions, values)
        return out.view(B, L, *values.shape[1:])


# -- conditioning networks ------------------------------------------------------------------------


def grouped_conv(x: Tensor, conv: nn.Conv1d, padding: Padding) -> Tensor:
    """Grouped conv of x (G, n, C_in) along axis 1 with ``conv``'s weights -> (G, n, C_out).

    ``same``: centred, zero padding; ``causal``: K−1 zeros on the left; ``circular``:
    centred with wrap-around; ``circular_causal``: K−1 taps back with wrap-around.
    Computed as K shifted products (groups here have 1 or 2 input channels): faster on
    CPU than a grouped ``F.conv1d``, whose thread pool dominates at these sizes. Runs in
    x's dtype (the caller upcasts).
    """
    G, n, c_in = x.shape
    K, groups = conv.kernel_size[0], conv.groups
    xt = x.transpose(1, 2)  # (G, C_in, n)
    left = K - 1 if padding in ("causal", "circular_causal") else K // 2
    if padding in ("same", "causal"):
        xt = F.pad(xt, (left, K - 1 - left))
    else:
        xt = xt[..., torch.arange(-left, n + K - 1 - left, device=x.device) % n]
    xg = xt.reshape(G, groups, 1, c_in // groups, n + K - 1)  # (G, g, 1, ci, n+K−1)
    w = conv.weight.to(x.dtype)
    wg = w.view(groups, -1, c_in // groups, K)  # (g, co, ci, K)
    y = sum((xg[..., j : j + n] * wg[None, ..., j, None]).sum(dim=3) for j in range(K))
    y = y.reshape(G, -1, n)  # (G, C_out, n): channel g·co + o
    if conv.bias is not None:
        y = y + conv.bias.to(x.dtype)[:, None]
    return y.transpose(1, 2)


def _layer_norm(x: Tensor, norm: nn.LayerNorm | None) -> Tensor:
    if norm is None:
        return x
    return F.layer_norm(
        x, norm.normalized_shape, norm.weight.to(x.dtype), norm.bias.to(x.dtype), norm.eps
    )


def _as_complex(h: Tensor) -> Tensor:
    """(…, 2D) with channels [Re_0, Im_0, Re_1, …] -> (…, D) complex."""
    return torch.complex(h[..., 0::2].contiguous(), h[..., 1::2].contiguous())


class _Conditioning(nn.Module):
    """Shared parts: conv + norm pairs and the frequency-axis stage."""

    def __init__(self, d: int, size: int, norm: bool, freq_in: int):
        super().__init__()
        self.freq_conv = nn.Conv1d(freq_in, 2 * d, size, groups=d)
        self.freq_norm = nn.LayerNorm(2 * d) if norm else None

    @staticmethod
    def _branch(s: Tensor, conv: nn.Conv1d, norm: nn.LayerNorm | None, padding: Padding):
        return _layer_norm(grouped_conv(s, conv, padding), norm)

    def _frequency(self, features: Tensor) -> Tensor:
        """(…, bins, C) real features -> spectrum (…, bins, D) complex."""
        return _as_complex(
            _layer_norm(grouped_conv(features, self.freq_conv, "same"), self.freq_norm)
        )

    def reset_parameters(self, generator: torch.Generator | None) -> None:
        """PyTorch-default conv init (U(±1/√fan_in)); norms to identity."""
        for module in self.modules():
            if isinstance(module, nn.Conv1d):
                fan_in = module.weight.shape[1] * module.weight.shape[2]
                uniform_(module.weight, 1.0 / math.sqrt(fan_in), generator)
                uniform_(module.bias, 1.0 / math.sqrt(fan_in), generator)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()


class AbsFreqConditioning(_Conditioning):
    """Type I: ``ĥ = LN(conv_f(|F(LN(conv_t(s)))|²))`` read as complex."""

    def __init__(self, d: int, size: int, norm: bool):
        super().__init__(d, size, norm, freq_in=d)
        self.time_conv = nn.Conv1d(d, d, size, groups=d)
        self.time_norm = nn.LayerNorm(d) if norm else None

    def signal(self, s: Tensor, padding: Padding) -> Tensor:
        """s (G, n, D) -> a (G, n, D): the time-domain part (pointwise in time after the conv)."""
        return self._branch(s, self.time_conv, self.time_norm, padding)

    def spectrum(self, a: Tensor, n_fft: int) -> Tensor:
        """a (G', n, D) -> ĥ (G', n_fft//2 + 1, D) complex."""
        A = torch.fft.rfft(a, n=n_fft, dim=1)
        return self._frequency(A.real.square() + A.imag.square())


class CorrTimeConditioning(_Conditioning):
    """Type II: ``ĥ = LN(conv_f([Re, Im](conj(F k) ⊙ F q)))`` with k, q = LN(conv(s))."""

    def __init__(self, d: int, size: int, norm: bool):
        super().__init__(d, size, norm, freq_in=2 * d)
        self.k_conv = nn.Conv1d(d, d, size, groups=d)
        self.k_norm = nn.LayerNorm(d) if norm else None
        self.q_conv = nn.Conv1d(d, d, size, groups=d)
        self.q_norm = nn.LayerNorm(d) if norm else None

    def signal(self, s: Tensor, padding: Padding) -> Tensor:
        """s (G, n, D) -> [k | q] (G, n, 2D)."""
        k = self._branch(s, self.k_conv, self.k_norm, padding)
        q = self._branch(s, self.q_conv, self.q_norm, padding)
        return torch.cat([k, q], dim=-1)

    def spectrum(self, kq: Tensor, n_fft: int) -> Tensor:
        """[k | q] (G', n, 2D) -> ĥ (G', n_fft//2 + 1, D) complex."""
        k, q = torch.fft.rfft(kq, n=n_fft, dim=1).chunk(2, dim=-1)
        h = k.conj() * q  # (G', bins, D)
        return self._frequency(torch.stack([h.real, h.imag], dim=-1).flatten(-2))


# -- the layer ------------------------------------------------------------------------------------


@dataclass
class _Group:
    """Coefficients of one group of G documents of n tokens.

    k: linear (G, D, n) forward taps; circular (G, D, n); block_causal (G, C_b, D, n).
    k_back: linear only, (G, D, n − 1) backward taps.
    """

    x0: Tensor  # (G, n, D)
    x1: Tensor  # (G, n, D)
    k: Tensor
    k_back: Tensor | None


@dataclass
class OrchidCoeffs:
    """Term 1 (the gated adaptive convolution): per group kernels, gates, skip b (D,)."""

    layout: DocLayout
    groups: list[_Group]
    skip: Tensor | None


@dataclass
class ResidualCoeffs:
    """Term 2 (static convolution of the raw input): h_res (D, L), backward (D, L) or
    None, skip b_res (D,) or None."""

    layout: DocLayout
    k: Tensor
    k_back: Tensor | None
    skip: Tensor | None


@register(OrchidConfig)
class Orchid(Mixer):
    """Orchid mixer; equations, modes, fixes and capabilities in the module docstring."""

    cfg: OrchidConfig

    def __init__(self, cfg: OrchidConfig, ctx: LayerContext):
        super().__init__(cfg, ctx)
        cfg = self.cfg  # resolved and checked by Mixer.__init__
        D, K = ctx.d_model, cfg.short_filter_order
        self.mode: Mode = cfg.mode or "linear"
        two_sided = self.mode == "linear"
        self.in_linear = nn.Linear(D, 3 * D)
        self.conv1d_short = nn.Conv1d(3 * D, 3 * D, K, groups=3 * D, padding=K - 1)
        self.fixed_conv = ImplicitFilter(D, ctx.max_seq_len, cfg.filter, bidirectional=two_sided)
        self.fixed_conv_res = (
            ImplicitFilter(D, ctx.max_seq_len, cfg.filter, bidirectional=two_sided)
            if cfg.residual_long_conv == "sconv"
            else None
        )
        cond_cls = AbsFreqConditioning if cfg.conditioning == "absfreq" else CorrTimeConditioning
        self.conditioning = cond_cls(D, cfg.conv_filter_size, cfg.norm == "layernorm")
        self.out_linear = nn.Linear(D, D)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Linears N(0, init_std) with zero bias; convs PyTorch-default uniform; implicit
        filters as in safari; norms to identity."""
        init_linear(self.in_linear, self.ctx.init_std, generator)
        init_linear(self.out_linear, self.ctx.init_std, generator)
        reset_depthwise_conv(self.conv1d_short, generator)
        self.fixed_conv.reset_parameters(generator)
        if self.fixed_conv_res is not None:
            self.fixed_conv_res.reset_parameters(generator)
        self.conditioning.reset_parameters(generator)

    # -- coefficients ------------------------------------------------------------------------
    def _short_conv(self, proj: Tensor, seq_idx: Tensor | None) -> Tensor | None:
        """Causal depthwise short conv of the packed proj (B, L, 3D), once for the batch
        (the shared kernel keeps documents apart and skips padding); None in circular
        mode, whose wrap-around conv runs per document (:meth:`_group`)."""
        if self.mode == "circular":
            return None
        weight = self.conv1d_short.weight[:, 0, :]  # (3D, K)
        return causal_conv1d(
            proj, weight, self.conv1d_short.bias, seq_idx=seq_idx, backends=self.backends
        )

    def _static(self, filt: ImplicitFilter, length: int) -> tuple[Tensor, Tensor | None]:
        """Static filter (D, length) and, when two-sided, its backward taps (D, length)."""
        back = filt.filter_rev(length) if self.mode == "linear" else None
        return filt.filter(length), back

    def _kernels(
        self, s: Tensor, static: tuple[Tensor, Tensor | None]
    ) -> tuple[Tensor, Tensor | None]:
        """Conditioning input s (G, n, D) -> the data-dependent kernel of the group."""
        n = s.shape[1]
        f = torch.promote_types(s.dtype, torch.float32)
        h_fwd, h_back = static[0][:, :n], static[1]
        cond = self.conditioning
        if self.mode == "linear":
            spec = cond.spectrum(cond.signal(s.to(f), "same"), 2 * n)  # (G, n+1, D)
            kappa = torch.fft.irfft(spec, n=2 * n, dim=1).transpose(1, 2)  # (G, D, 2n)
            assert h_back is not None
            back = h_back[:, : n - 1] + kappa[..., n + 1 :].flip(-1)  # lag −d at index 2n − d
            return h_fwd + kappa[..., :n], back
        if self.mode == "circular":
            spec = cond.spectrum(cond.signal(s.to(f), "circular"), n)
            return h_fwd + torch.fft.irfft(spec, n=n, dim=1).transpose(1, 2), None
        return self._block_kernels(s.to(f), h_fwd), None

    def _block_kernels(self, s: Tensor, h_fwd: Tensor) -> Tensor:
        """Block-causal kernels (G, C_b, D, n): block c conditioned on positions < c·bs."""
        G, n, _ = s.shape
        bs = self.cfg.block_size or n
        n_blocks = -(-n // bs)
        signal = self.conditioning.signal(s, "causal")  # (G, n, C): causal in time
        seen = (
            torch.arange(n, device=s.device) < bs * torch.arange(n_blocks, device=s.device)[:, None]
        )  # (C_b, n)
        prefix = signal[:, None] * seen[None, :, :, None].to(signal.dtype)  # (G, C_b, n, C)
        n_fft = 2 * self.ctx.max_seq_len  # fixed: a prefix never depends on n
        spec = self.conditioning.spectrum(prefix.flatten(0, 1), n_fft)  # (G·C_b, bins, D)
        kappa = torch.fft.irfft(spec, n=n_fft, dim=1)[:, :n].transpose(1, 2)  # (G·C_b, D, n)
        return h_fwd + kappa.view(G, n_blocks, -1, n)

    def _group(
        self, proj: Tensor, conv: Tensor | None, static: tuple[Tensor, Tensor | None]
    ) -> tuple[_Group, Tensor]:
        """proj (G, n, 3D) of one group and its short conv (None: circular, computed here)
        -> the group's coefficients and value stream v (G, n, D)."""
        D = self.ctx.d_model
        if conv is None:
            f = torch.promote_types(proj.dtype, torch.float32)
            conv = grouped_conv(proj.to(f), self.conv1d_short, "circular_causal").to(proj.dtype)
        x0, x1, v = conv.split(D, dim=-1)
        k, k_back = self._kernels(proj[..., 2 * D :], static)
        return _Group(x0, x1, k, k_back), v

    # -- matrix view -------------------------------------------------------------------------
    def mixing_terms(
        self, x: Tensor, *, input_ids: Tensor | None = None, seq_idx: Tensor | None = None
    ) -> MixTerms:
        B, L, _ = x.shape
        self.check_length(L)
        layout = DocLayout.of(seq_idx, B, L)
        static = self._static(self.fixed_conv, L)
        groups, values = [], []
        proj = self.in_linear(x)  # (B, L, 3D)
        conv = self._short_conv(proj, seq_idx)
        convs = [None] * len(layout.index or [0]) if conv is None else layout.gather(conv)
        for part, part_conv in zip(layout.gather(proj), convs, strict=True):
            group, v = self._group(part, part_conv, static)
            groups.append(group)
            values.append(v)
        v = layout.scatter(values, x)  # (B, L, D)
        terms = [(OrchidCoeffs(layout, groups, self.fixed_conv.skip(static[0].dtype)), v)]
        if self.fixed_conv_res is not None:
            k, k_back = self._static(self.fixed_conv_res, L)
            res = ResidualCoeffs(layout, k, k_back, self.fixed_conv_res.skip(k.dtype))
            terms.append((res, x))
        return MixTerms([(c, t[..., None]) for c, t in terms], lambda y: self._finish(y, seq_idx))

    def _finish(self, y: Tensor, seq_idx: Tensor | None) -> Tensor:
        out = self.out_linear(y[..., 0])  # (B, L, D)
        return zero_padding(out, seq_idx)

    def mix(self, coeffs: OrchidCoeffs | ResidualCoeffs, v: Tensor) -> Tensor:
        """Per document group, the term's convolution on v (B, L, D, P); linear in v."""
        parts = coeffs.layout.gather(v)
        if isinstance(coeffs, ResidualCoeffs):
            out = [self._residual(coeffs, part) for part in parts]
        else:
            out = [
                self._adaptive(coeffs, g, part)
                for g, part in zip(coeffs.groups, parts, strict=True)
            ]
        return coeffs.layout.scatter(out, v)

    def _adaptive(self, coeffs: OrchidCoeffs, group: _Group, v: Tensor) -> Tensor:
        """x0 ⊙ (κ ∗ w + b ⊙ w) with w = x1 ⊙ v; v (G, n, D, P)."""
        w = group.x1[..., None] * v
        if self.mode == "block_causal":
            y = self._block_conv(group.k, w)
        elif self.mode == "circular":
            y = fftconv_heads(self.backends, w, group.k, mode="circular")
        else:
            y = fftconv_heads(self.backends, w, group.k, mode="two_sided", k_back=group.k_back)
        if coeffs.skip is not None:
            y = y + coeffs.skip.to(w.dtype)[:, None] * w
        return group.x0[..., None] * y

    def _block_conv(self, k: Tensor, w: Tensor) -> Tensor:
        """Causal conv of w (G, n, D, P) where outputs of block c use kernel k[:, c]."""
        G, n_blocks, D, n = k.shape
        rows = w[:, None].expand(G, n_blocks, *w.shape[1:]).flatten(0, 1)  # (G·C_b, n, D, P)
        y = fftconv_heads(self.backends, rows, k.reshape(G * n_blocks, D, n), mode="causal")
        y = y.view(G, n_blocks, *w.shape[1:])
        t = torch.arange(n, device=w.device)
        block = torch.div(t, self.cfg.block_size or n, rounding_mode="floor")
        return y[:, block, t]  # (G, n, D, P)

    def _residual(self, coeffs: ResidualCoeffs, v: Tensor) -> Tensor:
        """h_res ∗ v + b_res ⊙ v for one group, v (G, n, D, P)."""
        n = v.shape[1]
        k = coeffs.k[:, :n]
        if self.mode == "circular":
            y = fftconv_heads(self.backends, v, k, mode="circular")
        elif self.mode == "linear":
            assert coeffs.k_back is not None
            back = coeffs.k_back[:, : n - 1]
            y = fftconv_heads(self.backends, v, k, mode="two_sided", k_back=back)
        else:
            y = fftconv_heads(self.backends, v, k, mode="causal")
        if coeffs.skip is not None:
            y = y + coeffs.skip.to(v.dtype)[:, None] * v
        return y

    # -- bookkeeping -------------------------------------------------------------------------
    def param_hints(self) -> dict[str, ParamHint]:
        hints: dict[str, ParamHint] = {"out_linear.weight": ParamHint(residual_out=True)}
        for prefix in ("fixed_conv", "fixed_conv_res"):
            filt = getattr(self, prefix)
            if filt is not None:
                for name, kw in filt.hint_kwargs().items():
                    hints[f"{prefix}.{name}"] = ParamHint(**kw)
        return hints

    def flops_per_token(self, seq_len: int) -> float:
        """Projections, short conv, the global convolutions (block_causal: one per block)
        and the conditioning transforms; the implicit MLPs are left out (per sequence)."""
        D, K, L = self.ctx.d_model, self.cfg.short_filter_order, seq_len
        proj = 2.0 * (D * 3 * D + D * D) + 2.0 * 3 * D * K
        conv = fftconv_flops(L, D) / L
        n_convs = 1 + (self.fixed_conv_res is not None)
        if self.mode == "block_causal":
            blocks = -(-L // (self.cfg.block_size or L))
            cond = blocks * fftconv_flops(self.ctx.max_seq_len, 2 * D) / L
            return proj + (blocks + n_convs - 1) * conv + cond
        return proj + n_convs * conv + fftconv_flops(L, 2 * D) / L
