"""The state-space-dual (SSD) scan of Mamba-2, shared with Hydra (docs/math.md#mamba-2, #hydra).

Per head ``h`` (group ``g(h) = h // (H/G)``) the state ``S ∈ R^{P×N}`` follows

    S_t = exp(Δ_t A_h)·S_{t−1} + Δ_t · x_t B_tᵀ,      y_t = S_t C_t (+ D_h x_t)

Inputs: ``x (B, L, H, P)``, ``dt (B, L, H)`` (already softplus'ed and clamped: Δ),
``A (H,)`` negative, ``B (B, L, G, N)``, ``C (B, L, G, N)``. The output is linear
in ``x`` for fixed ``(dt, A, B, C)``, which is what the mixers' matrix view relies on.
Hydra calls it with ``D=None`` on the batch-concatenation of its forward stream and
its time-flipped backward stream; nothing here assumes causality of the caller.

Backends (one signature, :func:`ssd_scan_reference`):

* ``reference``: the recurrence above, one step at a time. Readable; tests only.
* ``torch``: the chunked algorithm: quadratic (attention-like) within a chunk of
  ``chunk_size`` steps, a **linear** sequential scan of chunk states across chunks.
  Segment sums are built in fp32 by mask-then-cumsum and masked to −∞ *before*
  ``exp``, so neither forward nor backward produces NaN for large Δ (docs/math.md#pitfalls).

:func:`ssd_scan_chunked` with ``quadratic_states=True`` is ssd_minimal's variant
whose state passing is quadratic in the number of chunks; no policy picks it, it is a
baseline for ``benchmarks/ssm.py``. Callers use the dispatcher :func:`ssd_scan`.

Packed sequences (``seq_idx (B, L)``, document ids, −1 for padding): the state is
zeroed where a new document starts (a non-padding position whose id differs from the
previous non-padding position's), and padding positions are inert: they neither decay
nor inject, and their output is 0. ``initial_state`` belongs to the first document of
each row. The final state is the state after the last position.

Computation runs in fp32 (fp64 for fp64 inputs); ``y`` comes back in ``x.dtype`` and
the final state in the compute dtype.
"""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

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

KERNEL = "ssd_scan"

ScanResult = Tensor | tuple[Tensor, Tensor]


def _check_args(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None,
    seq_idx: Tensor | None,
    initial_state: Tensor | None,
) -> None:
    """Raise ``ValueError`` naming the mismatch (kernels get shapes from code)."""
    if x.dim() != 4 or dt.dim() != 3 or A.dim() != 1 or B.dim() != 4 or C.dim() != 4:
        raise ValueError(
            "ssd_scan expects x (B, L, H, P), dt (B, L, H), A (H,), B and C (B, L, G, N); got "
            f"{tuple(x.shape)}, {tuple(dt.shape)}, {tuple(A.shape)}, {tuple(B.shape)}, "
            f"{tuple(C.shape)}"
        )
    bsz, length, heads, hdim = x.shape
    groups, nstate = B.shape[2], B.shape[3]
    if dt.shape != (bsz, length, heads) or A.shape != (heads,):
        raise ValueError(
            f"ssd_scan: dt {tuple(dt.shape)} / A {tuple(A.shape)} do not match x "
            f"{tuple(x.shape)} (need dt (B, L, H), A (H,))"
        )
    if B.shape != C.shape or B.shape[:2] != (bsz, length) or heads % groups != 0:
        raise ValueError(
            f"ssd_scan: B {tuple(B.shape)} and C {tuple(C.shape)} must both be (B, L, G, N) "
            f"with B, L of x and H={heads} a multiple of G"
        )
    if D is not None and D.shape not in ((heads,), (heads, hdim)):
        raise ValueError(
            f"ssd_scan: D must be (H,) or (H, P) = ({heads}, {hdim}), got {tuple(D.shape)}"
        )
    if seq_idx is not None and seq_idx.shape != (bsz, length):
        raise ValueError(
            f"ssd_scan: seq_idx must be (B, L) = {(bsz, length)}, got {tuple(seq_idx.shape)}"
        )
    if initial_state is not None and initial_state.shape != (bsz, heads, hdim, nstate):
        raise ValueError(
            f"ssd_scan: initial_state must be (B, H, P, N) = {(bsz, heads, hdim, nstate)}, "
            f"got {tuple(initial_state.shape)}"
        )
    if chunk_size < 1 or length < 1:
        raise ValueError(
            f"ssd_scan: chunk_size and length must be >= 1, got chunk_size "
            f"{chunk_size} and x {tuple(x.shape)}"
        )


