"""Depthwise short convolutions: causal (Mamba-2, decode) and centred (Hydra).

``x (B, L, C)`` with ``weight (C, K)`` and optional ``bias (C,)``, channel by channel.

* **causal** (kernel ``causal_conv1d``): ``y_t = Σ_k weight[:, k] · x_{t−(K−1)+k} + bias``,
  i.e. left-pad K−1 and keep the first L outputs; ``weight[:, K−1]`` multiplies the
  current input (mamba_ssm / nn.Conv1d layout, docs/math.md#mamba-2). Decode state:
  ``(B, C, K)``, the last **K pre-conv input columns**, oldest first, exactly Mamba-2's
  ``conv_state``; a forward consumes its last K−1 columns, :func:`causal_conv1d_update`
  shifts it left and appends the new input. The final state after a forward is the
  last K columns of ``[initial_state | x]`` (zero-left-padded when there was no
  initial state and L < K).
* **centred** (kernel ``centered_conv1d``): odd K only, padding K//2 on both sides,
  "same" length: ``y_t = Σ_k weight[:, k] · x_{t−K//2+k} + bias`` (Hydra's
  ``nn.Conv1d(padding=K//2)``). No state: it sees the future.

Packed sequences (``seq_idx (B, L)``, −1 = padding; documents as in
:func:`mixstack.kernels.common.document_runs`): padding is **transparent**, as in the
SSD scan: the taps run over the non-padding positions of the row in order, so a pad
anywhere (left, right, inside a document) changes nothing, and its output is 0. An
output only sees inputs of its own document; the initial state's columns belong to
the first document of the row, and the final state holds the last K non-padding
inputs of the last document (zeros for columns of earlier documents), so decoding
continues that document exactly as a longer forward would.

Callers use the dispatchers :func:`causal_conv1d` and :func:`centered_conv1d` (the
references' signatures plus ``backends``, the policy that picks the backend). Backends:
``reference`` (explicit loops), ``torch`` (shifted multiply-adds, any device) and, on
the CPU in float32/bf16/fp16, ``native`` (``csrc/conv.c``: one compiled pass forward
and one backward, silu fused, picked by ``auto`` where a C compiler is found; packed
calls delegate to ``torch``).

``activation`` is ``None`` or ``"silu"``, applied after the bias. Computation runs in
fp32 (fp64 for fp64 inputs) and comes back in ``x.dtype``; states keep ``x.dtype``.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from mixstack.kernels import native
from mixstack.kernels.backends import (
    BackendPolicy,
    dispatch,
    register_backend,
)
from mixstack.kernels.common import compute_dtype, document_runs, zero_padding

CAUSAL = "causal_conv1d"
CENTERED = "centered_conv1d"

Activation = Literal["silu"] | None
ConvResult = Tensor | tuple[Tensor, Tensor]


def _check_args(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    activation: str | None,
    seq_idx: Tensor | None,
    *,
    kernel: str,
) -> None:
    """Raise ``ValueError`` naming the mismatch (kernels get shapes from code)."""
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[2]:
        raise ValueError(
            f"{kernel} expects x (B, L, C) and weight (C, K); got {tuple(x.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if bias is not None and bias.shape != (x.shape[2],):
        raise ValueError(f"{kernel}: bias must be (C,) = ({x.shape[2]},), got {tuple(bias.shape)}")
    if activation not in (None, "silu"):
        raise ValueError(f"{kernel}: activation must be None or 'silu', got {activation!r}")
    if seq_idx is not None and seq_idx.shape != x.shape[:2]:
        raise ValueError(
            f"{kernel}: seq_idx must be (B, L) = {tuple(x.shape[:2])}, got {tuple(seq_idx.shape)}"
        )
    if kernel == CENTERED and weight.shape[1] % 2 == 0:
        raise ValueError(
            f"centered_conv1d needs an odd kernel width (padding K//2 keeps the length only "
            f"then), got K={weight.shape[1]}"
        )


def _check_state(x: Tensor, width: int, state: Tensor | None) -> None:
    if state is not None and state.shape != (x.shape[0], x.shape[2], width):
        raise ValueError(
            f"causal_conv1d: initial_state must be (B, C, K) = "
            f"{(x.shape[0], x.shape[2], width)}, got {tuple(state.shape)}"
        )


def _activate(y: Tensor, activation: str | None) -> Tensor:
    return F.silu(y) if activation == "silu" else y


def _history(x: Tensor, width: int, initial_state: Tensor | None) -> Tensor:
    """The K state columns before x (B, C, K) in ``x.dtype``: the initial state or zeros."""
    if initial_state is None:
        return x.new_zeros(x.shape[0], x.shape[2], width)
    return initial_state.to(x.dtype)


def _output(y: Tensor, x: Tensor, seq_idx: Tensor | None, activation: str | None) -> Tensor:
    """Activation, zero at padding, ``(B, C, L)`` -> ``(B, L, C)`` in ``x.dtype``."""
    y = zero_padding(_activate(y, activation), seq_idx, channel_dim=1)
    return y.transpose(1, 2).to(x.dtype)


# -- reference: explicit loops over rows, positions and taps ----------------------------------


def _row_tokens(seq_idx: Tensor | None, bsz: int, length: int) -> list[list[tuple[int, int]]]:
    """Per row, ``(position, run)`` of every non-padding position, in order."""
    if seq_idx is None:
        return [[(t, 0) for t in range(length)] for _ in range(bsz)]
    run, pad = document_runs(seq_idx)
    return [[(t, int(run[b, t])) for t in range(length) if not pad[b, t]] for b in range(bsz)]


@register_backend(CAUSAL, "reference")
def causal_conv1d_reference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    activation: Activation = None,
    seq_idx: Tensor | None = None,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
) -> ConvResult:
    """Explicit loops: tap k of the r-th token of a row reads token r−(K−1)+k, or state
    column K+(r−(K−1)+k) before the first token; only within the token's document.

    x (B, L, C), weight (C, K), bias (C,) | None, seq_idx (B, L) | None,
    initial_state (B, C, K) | None -> y (B, L, C) [, final_state (B, C, K)].
    """
    _check_args(x, weight, bias, activation, seq_idx, kernel=CAUSAL)
    bsz, length, channels = x.shape
    width = weight.shape[1]
    _check_state(x, width, initial_state)
    f = compute_dtype(x.dtype)
    xs, w, hist = x.to(f), weight.to(f), _history(x, width, initial_state).to(f)
    zero = xs.new_zeros(channels)
    rows = []
    for b, tokens in enumerate(_row_tokens(seq_idx, bsz, length)):
        out = [zero] * length
        for r, (t, run_t) in enumerate(tokens):
            acc = zero if bias is None else bias.to(f)
            for k in range(width):
                s = r - (width - 1) + k
                if s >= 0 and tokens[s][1] == run_t:
                    acc = acc + w[:, k] * xs[b, tokens[s][0]]
                elif s < 0 and run_t == 0:
                    acc = acc + w[:, k] * hist[b, :, width + s]
            out[t] = acc
        rows.append(torch.stack(out, dim=-1))  # (C, L)
    y = _output(torch.stack(rows), x, seq_idx, activation)
    if not return_final_state:
        return y
    return y, _final_state_reference(x, width, initial_state, seq_idx)


def _final_state_reference(
    x: Tensor, width: int, initial_state: Tensor | None, seq_idx: Tensor | None
) -> Tensor:
    """Per row: the last K of [state columns (run 0), tokens], zeroed outside the last run."""
    hist = _history(x, width, initial_state)
    states = []
    for b, tokens in enumerate(_row_tokens(seq_idx, x.shape[0], x.shape[1])):
        cols = [(hist[b, :, k], 0) for k in range(width)] + [(x[b, t], run) for t, run in tokens]
        last_run = cols[-1][1]
        kept = [c if run == last_run else torch.zeros_like(c) for c, run in cols[-width:]]
        states.append(torch.stack(kept, dim=-1))
    return torch.stack(states)


# -- torch: time-major shifted products, or masked ones over the non-padding tokens ----------


class _Compacted(NamedTuple):
    """Non-padding tokens of each row moved to the front, in order.

    x (B, C, L): slots 0..n−1 hold the row's tokens, later slots 0; run (B, L): their
    document runs, −1 in unused slots; slot (B, L): slot of each position (−1 before
    the first token); pad (B, L); count (B,): n per row.
    """

    x: Tensor
    run: Tensor
    slot: Tensor
    pad: Tensor
    count: Tensor


def _compact(xt: Tensor, seq_idx: Tensor) -> _Compacted:
    """xt (B, C, L) -> its tokens without padding (see :class:`_Compacted`)."""
    bsz, channels, length = xt.shape
    run, pad = document_runs(seq_idx)
    slot = (~pad).long().cumsum(dim=1) - 1  # (B, L)
    target = torch.where(pad, length, slot)  # padding goes to a dropped extra slot
    xc = xt.new_zeros(bsz, channels, length + 1).scatter(
        2, target[:, None, :].expand(bsz, channels, length), xt
    )[..., :length]
    runc = run.new_full((bsz, length + 1), -1).scatter(1, target, run)[:, :length]
    return _Compacted(xc, runc, slot, pad, (~pad).sum(dim=1))


def _uncompact(yc: Tensor, comp: _Compacted) -> Tensor:
    """(B, C, L) per slot -> per position; 0 at padding."""
    index = comp.slot.clamp(min=0)[:, None, :].expand_as(yc)
    return yc.gather(2, index).masked_fill(comp.pad[:, None, :], 0.0)


def _shift_sum(
    ext: Tensor, weight: Tensor, bias: Tensor | None, ext_run: Tensor, length: int, center: int
) -> Tensor:
    """``Σ_k weight[:, k] · ext[:, :, r+k] · [ext_run[r+k] == ext_run[r+center]]``.

    ext (B, C, L+K−1) with runs (B, L+K−1); output slot r sits at ext index r + center.
    -> (B, C, L). Unused slots carry run −1 and never match a token's run.
    """
    w = weight.to(ext.dtype)
    here = ext_run[:, center : center + length]  # (B, L)
    y = ext.new_zeros(ext.shape[0], ext.shape[1], length)
    for k in range(weight.shape[1]):
        visible = (ext_run[:, k : k + length] == here).to(ext.dtype)  # (B, L)
        y = y + w[:, k, None] * ext[:, :, k : k + length] * visible[:, None, :]
    return y if bias is None else y + bias.to(ext.dtype)[:, None]


def _packed_final_state(hist: Tensor, comp: _Compacted, dtype: torch.dtype) -> Tensor:
    """Last K columns of [hist | tokens] per row, zeroed outside the last document."""
    width = hist.shape[-1]
    ext = torch.cat([hist.to(comp.x.dtype), comp.x], dim=-1)  # (B, C, K + L)
    ext_run = F.pad(comp.run, (width, 0), value=0)  # state columns: the first document
    index = comp.count[:, None] + torch.arange(width, device=ext.device)  # (B, K)
    cols = ext.gather(2, index[:, None, :].expand(-1, ext.shape[1], -1))
    runs = ext_run.gather(1, index)
    return (cols * (runs == runs[:, -1:])[:, None, :].to(cols.dtype)).to(dtype)


class _TimeMajorConv(torch.autograd.Function):
    """Depthwise "valid" convolution over time-major ``ext (B, L+K−1, C)``, optionally
    followed by silu: ``y[:, t] = act(Σ_k weight[:, k] · ext[:, t+k] + bias)`` -> (B, L, C).

    In this layout every tap is a contiguous slice and the K multiply-adds run over the
    channels innermost, so neither the forward nor the backward transposes. The backward
    is written out: ``g = grad · act'(pre)`` once (silu's derivative on contiguous
    tensors; mixed-stride silu backward runs several times slower on CPU), then
    ``d ext[:, t+k] += weight[:, k] · g[:, t]`` and ``d weight[:, k] = Σ g · ext[:, k:k+L]``.
    Replaces ``F.conv1d(groups=C)`` on the transposed input, whose CPU backward dominated
    the Mamba-2 layer's conv time (docs/performance.md).
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        ext: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        silu: bool,
    ) -> Tensor:
        width = weight.shape[1]
        length = ext.shape[1] - width + 1
        wt = weight.t()  # (K, C): row k broadcasts over (B, L, C)
        pre = ext[:, width - 1 :] * wt[width - 1]
        for k in range(width - 1):
            pre.addcmul_(ext[:, k : k + length], wt[k])
        if bias is not None:
            pre.add_(bias)
        ctx.save_for_backward(ext, weight, pre if silu else None)
        ctx.has_bias, ctx.silu = bias is not None, silu
        return F.silu(pre) if silu else pre

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: Tensor
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        ext, weight, pre = ctx.saved_tensors
        width = weight.shape[1]
        length = ext.shape[1] - width + 1
        grad = grad.contiguous()
        g = torch.ops.aten.silu_backward(grad, pre) if ctx.silu else grad  # (B, L, C)
        d_ext = d_weight = d_bias = None
        if ctx.needs_input_grad[0]:
            d_ext = ext.new_zeros(ext.shape)
            wt = weight.t()
            for k in range(width):
                d_ext[:, k : k + length].addcmul_(g, wt[k])
        # the reductions over B·L stay in the compute dtype: torch's CPU sum is a cascade
        # (blocked) summation, 1.3e-7 relative to fp64 at L = 2048; summing in fp64
        # instead cast every (B·L, C) product to a copy first, a third of this backward
        if ctx.needs_input_grad[1]:
            flat = g.reshape(-1, g.shape[-1])  # (B·L, C)
            d_weight = torch.stack(
                [(flat * ext[:, k : k + length].reshape(flat.shape)).sum(0) for k in range(width)],
                dim=1,
            ).to(weight.dtype)  # (C, K)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            d_bias = g.sum(dim=(0, 1))
        return d_ext, d_weight, d_bias, None


