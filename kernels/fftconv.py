"""Long depthwise convolutions through the real FFT (docs/math.md#s4d,
#long-convolution, #hyena, #orchid, #pitfalls).

One signature for every backend: a signal ``u (B, D, L)`` is convolved channel by
channel with a kernel shared by the batch, ``k (D, K)``, or one per sample,
``k (B, D, K)``. Three modes:

* ``causal``: ``y_t = Σ_{j=0}^{K−1} k_j · u_{t−j}`` over ``t − j ≥ 0`` (zero-padded, no
  wrap-around). Long convolution, Hyena, S4D.
* ``two_sided``: the causal sum plus ``Σ_{j=1}^{Kb} k_back_{j−1} · u_{t+j}`` over
  ``t + j < L``: a forward kernel for lags ``0..K−1`` and a backward kernel ``k_back``
  for lags ``−1..−Kb`` (safari's bidirectional layout,
  ``y_t = Σ_{s≤t} k⁰_{t−s}u_s + Σ_{s>t} k¹_{s−t−1}u_s``). Bidirectional mixers.
* ``circular``: ``y_t = Σ_j k_j · u_{(t−j) mod L}``: period L, a kernel longer than L
  wraps onto itself. Orchid's explicitly circular variant (docs/math.md#orchid).

Taps beyond the sequence never contribute, so a kernel may be shorter than, as long
as, or longer than L. Only the kernel's FFT carries the ``1/n`` (inside ``irfft``):
the result is the true convolution, never divided twice (docs/math.md#pitfalls, Orchid defect 2).

Packed sequences (``seq_idx (B, L)``, document ids, −1 = padding; documents as in
:func:`mixstack.kernels.common.document_runs`, shared with ``causal_conv1d``): padding is
transparent (the convolution runs over the non-padding positions of a row in order)
and outputs exactly 0 there; a position only sees positions of its own document, as if
each document were convolved alone. Circular mode has no packed form (its period is the
row length) and refuses ``seq_idx``: a mixer that needs per-document circular
convolutions calls the kernel per document (see ``mixers/orchid.py``).

Backends:

* ``reference``: direct convolution, one tap at a time over explicit shifts, with the
  document test spelled out. Readable; used by the tests (fp64).
* ``torch``: ``rfft``/``irfft`` with the FFT size padded to the next ``2^a·3^b·5^c``
  at or above the minimum that avoids wrap-around (``L + max(K−1, Kb)``, taps clipped to
  what the sequence can use). Packed rows are re-laid out with ``gap`` zeros between
  documents (``gap`` = the longest tap any document can use), which makes one batched
  FFT exact; the cost is a row of ``L + (documents − 1)·gap`` positions.

Callers use the dispatcher :func:`fftconv` (the reference's signature plus ``backends``,
the policy that picks the backend), or :func:`fftconv_heads` on the mixers' layout.

Computation runs in fp32 (fp64 for fp64 inputs): CPU ``rfft`` rejects bf16 and fp16 FFTs
lose too much; the result comes back in ``u.dtype``. The ``torch`` backend's FFT step has
its own backward (the adjoint convolution with three real FFTs, reusing the forward
spectra), cheaper than autograd's generic rule for a zero-padded ``rfft``, which runs
complex FFTs (see ``benchmarks/conv.py``); first-order gradients only (the reference
backend supports higher orders).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mixstack.kernels.backends import (
    BackendPolicy,
    dispatch,
    register_backend,
)
from mixstack.kernels.common import compute_dtype, document_runs

KERNEL = "fftconv"
Mode = Literal["causal", "two_sided", "circular"]
MODES: tuple[str, ...] = ("causal", "two_sided", "circular")


# -- helpers ---------------------------------------------------------------------------------


@lru_cache(maxsize=4096)
def next_fast_size(n: int) -> int:
    """Smallest ``m >= n`` of the form ``2^a · 3^b · 5^c`` (pocketfft / cuFFT fast sizes).

    Such a size is at most ~1.1·n for large n, against up to 2·n for the next power of
    two, and every FFT library runs it at full speed. Cached: it sits on the hot path.
    """
    if n <= 1:
        return 1
    best = 1 << (n - 1).bit_length()  # the next power of two is always a candidate
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:  # complete with powers of two
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


def _check_args(
    u: Tensor, k: Tensor, mode: str, k_back: Tensor | None, seq_idx: Tensor | None
) -> None:
    """Raise ``ValueError`` naming the mismatch (kernels get shapes from code, not users)."""
    if mode not in MODES:
        raise ValueError(f"fftconv: mode must be one of {', '.join(MODES)}, got {mode!r}")
    if u.dim() != 3:
        raise ValueError(f"fftconv expects u (B, D, L), got shape {tuple(u.shape)}")
    B, D, _ = u.shape
    for name, t in (("k", k), ("k_back", k_back)):
        if t is None:
            continue
        ok = (t.dim() == 2 and t.shape[0] == D) or (t.dim() == 3 and t.shape[:2] == (B, D))
        least = 1 if name == "k" else 0  # a backward kernel may be empty (L = 1 callers)
        if not ok or t.shape[-1] < least:
            raise ValueError(
                f"fftconv: {name} must be (D, K) = ({D}, K) or (B, D, K) = ({B}, {D}, K) "
                f"with K >= {least} for u {tuple(u.shape)}; got {tuple(t.shape)}"
            )
    if (mode == "two_sided") != (k_back is not None):
        raise ValueError(
            f"fftconv: k_back (the kernel of lags -1..-Kb) is required by mode 'two_sided' "
            f"and only by it; got mode {mode!r} with k_back "
            f"{'given' if k_back is not None else 'missing'}"
        )
    if seq_idx is not None:
        if seq_idx.shape != (B, u.shape[2]):
            raise ValueError(
                f"fftconv: seq_idx must be (B, L) = {(B, u.shape[2])}, got {tuple(seq_idx.shape)}"
            )
        if mode == "circular":
            raise ValueError(
                "fftconv: circular convolution has the row length as its period, so packed "
                "documents (seq_idx) have no circular form; convolve each document alone"
            )


def _taps(k: Tensor | None) -> int:
    return 0 if k is None else k.shape[-1]


# -- reference: direct convolution, one tap at a time ------------------------------------------


def _shift_right(x: Tensor, j: int) -> Tensor:
    """``out[..., t] = x[..., t − j]`` (zero where ``t < j``); ``j`` may be negative."""
    L = x.shape[-1]
    if abs(j) >= L:
        return torch.zeros_like(x)
    if j >= 0:
        return F.pad(x[..., : L - j], (j, 0))
    return F.pad(x[..., -j:], (0, -j))


def _tap(k: Tensor, j: int) -> Tensor:
    """Tap j of a (D, K) or (B, D, K) kernel as a broadcastable (1|B, D, 1) column."""
    col = k[..., j : j + 1]
    return col if col.dim() == 3 else col[None]


def _direct(u: Tensor, k: Tensor, k_back: Tensor | None, doc: Tensor | None) -> Tensor:
    """Direct linear convolution of u (B, D, L); ``doc (B, L)`` masks cross-document taps."""
    L = u.shape[-1]
    y = torch.zeros_like(u)
    taps = [(j, _tap(k, j)) for j in range(min(_taps(k), L))]  # lag j: u_{t−j}
    if k_back is not None:
        taps += [(-j, _tap(k_back, j - 1)) for j in range(1, min(_taps(k_back), L - 1) + 1)]
    for lag, w in taps:
        term = w * _shift_right(u, lag)
        if doc is not None:  # same document at t and t − lag (shifted ids of -2 never match)
            same = doc == _shift_right(doc + 2, lag) - 2  # (B, L)
            term = term * same[:, None, :]
        y = y + term
    return y


@register_backend(KERNEL, "reference")
def fftconv_reference(
    u: Tensor,
    k: Tensor,
    *,
    mode: Mode = "causal",
    k_back: Tensor | None = None,
    seq_idx: Tensor | None = None,
) -> Tensor:
    """Direct convolution: ``y_t = Σ_lag k_lag · u_{t−lag}`` tap by tap (see module doc).

    u (B, D, L), k (D, K) | (B, D, K), k_back (D, Kb) | (B, D, Kb) for ``two_sided``,
    seq_idx (B, L) | None -> y (B, D, L) in ``u.dtype``. Packed rows are first compacted
    (padding removed, tokens kept in order), convolved with a same-document mask, and
    put back with zeros at padding.
    """
    _check_args(u, k, mode, k_back, seq_idx)
    f = compute_dtype(u.dtype)
    uf, kf = u.to(f), k.to(f)
    kb = None if k_back is None else k_back.to(f)
    if mode == "circular":
        L = u.shape[-1]
        y = sum(_tap(kf, j) * torch.roll(uf, shifts=j % L, dims=-1) for j in range(_taps(k)))
        return y.to(u.dtype)
    if seq_idx is None:
        return _direct(uf, kf, kb, None).to(u.dtype)
    rows = []
    run, pad = document_runs(seq_idx)
    for b in range(u.shape[0]):
        keep = (~pad[b]).nonzero().squeeze(1)  # positions of the row's tokens, in order
        pick = slice(b, b + 1)
        ub = uf[pick][..., keep]  # (1, D, n)
        kb_row = None if kb is None else (kb[pick] if kb.dim() == 3 else kb)
        yb = _direct(ub, kf[pick] if kf.dim() == 3 else kf, kb_row, run[pick][:, keep])
        rows.append(uf.new_zeros(uf.shape[1:]).index_copy(1, keep, yb[0]))
    return torch.stack(rows).to(u.dtype)


# -- torch: real FFTs ---------------------------------------------------------------------------


class _SpectralConv(torch.autograd.Function):
    """``y = irfft(rfft(u, n) · rfft(κ, n), n)[..., :L]``: the size-n circular convolution
    of u (B, D, L) with κ (D | B×D, K ≤ n), restricted to the first L outputs.

    The backward is its adjoint with real transforms only, reusing the forward spectra:
    ``du = irfft(ĝ · conj(κ̂))[:L]`` and ``dκ = irfft(ĝ · conj(û))[:K]`` (summed over the
    batch in the frequency domain when κ is shared): three real FFTs, where autograd's
    generic rule for a zero-padded ``rfft`` runs two complex FFTs of size n. First-order
    gradients only.
    """

    @staticmethod
    def forward(ctx: Any, u: Tensor, kernel: Tensor, n: int) -> Tensor:
        u_hat, k_hat = torch.fft.rfft(u, n=n), torch.fft.rfft(kernel, n=n)  # (…, D, n//2+1)
        ctx.save_for_backward(u_hat, k_hat)
        ctx.n, ctx.length, ctx.taps = n, u.shape[-1], kernel.shape[-1]
        ctx.shared = kernel.dim() < u.dim()
        return torch.fft.irfft(u_hat * k_hat, n=n)[..., : ctx.length]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        u_hat, k_hat = ctx.saved_tensors
        g_hat = torch.fft.rfft(grad, n=ctx.n)
        du = dk = None
        if ctx.needs_input_grad[0]:
            du = torch.fft.irfft(g_hat * k_hat.conj(), n=ctx.n)[..., : ctx.length]
        if ctx.needs_input_grad[1]:
            cross = g_hat * u_hat.conj()  # (B, D, n//2+1)
            if ctx.shared:
                cross = cross.sum(dim=0)
            dk = torch.fft.irfft(cross, n=ctx.n)[..., : ctx.taps]
        return du, dk, None


def _spectral_conv(u: Tensor, kernel: Tensor, n: int) -> Tensor:
    """:class:`_SpectralConv` when gradients are tracked; otherwise the same product
    computed in place (one spectrum buffer less)."""
    if torch.is_grad_enabled() and (u.requires_grad or kernel.requires_grad):
        return _SpectralConv.apply(u, kernel, n)
    spectrum = torch.fft.rfft(u, n=n).mul_(torch.fft.rfft(kernel, n=n))
    return torch.fft.irfft(spectrum, n=n)[..., : u.shape[-1]]


def _fft_linear(u: Tensor, k: Tensor, k_back: Tensor | None) -> Tensor:
    """Linear (causal or two-sided) convolution of u (B, D, L) in u's dtype (fp32/fp64).

    Taps are clipped to what L can use; the FFT size leaves room for both directions:
    lag ``−j`` lives at index ``n − j``, never reached by a forward lag.
    """
    L = u.shape[-1]
    kf = k[..., : min(_taps(k), L)]
    kb = None if k_back is None else k_back[..., : min(_taps(k_back), L - 1)]
    n_back = _taps(kb)
    n = next_fast_size(L + max(_taps(kf) - 1, n_back))
    if n_back:
        gap = n - _taps(kf) - n_back
        zeros = kf.new_zeros(*kf.shape[:-1], gap)
        kernel = torch.cat([kf, zeros, kb.flip(-1)], dim=-1)  # (…, D, n)
    else:
        kernel = kf
    return _spectral_conv(u, kernel, n)


def _fft_circular(u: Tensor, k: Tensor) -> Tensor:
    """Circular convolution with period L; a kernel longer than L is folded first."""
    L = u.shape[-1]
    K = _taps(k)
    if K > L:
        periods = math.ceil(K / L)
        k = F.pad(k, (0, periods * L - K)).unflatten(-1, (periods, L)).sum(dim=-2)
    return _spectral_conv(u, k, L)


def _packed_layout(seq_idx: Tensor, taps: int, taps_back: int) -> tuple[Tensor, Tensor, int, int]:
    """Where each token goes in a re-laid-out row with zero gaps between documents.

    -> (position (B, L) of every token (0 at padding), pad (B, L), new row length,
    longest document). The gap is the longest lag any document can use, so once the
    kernels are clipped to that, no tap reaches another document; padding is dropped.
    """
    run, pad = document_runs(seq_idx)
    B, L = seq_idx.shape
    real = (~pad).long()
    doc_len = torch.zeros(B, L + 1, dtype=torch.long, device=seq_idx.device)
    doc_len.scatter_add_(1, run, real)  # tokens per (row, document)
    longest = int(doc_len.max())
    gap = max(min(taps, longest) - 1, min(taps_back, longest - 1), 0)
    slot = real.cumsum(dim=1) - 1  # rank of each token in its row
    position = torch.where(pad, 0, slot + run * gap)
    length = int(position.max()) + 1 if longest > 0 else 0
    return position, pad, length, longest


def _fft_packed(u: Tensor, k: Tensor, k_back: Tensor | None, seq_idx: Tensor) -> Tensor:
    """Scatter tokens into gapped rows, one batched FFT convolution, gather back."""
    B, D, L = u.shape
    position, pad, length, longest = _packed_layout(seq_idx, _taps(k), _taps(k_back))
    if length == 0:  # nothing but padding
        return torch.zeros_like(u)
    k = k[..., :longest]  # no document uses a longer lag; longer taps would cross gaps
    k_back = None if k_back is None else k_back[..., : longest - 1]
    target = torch.where(pad, length, position)[:, None, :].expand(B, D, L)
    spread = u.new_zeros(B, D, length + 1).scatter(2, target, u)[..., :length]
    y = _fft_linear(spread, k, k_back)  # (B, D, length)
    y = y.gather(2, position[:, None, :].expand(B, D, L))
    return y.masked_fill(pad[:, None, :], 0.0)


@register_backend(KERNEL, "torch")
def fftconv_torch(
    u: Tensor,
    k: Tensor,
    *,
    mode: Mode = "causal",
    k_back: Tensor | None = None,
    seq_idx: Tensor | None = None,
) -> Tensor:
    """Real-FFT convolution; contract of :func:`fftconv_reference` (see module doc)."""
    _check_args(u, k, mode, k_back, seq_idx)
    f = compute_dtype(u.dtype)
    uf, kf = u.to(f), k.to(f)
    kb = None if k_back is None else k_back.to(f)
    if mode == "circular":
        y = _fft_circular(uf, kf)
    elif seq_idx is None:
        y = _fft_linear(uf, kf, kb)
    else:
        y = _fft_packed(uf, kf, kb, seq_idx)
    return y.to(u.dtype)


# -- dispatcher ---------------------------------------------------------------------------------


def fftconv(
    u: Tensor,
    k: Tensor,
    *,
    mode: Mode = "causal",
    k_back: Tensor | None = None,
    seq_idx: Tensor | None = None,
    backends: BackendPolicy | None = None,
) -> Tensor:
    """The long convolution through the backend ``backends`` picks for ``u``'s device and
    dtype (``None``: ``auto``); arguments and result as in :func:`fftconv_reference`."""
    return dispatch(KERNEL, locals())


# -- layout helper for mixers -----------------------------------------------------------------


def fftconv_heads(
    policy: BackendPolicy,
    v: Tensor,
    k: Tensor,
    *,
    mode: Mode = "causal",
    k_back: Tensor | None = None,
    seq_idx: Tensor | None = None,
) -> Tensor:
    """``fftconv`` on the mixers' value layout: v (B, L, H, P) -> (B, L, H, P).

    Head h is convolved with ``k[h]`` (or ``k[b, h]``), every one of its P columns alike,
    so the result is linear in v for any P (the matrix view feeds P = L). The P columns
    become batch rows of the kernel call; the backend comes from ``policy``.
    """
    B, L, H, P = v.shape
    u = v.permute(0, 3, 2, 1).reshape(B * P, H, L)  # row b·P + p

    def per_row(t: Tensor | None) -> Tensor | None:
        return t.repeat_interleave(P, dim=0) if t is not None and t.dim() == 3 else t

    seq = None if seq_idx is None else seq_idx.repeat_interleave(P, dim=0)
    y = fftconv(u, per_row(k), mode=mode, k_back=per_row(k_back), seq_idx=seq, backends=policy)
    return y.reshape(B, P, H, L).permute(0, 3, 2, 1)


def fftconv_flops(length: int, channels: int) -> float:
    """Forward FLOPs of one causal FFT convolution of ``channels`` rows of ``length``
    with a kernel as long: two forward real FFTs and one inverse (≈ 2.5·n·log2 n each at
    the padded size n) plus the complex products (6 per frequency)."""
    n = next_fast_size(2 * length - 1)
    fft = 2.5 * n * math.log2(max(n, 2))
    return channels * (3 * fft + 6 * (n // 2 + 1))