def _skip(x: Tensor, D: Tensor | None) -> Tensor | float:
    """The ``D x`` skip term, ``x (B, L, H, P)``; D is (H,) or (H, P)."""
    if D is None:
        return 0.0
    d = D.to(x.dtype)
    return x * (d[:, None] if d.dim() == 1 else d)


def _finish(
    y: Tensor, state: Tensor, out_dtype: torch.dtype, return_final_state: bool
) -> ScanResult:
    y = y.to(out_dtype)
    return (y, state) if return_final_state else y


# -- reference: the recurrence, one step at a time -------------------------------------------


def recurrence_step(
    state: Tensor, x_t: Tensor, dt_t: Tensor, A: Tensor, B_t: Tensor, C_t: Tensor
) -> tuple[Tensor, Tensor]:
    """One step without the D skip, out of place.

    ``state (B, H, P, N)``, ``x_t (B, H, P)``, ``dt_t (B, H)``, ``A (H,)``,
    ``B_t, C_t (B, G, N)`` -> ``(new_state (B, H, P, N), y_t (B, H, P))``.
    """
    rep = x_t.shape[1] // B_t.shape[1]  # heads per group
    B_h = B_t.repeat_interleave(rep, dim=1)  # (B, H, N)
    C_h = C_t.repeat_interleave(rep, dim=1)  # (B, H, N)
    decay = torch.exp(dt_t * A)  # (B, H)
    inject = (dt_t[..., None] * x_t)[..., None] * B_h[:, :, None, :]  # (B, H, P, N)
    new_state = decay[..., None, None] * state + inject
    y_t = torch.einsum("bhpn,bhn->bhp", new_state, C_h)
    return new_state, y_t


@register_backend(KERNEL, "reference")
def ssd_scan_reference(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    *,
    chunk_size: int = 256,
    D: Tensor | None = None,
    seq_idx: Tensor | None = None,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
) -> ScanResult:
    """SSD as the plain recurrence (``chunk_size`` is accepted and ignored).

    x (B, L, H, P), dt (B, L, H), A (H,), B/C (B, L, G, N), D (H,) | (H, P) | None,
    seq_idx (B, L) | None, initial_state (B, H, P, N) | None ->
    y (B, L, H, P) [, final_state (B, H, P, N)].
    """
    _check_args(x, dt, A, B, C, chunk_size, D, seq_idx, initial_state)
    f = compute_dtype(x.dtype)
    bsz, _, heads, hdim = x.shape
    xs, dts, A_, Bs, Cs = (t.to(f) for t in (x, dt, A, B, C))
    live = starts = None
    if seq_idx is not None:
        run, pad = document_runs(seq_idx)
        live = (~pad).to(f)  # (B, L): 0 at padding
        starts = torch.diff(run, dim=1, prepend=run[:, :1]) > 0  # (B, L)
        xs = xs * live[..., None, None]
    state = x.new_zeros((bsz, heads, hdim, B.shape[-1]), dtype=f)
    if initial_state is not None:
        state = initial_state.to(f)
    ys = []
    # unbind once: indexing [:, t] inside the loop would make backward O(L²) (every
    # select's gradient is a zero-filled full-size tensor)
    steps = zip(xs.unbind(1), dts.unbind(1), Bs.unbind(1), Cs.unbind(1), strict=True)
    for t, (x_t, dt_t, B_t, C_t) in enumerate(steps):
        if live is not None and starts is not None:
            dt_t = dt_t * live[:, t, None]  # padding: no decay, no injection
            state = state * (~starts[:, t]).to(f)[:, None, None, None]  # new document
        state, y_t = recurrence_step(state, x_t, dt_t, A_, B_t, C_t)
        ys.append(y_t)
    y = torch.stack(ys, dim=1) + _skip(xs, D)  # (B, L, H, P)
    if live is not None:
        y = y * live[..., None, None]
    return _finish(y, state, x.dtype, return_final_state)