@register_backend(CAUSAL, "torch")
def causal_conv1d_torch(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    activation: Activation = None,
    seq_idx: Tensor | None = None,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
) -> ConvResult:
    """K shifted multiply-adds over the time-major state-padded input (a custom
    autograd function, :class:`_TimeMajorConv`). With seq_idx: padding removed
    by a scatter, K masked shifted products (a document mask depends on the output
    position, which one convolution cannot express), gathered back. Contract of
    :func:`causal_conv1d_reference`."""
    _check_args(x, weight, bias, activation, seq_idx, kernel=CAUSAL)
    width = weight.shape[1]
    _check_state(x, width, initial_state)
    f = compute_dtype(x.dtype)
    hist = _history(x, width, initial_state)  # (B, C, K)
    if seq_idx is None:
        # time-major (B, K−1+L, C): every tap is a contiguous slice, no transposes
        ext = torch.cat([hist[..., 1:].transpose(1, 2).to(f), x.to(f)], dim=1)
        b = bias.to(f) if bias is not None else None
        y = _TimeMajorConv.apply(ext, weight.to(f), b, activation == "silu").to(x.dtype)
        if not return_final_state:
            return y
        # only the last K columns: no full-length copy of x
        final = torch.cat([hist, x[:, -width:].transpose(1, 2)], dim=-1)[..., -width:]
        return y, final.contiguous()
    xt = x.to(f).transpose(1, 2)  # (B, C, L)
    comp = _compact(xt, seq_idx)
    ext = torch.cat([hist[..., 1:].to(f), comp.x], dim=-1)
    ext_run = F.pad(comp.run, (width - 1, 0), value=0)
    y = _uncompact(_shift_sum(ext, weight, bias, ext_run, x.shape[1], width - 1), comp)
    final = _packed_final_state(hist, comp, x.dtype) if return_final_state else None
    y = _output(y, x, seq_idx, activation)
    return (y, final.contiguous()) if final is not None else y