def ssd_step(
    state: Tensor,
    x_t: Tensor,
    dt_t: Tensor,
    A: Tensor,
    B_t: Tensor,
    C_t: Tensor,
    D: Tensor | None = None,
) -> Tensor:
    """One decoding step; updates ``state`` in place and returns ``y_t``.

    state (B, H, P, N) (kept in its own dtype, fp32 in the mixers), x_t (B, H, P),
    dt_t (B, H), A (H,), B_t/C_t (B, G, N), D (H,) | (H, P) | None -> y_t (B, H, P) in
    ``x_t.dtype``.
    """
    f = state.dtype
    xs = x_t.to(f)
    # Under autograd the step saves the state it reads; it is overwritten below, so read a
    # copy (backward through decoding steps then works; no copy at inference).
    prev = state.clone() if torch.is_grad_enabled() else state
    new_state, y_t = recurrence_step(prev, xs, dt_t.to(f), A.to(f), B_t.to(f), C_t.to(f))
    state.copy_(new_state)
    if D is not None:
        y_t = y_t + _skip(xs[:, None], D)[:, 0]  # (B, H, P)
    return y_t.to(x_t.dtype)


# -- torch: chunked, linear scan over chunks ------------------------------------------------


def segsum(a: Tensor) -> Tensor:
    """``a (..., Q)`` -> ``(..., Q, Q)`` with ``[i, j] = Σ_{k=j+1..i} a_k`` for j <= i, −∞ above.

    Mask-then-cumsum: ``a_i`` is placed in the strictly lower triangle and summed down
    the rows, so no difference of large cumulative sums is ever taken (precision), and
    the upper triangle is −∞ before any ``exp`` (no 0·∞ in backward).
    """
    q = a.shape[-1]
    ones = torch.ones(q, q, dtype=torch.bool, device=a.device)
    rows = a[..., :, None].expand(*a.shape, q)  # (..., Q, Q): [i, j] = a_i
    rows = rows.masked_fill(~torch.tril(ones, diagonal=-1), 0.0)
    return rows.cumsum(dim=-2).masked_fill(~torch.tril(ones), float("-inf"))


class _SegsumExp(torch.autograd.Function):
    """``exp(segsum(a))`` (B..., Q, Q), −∞ (so 0) above the diagonal and, with ``same``
    (B..., Q, Q) bool, wherever ``same`` is False; with a written-out backward.

    Forward: the same mask-then-cumsum as :func:`segsum`, in place on one (Q, Q) buffer
    (no copies for out-of-place masks). Backward, with ``G`` the gradient of the log
    matrix (``grad · decay``, 0 wherever masked): ``∂/∂a_k = Σ_{i>=k} Σ_{j<k} G[i, j]``,
    one prefix sum along the rows and one masked column sum, instead of autograd's
    flip/cumsum/flip and two masked copies over every (Q, Q) block; the gradient matches
    autograd through :func:`segsum` to rounding (tests/kernels/test_ssd.py).
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, a: Tensor, same: Tensor | None) -> Tensor:
        q = a.shape[-1]
        ones = torch.ones(q, q, dtype=torch.bool, device=a.device)
        strict = torch.tril(ones, diagonal=-1).to(a.dtype)
        decay = a[..., :, None] * strict  # (..., Q, Q): [i, j] = a_i for j < i, else 0
        decay.cumsum_(dim=-2)  # [i, j] = Σ_{k=j+1..i} a_k
        decay.masked_fill_(~torch.tril(ones), float("-inf"))
        if same is not None:
            decay.masked_fill_(~same, float("-inf"))
        decay.exp_()
        ctx.save_for_backward(decay)
        return decay

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        (decay,) = ctx.saved_tensors
        g = grad * decay  # (..., Q, Q): gradient of the log matrix, 0 where masked
        # R[i, k] = Σ_{j<k} G[i, j]: a prefix sum along the contiguous rows, started far
        # from the diagonal where the entries are smallest
        rect = g.cumsum(dim=-1).sub_(g)  # (..., Q, Q)
        q = g.shape[-1]
        below = torch.tril(torch.ones(q, q, dtype=torch.bool, device=g.device))  # i >= k
        # ∂/∂a_k = Σ_{i>=k} R[i, k]: every term a sum over the rectangle itself (a
        # difference of whole-row and whole-column sums would cancel: 1e-4 relative error
        # in fp32 gradients of A at L = 2048)
        return rect.masked_fill_(~below, 0.0).sum(dim=-2), None


def segsum_exp(a: Tensor, same: Tensor | None = None) -> Tensor:
    """``exp(segsum(a))`` (..., Q, Q), also 0 where ``same`` (broadcastable bool) is False;
    values and gradients as autograd through :func:`segsum` and ``exp``, faster."""
    if same is not None:
        same = same.expand(*a.shape, a.shape[-1])
    return _SegsumExp.apply(a, same)


def _pad_to_chunks(t: Tensor, extra: int) -> Tensor:
    """Zero-pad dim 1 (time) at the end by ``extra`` steps (Δ = 0, x = 0: inert steps)."""
    if extra == 0:
        return t
    pad = [0, 0] * (t.dim() - 2) + [0, extra]
    return F.pad(t, pad)


def _run_masks(run: Tensor, q: int) -> tuple[Tensor, Tensor, Tensor]:
    """Document masks of chunked runs ``(B, c·Q)``.

    -> same (B, c, Q, Q): positions i, j of a chunk share a document;
       from_prev (B, c, Q): position t continues the document open at the previous
           chunk's end (for c = 0: the first document, which owns the initial state);
       carry (B, c): the state entering chunk c survives to its end.
    """
    runc = run.view(run.shape[0], -1, q)  # (B, c, Q)
    same = runc[..., :, None] == runc[..., None, :]
    prev_end = F.pad(runc[:, :-1, -1], (1, 0), value=0)  # (B, c): run at previous chunk end
    from_prev = runc == prev_end[..., None]
    return same, from_prev, from_prev[..., -1]


class _Chunks(NamedTuple):
    """Inputs in the compute dtype, cut into ``c`` chunks of ``Q`` steps (the last one
    zero-padded: inert steps), heads split as (G, R = H/G).

    xdt (B, c, Q, G, R, P) = x·Δ, in x's own (time-major) layout: the chunk states'
    matmul reads it without a copy; a (B, c, G, R, Q) = Δ·A, the log-decay of each step;
    B, C (B, c, G, Q, N); initial (B, G, R, P, N); with seq_idx the document masks of
    :func:`_run_masks` (same, from_prev, carry) and the document runs (B, c, Q), else None.
    """

    xdt: Tensor
    a: Tensor
    B: Tensor
    C: Tensor
    initial: Tensor
    same: Tensor | None
    from_prev: Tensor | None
    carry: Tensor | None
    run: Tensor | None


def _chunked_inputs(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    q: int,
    seq_idx: Tensor | None,
    initial_state: Tensor | None,
) -> _Chunks:
    """Cast, zero padding (no decay, no input there), pad to whole chunks, regroup."""
    f = compute_dtype(x.dtype)
    bsz, length, heads, hdim = x.shape
    groups, nstate = B.shape[2], B.shape[3]
    rep = heads // groups
    extra = -length % q
    xs, dts = zero_padding(x.to(f), seq_idx), zero_padding(dt.to(f), seq_idx)
    xs, dts, Bs, Cs = (_pad_to_chunks(t, extra) for t in (xs, dts, B.to(f), C.to(f)))
    nc = xs.shape[1] // q
    xdt = (xs * dts[..., None]).view(bsz, nc, q, groups, rep, hdim)
    a = (dts * A.to(f)).view(bsz, nc, q, groups, rep).permute(0, 1, 3, 4, 2).contiguous()
    Bc, Cc = (t.view(bsz, nc, q, groups, nstate).permute(0, 1, 3, 2, 4) for t in (Bs, Cs))
    masks: tuple[Tensor | None, ...] = (None, None, None, None)
    if seq_idx is not None:
        run = document_runs(seq_idx)[0]
        run = F.pad(run, (0, extra), mode="replicate") if extra else run
        masks = (*_run_masks(run, q), run.view(bsz, nc, q))
    initial = xs.new_zeros(bsz, groups, rep, hdim, nstate)
    if initial_state is not None:
        initial = initial_state.to(f).reshape(bsz, groups, rep, hdim, nstate)
    return _Chunks(xdt, a, Bc, Cc, initial, *masks)


def _carry_decays(
    a: Tensor, from_prev: Tensor | None, carry: Tensor | None
) -> tuple[Tensor, Tensor]:
    """How the state entering a chunk decays: a (B, c, G, R, Q) log-decays ->
    over the whole chunk, log (B, c, G, R) (−∞ where a document starts in the chunk),
    and up to each position t, exp (B, c, G, R, Q) (0 where t is in a new document)."""
    a_cum = a.cumsum(dim=-1)  # (B, c, G, R, Q): Σ_{k<=t} a_k <= 0, no differences taken
    chunk_log_decay = a_cum[..., -1]
    enter_decay = torch.exp(a_cum)  # in (0, 1]
    if carry is not None and from_prev is not None:
        chunk_log_decay = chunk_log_decay.masked_fill(~carry[:, :, None, None], float("-inf"))
        enter_decay = enter_decay * from_prev[:, :, None, None]
    return chunk_log_decay, enter_decay


def _scan_chunk_states(states: Tensor, log_decay: Tensor, initial: Tensor) -> tuple[Tensor, Tensor]:
    """Linear state passing: ``S_c = exp(log_decay_c) · S_{c−1} + T_c``.

    states (B, c, G, R, P, N), log_decay (B, c, G, R) (−∞ where a document starts inside
    the chunk), initial (B, G, R, P, N) -> state entering each chunk (B, c, G, R, P, N)
    and the final state.
    """
    decay = torch.exp(log_decay)[..., None, None]  # (B, c, G, R, 1, 1)
    s = initial
    entering = []
    # unbind once: indexing [:, c] in the loop would make backward O(c²) in memory traffic
    for decay_c, state_c in zip(decay.unbind(1), states.unbind(1), strict=True):
        entering.append(s)
        s = decay_c * s + state_c
    return torch.stack(entering, dim=1), s


def _quadratic_chunk_states(
    states: Tensor, log_decay: Tensor, initial: Tensor
) -> tuple[Tensor, Tensor]:
    """ssd_minimal's state passing: one (c+1)×(c+1) segment-sum matrix over chunks.

    Same contract as :func:`_scan_chunk_states`; O(c²) work and memory (benchmark
    baseline). The −∞ of dropped carries propagates through mask-then-cumsum without NaN.
    """
    log_decay = F.pad(log_decay.permute(0, 2, 3, 1), (1, 0))  # (B, G, R, c+1)
    transfer = torch.exp(segsum(log_decay))  # (B, G, R, c+1, c+1)
    all_states = torch.cat([initial[:, None], states], dim=1)  # (B, c+1, G, R, P, N)
    out = torch.einsum("bgrzc,bcgrpn->bzgrpn", transfer, all_states)
    return out[:, :-1], out[:, -1]


def _diagonal_torch(ch: _Chunks) -> Tensor:
    """Step 1, the intra-chunk (diagonal) blocks, attention-like and quadratic in Q, in
    torch ops -> y_diag (B, c, G, R, Q, P)."""
    # decay (B, c, G, R, Q, Q): [i, s] = exp(Σ_{k=s+1..i} a_k), 0 for s > i and, with
    # seq_idx, 0 across documents (no decay path between them)
    decay = segsum_exp(ch.a, None if ch.same is None else ch.same[:, :, None, None])
    # scores (B, c, G, R, Q, Q): C_i·B_s per group (never copied per head), decayed s -> i
    scores = torch.matmul(ch.C, ch.B.transpose(-1, -2))[:, :, :, None] * decay
    xdt_heads = ch.xdt.permute(0, 1, 3, 4, 2, 5)  # (B, c, G, R, Q, P) view
    return torch.matmul(scores, xdt_heads)


@functools.cache
def _ssd_library() -> ctypes.CDLL:
    """csrc/ssd.c, with its entry points' argument types declared."""
    lib = native.load("ssd")
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    signatures = {  # entry point: (pointers, sizes) after the unit range (lo, hi)
        "ssd_diag_forward": (5, 4),
        "ssd_diag_backward": (8, 4),
        "ssd_scan_chunks": (9, 7),
        "ssd_scan_pass": (4, 6),
        "ssd_scan_read": (5, 7),
        "ssd_scan_back_chunks": (5, 7),
        "ssd_scan_back_pass": (6, 6),
        "ssd_scan_back_grads": (16, 7),
    }
    return native.declare(
        lib,
        {
            name: [i64, i64, *[ptr] * pointers, *[i64] * sizes]
            for name, (pointers, sizes) in signatures.items()
        },
    )