# -- native: csrc/conv.c, forward and backward fused over the channels ------------------------

_UNIT_CHANNELS = 64  # csrc/conv.c's BLOCK: channels per work unit


@functools.cache
def _conv_library() -> ctypes.CDLL:
    """csrc/conv.c, with its entry points' argument types declared."""
    return _declare_conv(native.load("conv"))


def _declare_conv(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the argument and return types of a build of csrc/conv.c."""
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p
    return native.declare(
        lib,
        {
            "conv_forward": [i64, i64, ptr, i64, i64, *[ptr] * 4, *[i64] * 5, i32],
            "conv_backward": [
                i64, i64, ptr, i64, i64, *[ptr] * 4, i64, i64, *[ptr] * 4, *[i64] * 5, i32,
            ],
        },
    )  # fmt: skip


def _rows(t: Tensor) -> tuple[ctypes.c_void_p, int, int]:
    """Pointer, batch and time strides of a (B, L, C) float32 CPU tensor whose channels
    are contiguous (a slice of a wider projection is read in place, not copied)."""
    return ctypes.c_void_p(t.data_ptr()), t.stride(0), t.stride(1)


def _channels_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(2) == 1 or t.shape[2] == 1 else t.contiguous()


class _NativeConv(torch.autograd.Function):
    """Depthwise convolution in ``csrc/conv.c``: ``x (B, L, C)`` float32 (channels
    contiguous, any batch and time strides), ``head (B, off, C)`` the time-major rows
    before x (None: zeros), ``wt (K, C)``, ``bias (C,) | None`` -> y (B, L, C) with
    ``y[:, t] = act(bias + Σ_k wt[k] · ext[:, t+k])`` over ``ext = [head | x | 0]``
    (``off = K−1``: causal; ``off = K//2`` with no head: centred). The backward
    recomputes the pre-activation and returns the gradients of x, head, wt and bias
    in one pass over time.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        head: Tensor | None,
        wt: Tensor,
        bias: Tensor | None,
        off: int,
        silu: bool,
    ) -> Tensor:
        bsz, length, channels = x.shape
        y = x.new_empty(bsz, length, channels)
        native.run_units(
            _conv_library().conv_forward,
            -(-channels // _UNIT_CHANNELS),
            *_rows(x), *map(native.pointer, (head, wt, bias, y)),
            bsz, length, channels, wt.shape[0], off, int(silu),
        )  # fmt: skip
        ctx.save_for_backward(x, head, wt, bias)
        ctx.off, ctx.silu = off, silu
        return y

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: Tensor
    ) -> tuple[Tensor | None, Tensor | None, Tensor, Tensor | None, None, None]:
        x, head, wt, bias = ctx.saved_tensors
        bsz, length, channels = x.shape
        grad = _channels_contiguous(grad)
        # x or the state without a gradient: those rows are not written at all
        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        d_head = None
        if head is not None and ctx.needs_input_grad[1]:
            d_head = torch.empty_like(head)
        d_wt = torch.empty_like(wt)
        d_bias = torch.empty_like(bias) if bias is not None else None
        native.run_units(
            _conv_library().conv_backward,
            -(-channels // _UNIT_CHANNELS),
            *_rows(x), *map(native.pointer, (head, wt, bias)), *_rows(grad),
            *map(native.pointer, (dx, d_head, d_wt, d_bias)),
            bsz, length, channels, wt.shape[0], ctx.off, int(ctx.silu),
        )  # fmt: skip
        return dx, d_head, d_wt, d_bias, None, None


def _native_conv(
    x: Tensor, weight: Tensor, bias: Tensor | None, head: Tensor | None, off: int, silu: bool
) -> Tensor:
    """:class:`_NativeConv` in float32 on x's dtype -> y (B, L, C) in ``x.dtype``."""
    f = torch.float32
    xf = _channels_contiguous(x.to(f))
    wt = weight.to(f).t().contiguous()  # (K, C): tap k's weights contiguous over channels
    b = bias.to(f).contiguous() if bias is not None else None
    return _NativeConv.apply(xf, head, wt, b, off, silu).to(x.dtype)


@native.register(CAUSAL, "conv")
def causal_conv1d_native(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    activation: Activation = None,
    seq_idx: Tensor | None = None,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
) -> ConvResult:
    """The time-major convolution of :func:`causal_conv1d_torch` in compiled C
    (``csrc/conv.c``): one pass forward, one backward, silu fused, x read in place.
    CPU, computed in float32; packed calls (``seq_idx``) take the torch path. Contract
    of :func:`causal_conv1d_reference`."""
    if seq_idx is not None:
        return causal_conv1d_torch(
            x, weight, bias, activation=activation, seq_idx=seq_idx,
            initial_state=initial_state, return_final_state=return_final_state,
        )  # fmt: skip
    _check_args(x, weight, bias, activation, seq_idx, kernel=CAUSAL)
    width = weight.shape[1]
    _check_state(x, width, initial_state)
    # the state's last K−1 columns, time-major (B, K−1, C); None: zeros, nothing to copy
    head = None
    if initial_state is not None:
        # through x's dtype first, as the torch path's history
        hist = _history(x, width, initial_state)[..., 1:]
        head = hist.transpose(1, 2).to(torch.float32).contiguous()
    y = _native_conv(x, weight, bias, head, width - 1, activation == "silu")
    if not return_final_state:
        return y
    hist = _history(x, width, initial_state)
    final = torch.cat([hist, x[:, -width:].transpose(1, 2)], dim=-1)[..., -width:]
    return y, final.contiguous()


def causal_conv1d_update(
    x_t: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    activation: Activation = None,
) -> Tensor:
    """One decoding step: shift ``conv_state`` left, append ``x_t``, convolve.

    x_t (B, C), conv_state (B, C, K) updated in place, weight (C, K), bias (C,) | None
    -> y_t (B, C) in ``x_t.dtype``.
    """
    if conv_state.shape != (*x_t.shape, weight.shape[1]) or weight.shape[0] != x_t.shape[1]:
        raise ValueError(
            f"causal_conv1d_update expects x_t (B, C), conv_state (B, C, K), weight (C, K); "
            f"got {tuple(x_t.shape)}, {tuple(conv_state.shape)}, {tuple(weight.shape)}"
        )
    if activation not in (None, "silu"):
        raise ValueError(
            f"causal_conv1d_update: activation must be None or 'silu', got {activation!r}"
        )
    # The shifted window is a new tensor: autograd may save it, and conv_state, which is
    # overwritten in place at every step, never is (backward through steps works).
    window = torch.cat([conv_state[..., 1:], x_t[..., None].to(conv_state.dtype)], dim=-1)
    conv_state.copy_(window)  # (B, C, K)
    f = compute_dtype(x_t.dtype)
    y = (window.to(f) * weight.to(f)).sum(dim=-1)  # (B, C)
    if bias is not None:
        y = y + bias.to(f)
    return _activate(y, activation).to(x_t.dtype)


# -- centred (Hydra) ---------------------------------------------------------------------------


@register_backend(CENTERED, "reference")
def centered_conv1d_reference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    activation: Activation = None,
    seq_idx: Tensor | None = None,
) -> Tensor:
    """Explicit loops: tap k of the r-th token of a row reads token r−K//2+k when it
    exists and is in the same document (zero otherwise).

    x (B, L, C), weight (C, K) with K odd, bias (C,) | None, seq_idx (B, L) | None
    -> y (B, L, C).
    """
    _check_args(x, weight, bias, activation, seq_idx, kernel=CENTERED)
    bsz, length, channels = x.shape
    half = weight.shape[1] // 2
    f = compute_dtype(x.dtype)
    xs, w = x.to(f), weight.to(f)
    zero = xs.new_zeros(channels)
    rows = []
    for b, tokens in enumerate(_row_tokens(seq_idx, bsz, length)):
        out = [zero] * length
        for r, (t, run_t) in enumerate(tokens):
            acc = zero if bias is None else bias.to(f)
            for k in range(weight.shape[1]):
                s = r - half + k
                if 0 <= s < len(tokens) and tokens[s][1] == run_t:
                    acc = acc + w[:, k] * xs[b, tokens[s][0]]
            out[t] = acc
        rows.append(torch.stack(out, dim=-1))  # (C, L)
    return _output(torch.stack(rows), x, seq_idx, activation)


@register_backend(CENTERED, "torch")
def centered_conv1d_torch(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    activation: Activation = None,
    seq_idx: Tensor | None = None,
) -> Tensor:
    """Time-major shifted multiply-adds with K//2 zeros on each side (with seq_idx:
    masked shifted products over the non-padding tokens); contract of
    :func:`centered_conv1d_reference`."""
    _check_args(x, weight, bias, activation, seq_idx, kernel=CENTERED)
    half = weight.shape[1] // 2
    f = compute_dtype(x.dtype)
    if seq_idx is None:  # time-major, as the causal path: (B, half+L+half, C)
        ext = F.pad(x.to(f), (0, 0, half, half))
        b = bias.to(f) if bias is not None else None
        return _TimeMajorConv.apply(ext, weight.to(f), b, activation == "silu").to(x.dtype)
    comp = _compact(x.to(f).transpose(1, 2), seq_idx)  # (B, C, L) per slot
    ext = F.pad(comp.x, (half, half))
    ext_run = F.pad(comp.run, (half, half), value=-1)  # outside the row: never visible
    y = _uncompact(_shift_sum(ext, weight, bias, ext_run, x.shape[1], half), comp)
    return _output(y, x, seq_idx, activation)


@native.register(CENTERED, "conv")
def centered_conv1d_native(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    activation: Activation = None,
    seq_idx: Tensor | None = None,
) -> Tensor:
    """The centred convolution in compiled C (``csrc/conv.c``, K//2 virtual zero rows
    on each side: no padded copy of x); packed calls take the torch path. CPU, float32;
    contract of :func:`centered_conv1d_reference`."""
    if seq_idx is not None:
        return centered_conv1d_torch(x, weight, bias, activation=activation, seq_idx=seq_idx)
    _check_args(x, weight, bias, activation, seq_idx, kernel=CENTERED)
    return _native_conv(x, weight, bias, None, weight.shape[1] // 2, activation == "silu")


# -- dispatchers -------------------------------------------------------------------------------


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    activation: Activation = None,
    seq_idx: Tensor | None = None,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
    backends: BackendPolicy | None = None,
) -> ConvResult:
    """The causal short convolution through the backend ``backends`` picks for ``x``'s
    device and dtype (``None``: ``auto``); contract of :func:`causal_conv1d_reference`."""
    return dispatch(CAUSAL, locals())


def centered_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    activation: Activation = None,
    seq_idx: Tensor | None = None,
    backends: BackendPolicy | None = None,
) -> Tensor:
    """The centred short convolution through the backend ``backends`` picks for ``x``'s
    device and dtype (``None``: ``auto``); contract of :func:`centered_conv1d_reference`."""
    return dispatch(CENTERED, locals())