class _NativeScan(torch.autograd.Function):
    """The whole chunked scan in the compiled kernels of ``csrc/ssd.c`` (no packed
    documents), float32, time padded to whole chunks by the caller.

    x (B, L, H, P), dt (B, L, H), A (H,), B / C (B, L, G, N), D (H, P) or None,
    initial (B, H, P, N) or None -> y (B, L, H, P), final state (B, H, P, N). Three
    passes forward (chunk-local work, the sequential state passing, the read-out) and
    three backward; between them only the entering states (B, c, H, N, P) are kept.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        dt: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        D: Tensor | None,
        initial: Tensor | None,
        chunk: int,
    ) -> tuple[Tensor, Tensor]:
        bsz, length, heads, hdim = x.shape
        groups, nstate = B.shape[2], B.shape[3]
        nc = length // chunk
        lib, ptr = _ssd_library(), native.pointer
        y = torch.empty_like(x)
        states = x.new_empty(bsz, nc, heads, nstate, hdim)
        decays = x.new_empty(bsz, nc, heads)
        final = x.new_empty(bsz, heads, hdim, nstate)
        dims = (bsz, length, heads, groups, nstate, hdim, chunk)
        units, rows = bsz * nc * groups, bsz * heads
        args = map(ptr, (x, dt, A, B, C, D, y, states, decays))
        native.run_units(lib.ssd_scan_chunks, units, *args, *dims)
        args = map(ptr, (states, decays, initial, final))
        native.run_units(lib.ssd_scan_pass, rows, *args, bsz, length, heads, nstate, hdim, chunk)
        native.run_units(lib.ssd_scan_read, units, *map(ptr, (dt, A, C, states, y)), *dims)
        ctx.save_for_backward(x, dt, A, B, C, D, initial, states, decays)
        ctx.chunk = chunk
        ctx.set_materialize_grads(False)
        return y, final

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, dy: Tensor | None, dfinal: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        x, dt, A, B, C, D, initial, states, decays = ctx.saved_tensors
        bsz, length, heads, hdim = x.shape
        groups, nstate = B.shape[2], B.shape[3]
        chunk = ctx.chunk
        nc = length // chunk
        lib, ptr = _ssd_library(), native.pointer
        dy = torch.zeros_like(x) if dy is None else dy.contiguous()
        dfinal = None if dfinal is None else dfinal.contiguous()
        dims = (bsz, length, heads, groups, nstate, hdim, chunk)
        units, rows = bsz * nc * groups, bsz * heads
        dstates = torch.empty_like(states)
        gdecay, dinitial = torch.empty_like(decays), x.new_empty(bsz, heads, hdim, nstate)
        native.run_units(lib.ssd_scan_back_chunks, units, *map(ptr, (dt, A, C, dy, dstates)), *dims)
        args = map(ptr, (states, decays, dstates, dfinal, gdecay, dinitial))
        native.run_units(
            lib.ssd_scan_back_pass, rows, *args, bsz, length, heads, nstate, hdim, chunk
        )
        dx, ddt, dB, dC = (torch.empty_like(t) for t in (x, dt, B, C))
        dA_part = x.new_empty(bsz, nc, heads)
        dD_part = None if D is None else x.new_empty(bsz, nc, heads, hdim)
        tensors = (
            x,
            dt,
            A,
            B,
            C,
            D,
            dy,
            states,
            dstates,
            gdecay,
            dx,
            ddt,
            dA_part,
            dB,
            dC,
            dD_part,
        )
        native.run_units(lib.ssd_scan_back_grads, units, *map(ptr, tensors), *dims)
        dD = None if dD_part is None else dD_part.sum(dim=(0, 1))
        d_initial = dinitial if initial is not None else None
        return dx, ddt, dA_part.sum(dim=(0, 1)), dB, dC, dD, d_initial, None


class _NativeDiagonal(torch.autograd.Function):
    """Step 1 in the compiled kernel of ``csrc/ssd.c``: ``scores (B, c, G, Q, Q)`` (C·Bᵀ
    per group, undecayed), ``a (B, c, G, R, Q)``, ``xdt (B, c, Q, G, R, P)``, ``run
    (B, c, Q)`` document ids or None -> y_diag (B, c, Q, G, R, P), float32.

    The decays and decayed scores are rebuilt row by row in both directions, never
    stored per head; the backward returns the gradients of the scores (summed over each
    group's heads), the log-decays and the inputs.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        scores: Tensor,
        a: Tensor,
        xdt: Tensor,
        run: Tensor | None,
    ) -> Tensor:
        scores, a, xdt = scores.contiguous(), a.contiguous(), xdt.contiguous()
        run = run.contiguous() if run is not None else None
        bsz, nc, q, groups, rep, hdim = xdt.shape
        y = torch.empty_like(xdt)
        native.run_units(
            _ssd_library().ssd_diag_forward,
            bsz * nc * groups,
            *map(native.pointer, (scores, a, xdt, run, y)),
            groups, rep, q, hdim,
        )  # fmt: skip
        ctx.save_for_backward(scores, a, xdt, run)
        return y

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, dy: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, None]:
        scores, a, xdt, run = ctx.saved_tensors
        bsz, nc, q, groups, rep, hdim = xdt.shape
        d_scores, d_a, d_xdt = (torch.empty_like(t) for t in (scores, a, xdt))
        native.run_units(
            _ssd_library().ssd_diag_backward,
            bsz * nc * groups,
            *map(native.pointer, (scores, a, xdt, run, dy.contiguous(), d_scores, d_a, d_xdt)),
            groups, rep, q, hdim,
        )  # fmt: skip
        return d_scores, d_a, d_xdt, None


def _diagonal_native(ch: _Chunks) -> Tensor:
    """Step 1 through :class:`_NativeDiagonal` -> y_diag (B, c, G, R, Q, P) (a view)."""
    scores = torch.matmul(ch.C, ch.B.transpose(-1, -2))  # (B, c, G, Q, Q)
    return _NativeDiagonal.apply(scores, ch.a, ch.xdt, ch.run).permute(0, 1, 3, 4, 2, 5)


@register_backend(KERNEL, "torch")
def ssd_scan_chunked(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    *,
    chunk_size: int = 256,
    D: Tensor | None = None,
    seq_idx: Tensor | None = None,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
    quadratic_states: bool = False,
) -> ScanResult:
    """Chunked SSD (docs/math.md#mamba-2, steps 1-4); contract of :func:`ssd_scan_reference`.

    Work is O(L·Q) within chunks plus O(L/Q) sequential chunk steps; memory holds the
    (Q, Q) decay blocks of every chunk and one (P, N) state per chunk and head.
    ``quadratic_states=True`` swaps the linear pass over chunks for ssd_minimal's
    quadratic one (identical results, O((L/Q)²·H·P·N) work): a baseline for
    ``benchmarks/ssm.py``, never chosen by a policy.
    """
    return _chunked_scan(
        x, dt, A, B, C, chunk_size, D, seq_idx, initial_state, return_final_state,
        _diagonal_torch, quadratic_states,
    )  # fmt: skip


@native.register(KERNEL, "ssd")
def ssd_scan_native(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    *,
    chunk_size: int = 256,
    D: Tensor | None = None,
    seq_idx: Tensor | None = None,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
) -> ScanResult:
    """The chunked algorithm of :func:`ssd_scan_chunked` in compiled C (``csrc/ssd.c``):
    the whole scan in :class:`_NativeScan`, or with ``seq_idx`` (packed documents) its
    intra-chunk step alone, the rest in torch. CPU, computed in float32; contract of
    :func:`ssd_scan_reference`."""
    if seq_idx is not None:
        return _chunked_scan(
            x, dt, A, B, C, chunk_size, D, seq_idx, initial_state, return_final_state,
            _diagonal_native, False,
        )  # fmt: skip
    _check_args(x, dt, A, B, C, chunk_size, D, seq_idx, initial_state)
    length, heads, hdim = x.shape[1:]
    q = min(chunk_size, length)
    f = torch.float32
    xs, dts, Bs, Cs = (_pad_to_chunks(t.to(f), -length % q).contiguous() for t in (x, dt, B, C))
    d = None
    if D is not None:  # as (H, P): autograd sums the expansion back for D (H,)
        d = (D[:, None] if D.dim() == 1 else D).to(f).expand(heads, hdim).contiguous()
    initial = None if initial_state is None else initial_state.to(f).contiguous()
    y, final = _NativeScan.apply(xs, dts, A.to(f).contiguous(), Bs, Cs, d, initial, q)
    return _finish(y[:, :length], final, x.dtype, return_final_state)


def _chunked_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None,
    seq_idx: Tensor | None,
    initial_state: Tensor | None,
    return_final_state: bool,
    diagonal: Callable[[_Chunks], Tensor],
    quadratic_states: bool,
) -> ScanResult:
    """The four steps of the chunked scan, step 1 (the diagonal blocks) by ``diagonal``."""
    _check_args(x, dt, A, B, C, chunk_size, D, seq_idx, initial_state)
    bsz, length, heads, hdim = x.shape
    ch = _chunked_inputs(x, dt, A, B, C, min(chunk_size, length), seq_idx, initial_state)
    # Axes: b batch, c chunk, g group, r head in the group, i / s target / source step in
    # a chunk, p head dim, n state dim (docs/math.md#mamba-2, ssd_minimal's four steps).

    # 1. intra-chunk (diagonal blocks): attention-like, quadratic in Q
    y_diag = diagonal(ch)  # (B, c, G, R, Q, P)

    # 2. chunk states: what each chunk's inputs leave in the state at its end;
    # to_end (B, c, G, R, Q) = exp(Σ_{k=s+1..Q-1} a_k), a suffix sum (no differences)
    suffix = ch.a.flip(-1).cumsum(-1).flip(-1) - ch.a
    to_end = torch.exp(suffix)
    if ch.same is not None:  # inputs of an earlier document do not reach the chunk end
        to_end = to_end * ch.same[:, :, None, None, -1, :]
    bsz, nc, q, groups, rep, _ = ch.xdt.shape
    nstate = ch.B.shape[-1]
    # weighted inputs, still time-major (B, c, Q, G, R, P); as (B, c, G, R·P, Q) the
    # matmul with B (B, c, G, Q, N) folds all heads of a group into one product
    weighted = ch.xdt * to_end.permute(0, 1, 4, 2, 3)[..., None]
    folded = weighted.view(bsz, nc, q, groups, rep * hdim).permute(0, 1, 3, 4, 2)
    states = torch.matmul(folded, ch.B).view(bsz, nc, groups, rep, hdim, nstate)

    # 3. inter-chunk recurrence (linear pass over chunks): S_c = decay_c · S_{c−1} + T_c
    chunk_log_decay, enter_decay = _carry_decays(ch.a, ch.from_prev, ch.carry)
    passing = _quadratic_chunk_states if quadratic_states else _scan_chunk_states
    entering, final = passing(states, chunk_log_decay, ch.initial)  # (B, c, G, R, P, N)

    # 4. state -> output: each step reads the state entering its chunk, decayed to it;
    # computed straight in the output's (B, c, G, Q, R, P) layout (one matmul per group)
    read = torch.matmul(ch.C, entering.reshape(bsz, nc, groups, rep * hdim, nstate).mT)
    y_off = read.view(bsz, nc, groups, q, rep, hdim) * enter_decay.transpose(-1, -2)[..., None]
    y = (y_off + y_diag.transpose(3, 4)).transpose(2, 3)  # (B, c, Q, G, R, P)
    y = y.reshape(bsz, -1, heads, hdim)[:, :length]  # a view when G = 1
    if D is not None:  # the skip fused into one pass: y + x·D
        d = D.to(y.dtype)
        y = torch.addcmul(y, x.to(y.dtype), d[:, None] if d.dim() == 1 else d)
    y = zero_padding(y, seq_idx)  # (B, L, H, P)
    return _finish(y, final.reshape(bsz, heads, hdim, -1), x.dtype, return_final_state)


# -- dispatcher ------------------------------------------------------------------------------


def ssd_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    *,
    chunk_size: int = 256,
    D: Tensor | None = None,
    seq_idx: Tensor | None = None,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
    backends: BackendPolicy | None = None,
) -> ScanResult:
    """The SSD scan through the backend ``backends`` picks for ``x``'s device and dtype
    (``None``: ``auto``); arguments and result as in :func:`ssd_scan_reference`."""
    return dispatch(KERNEL, locals())


# -- random inputs for tests and benchmarks -------------------------------------------------------


def random_inputs(
    g: torch.Generator,
    bsz: int,
    length: int,
    heads: int,
    hdim: int,
    groups: int,
    nstate: int,
    *,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Tensor]:
    """Well-scaled random SSD inputs: Δ in (1e-3, 0.5), A in (−8, −0.5)."""
    dt = torch.exp(
        torch.empty(bsz, length, heads).uniform_(math.log(1e-3), math.log(0.5), generator=g)
    )
    return {
        "x": torch.randn(bsz, length, heads, hdim, generator=g).to(dtype),
        "dt": dt.to(dtype),
        "A": -torch.empty(heads).uniform_(0.5, 8.0, generator=g).to(dtype),
        "B": torch.randn(bsz, length, groups, nstate, generator=g).to(dtype),
        "C": torch.randn(bsz, length, groups, nstate, generator=g).to(dtype),
    }
