"""Selective scan: the diagonal, input-dependent SSM recurrence of Mamba-1 (docs/math.md#mamba-1).

Per channel ``d`` (of ``Dn``) and state index ``n`` (of ``N``), with ``g(d)`` the group
of channel ``d`` (contiguous blocks of ``Dn / G`` channels)::

    h_t[d, n] = exp(Δ_t[d] A[d, n]) · h_{t-1}[d, n] + Δ_t[d] · u_t[d] · B_t[g(d), n]
    y_t[d]    = Σ_n C_t[g(d), n] · h_t[d, n]  +  D[d] · u_t[d]
    y_t[d]   *= silu(z_t[d])                          (when a gate z is given)

``Ā = exp(ΔA)`` is the zero-order hold, ``B̄ = ΔB`` the simplified (Euler) rule, as in
mamba_ssm's ``selective_scan_ref``. ``delta`` arrives with its softplus (and bias)
already applied.

Conventions shared by every backend (the same as ``ssd_scan``'s):

- ``seq_idx (B, L)`` int: document id per position, ``-1`` for padding; documents as
  in :func:`mixstack.kernels.common.document_runs`. The state is zeroed where a new
  document starts (a non-padding position whose id differs from the previous
  non-padding position's). Padding is inert: it neither decays nor feeds the state
  (``Δ = 0`` there) and its output is 0, so a pad anywhere changes nothing.
  ``initial_state`` belongs to the first document of each row; the final state is the
  state after the last position (the last document's, trailing padding being inert).
- Computation runs in fp32 (fp64 for fp64 inputs); the output has ``u``'s dtype, the
  final state the compute dtype.

Backends (one signature, :func:`selective_scan_reference`):

* ``reference``: the recurrence, one step at a time. Readable; tests only.
* ``torch``: :func:`selective_scan_chunked`: chunks scanned side by side, then states
  passed from chunk to chunk, segment by segment with recomputation in backward, so
  memory stays bounded (segment-boundary states plus one segment's working set, never
  the (B, L, Dn, N) history). Runs everywhere.
* ``native``: :func:`selective_scan_native`: the recurrence in compiled C
  (``csrc/selective.c``), forward and backward, CPU float32; the state is stored every
  ``NATIVE_SEGMENT`` steps and recomputed in between by the backward. Packed calls
  (``seq_idx``) take the torch path.

:func:`selective_scan` is the dispatcher callers use; :func:`selective_scan_step` is
the one-token update used for decoding.
"""

from __future__ import annotations

import ctypes
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from mixstack.kernels import native
from mixstack.kernels.backends import (
    BackendPolicy,
    dispatch,
    register_backend,
)
from mixstack.kernels.common import compute_dtype, document_runs

KERNEL = "selective_scan"
DEFAULT_CHUNK_SIZE = 32

ScanResult = Tensor | tuple[Tensor, Tensor]


# -- input handling ----------------------------------------------------------------------------


@dataclass
class _Scan:
    """Inputs in the compute dtype, channels split into their groups.

    u, delta: (B, L, G, Dg) (Δ = 0 at padding); A: (G, Dg, N); B, C: (B, L, G, N);
    h0: (B, G, Dg, N); keep: (B, L) bool, False where a document starts (the state is
    zeroed before that step), None without seq_idx; pad: (B, L) bool or None.
    """

    u: Tensor
    delta: Tensor
    A: Tensor
    B: Tensor
    C: Tensor
    h0: Tensor
    keep: Tensor | None
    pad: Tensor | None


def _check_args(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None,
    z: Tensor | None,
    seq_idx: Tensor | None,
    initial_state: Tensor | None,
) -> None:
    """Raise ``ValueError`` naming the mismatch (kernels get shapes from code)."""
    if u.dim() != 3 or A.dim() != 2 or A.shape[0] != u.shape[2]:
        raise ValueError(
            f"selective_scan expects u (B, L, Dn) and A (Dn, N); got {tuple(u.shape)} and "
            f"{tuple(A.shape)}"
        )
    bsz, length, channels = u.shape
    nstate = A.shape[1]
    for name, t in (("delta", delta), ("z", z)):
        if t is not None and t.shape != u.shape:
            raise ValueError(
                f"selective_scan: {name} must have u's shape {tuple(u.shape)}, got {tuple(t.shape)}"
            )
    lead_ok = B.dim() in (3, 4) and B.shape[:2] == (bsz, length) and B.shape[-1] == nstate
    if B.shape != C.shape or not lead_ok or (B.dim() == 4 and channels % B.shape[2]):
        raise ValueError(
            f"selective_scan: B {tuple(B.shape)} and C {tuple(C.shape)} must both be (B, L, N) "
            f"or (B, L, G, N) with B={bsz}, L={length}, N={nstate} and G dividing Dn={channels}"
        )
    if D is not None and D.shape != (channels,):
        raise ValueError(f"selective_scan: D must be (Dn,) = ({channels},), got {tuple(D.shape)}")
    if seq_idx is not None and seq_idx.shape != (bsz, length):
        raise ValueError(
            f"selective_scan: seq_idx must be (B, L) = {(bsz, length)}, got {tuple(seq_idx.shape)}"
        )
    if initial_state is not None and initial_state.shape != (bsz, channels, nstate):
        raise ValueError(
            f"selective_scan: initial_state must be (B, Dn, N) = {(bsz, channels, nstate)}, "
            f"got {tuple(initial_state.shape)}"
        )
    if chunk_size < 1 or length < 1:
        raise ValueError(
            f"selective_scan: chunk_size and length must be >= 1, got chunk_size {chunk_size} "
            f"and u {tuple(u.shape)}"
        )


def _prepare(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    seq_idx: Tensor | None,
    initial_state: Tensor | None,
) -> _Scan:
    f = compute_dtype(u.dtype)
    bsz, length, channels = u.shape
    if B.dim() == 3:
        B, C = B.unsqueeze(2), C.unsqueeze(2)  # (B, L, 1, N)
    groups, nstate = B.shape[2], B.shape[3]
    split = (bsz, length, groups, channels // groups)
    u, delta = u.to(f), delta.to(f)
    keep = pad = None
    if seq_idx is not None:
        run, pad = document_runs(seq_idx)
        keep = torch.diff(run, dim=1, prepend=run[:, :1]) == 0  # (B, L)
        u = u.masked_fill(pad[..., None], 0.0)  # padding: no input (whatever it holds) ...
        delta = delta.masked_fill(pad[..., None], 0.0)  # ... and no decay
    h0 = u.new_zeros(bsz, groups, channels // groups, nstate, dtype=f)
    if initial_state is not None:
        h0 = initial_state.to(f).reshape(h0.shape)
    return _Scan(
        u=u.reshape(split),
        delta=delta.reshape(split),
        A=A.to(f).reshape(groups, channels // groups, nstate),
        B=B.to(f),
        C=C.to(f),
        h0=h0,
        keep=keep,
        pad=pad,
    )


def _finish(
    y: Tensor,
    scan: _Scan,
    final: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    out_dtype: torch.dtype,
    return_final_state: bool,
) -> ScanResult:
    """y (B, L, G, Dg) -> skip, gate, zero padding -> (B, L, Dn) [, final (B, Dn, N)]."""
    bsz, length = y.shape[:2]
    y = y.reshape(bsz, length, -1)
    if D is not None:
        y = y + scan.u.reshape(bsz, length, -1) * D.to(y.dtype)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    if scan.pad is not None:
        y = y.masked_fill(scan.pad[..., None], 0.0)
    y = y.to(out_dtype)
    if return_final_state:
        return y, final.reshape(bsz, -1, final.shape[-1])
    return y


# -- reference: the recurrence, one step at a time ---------------------------------------------


@register_backend(KERNEL, "reference")
def selective_scan_reference(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    D: Tensor | None = None,
    z: Tensor | None = None,
    seq_idx: Tensor | None = None,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
) -> ScanResult:
    """The recurrence of the module docstring, literally (``chunk_size`` is accepted and
    ignored).

    u (B, L, Dn), delta (B, L, Dn) (softplus applied), A (Dn, N), B/C (B, L, N) or
    (B, L, G, N), D (Dn,) | None, z (B, L, Dn) | None, seq_idx (B, L) | None,
    initial_state (B, Dn, N) | None -> y (B, L, Dn) [, final_state (B, Dn, N)].
    Autograd keeps every step's (B, Dn, N) state: memory O(B·L·Dn·N).
    """
    _check_args(u, delta, A, B, C, chunk_size, D, z, seq_idx, initial_state)
    scan = _prepare(u, delta, A, B, C, seq_idx, initial_state)
    h = scan.h0  # (B, G, Dg, N)
    ones = torch.ones(u.shape[:2], dtype=torch.bool, device=u.device)
    keep = ones if scan.keep is None else scan.keep
    ys = []
    # unbind once: indexing [:, t] inside the loop would make backward O(L²)
    steps = (t.unbind(1) for t in (scan.u, scan.delta, scan.B, scan.C, keep))
    for u_t, dt_t, B_t, C_t, keep_t in zip(*steps, strict=True):
        h = torch.where(keep_t[:, None, None, None], h, 0.0)  # new document: zero state
        dt = dt_t[..., None]  # (B, G, Dg, 1)
        h = torch.exp(dt * scan.A) * h + dt * u_t[..., None] * B_t[:, :, None, :]
        ys.append(torch.einsum("bgdn,bgn->bgd", h, C_t))
    return _finish(torch.stack(ys, dim=1), scan, h, D, z, u.dtype, return_final_state)


# -- torch: chunked, memory-bounded ------------------------------------------------------------

# Elements of one (B, S, Dn, N) tensor in a segment's working set: 2^22 = 16 MiB in fp32.
SEGMENT_ELEMENTS = 1 << 22


def _flushed_exp(log_decay: Tensor, keep: Tensor | None) -> Tensor:
    """``exp(log_decay)`` (..., G, Dg, N), 0 where ``keep`` (the leading dims) is False or
    the decay is negligible.

    Masking happens on the exponent, *before* exp, so backward stays NaN-free. Decays
    below ``sqrt(tiny)`` (~1e-19 in fp32) weigh less than rounding; flushing them keeps
    products of decays out of denormal numbers, which are slow on many CPUs.
    """
    cutoff = math.log(torch.finfo(log_decay.dtype).tiny) / 2
    dead = log_decay < cutoff
    if keep is not None:
        dead = dead | ~keep[..., None, None, None]
    return torch.exp(log_decay.masked_fill(dead, -math.inf))


def _chunked(t: Tensor, chunk: int) -> Tensor:
    """(B, S, ...) -> (B, n, Q, ...), zero-padded at the end to n·Q steps (Δ = 0, u = 0:
    inert steps that neither decay nor inject)."""
    extra = -t.shape[1] % chunk
    if extra:
        t = F.pad(t, [0, 0] * (t.dim() - 2) + [0, extra])
    return t.view(t.shape[0], -1, chunk, *t.shape[2:])


def _local_scans(
    h: Tensor, u: Tensor, delta: Tensor, B: Tensor, C: Tensor, keep: Tensor | None, A: Tensor
) -> tuple[Tensor, Tensor]:
    """Every chunk's scan from its own starting state, all chunks at once, step by step.

    h (B, n, G, Dg, N) starting states, u/delta (B, n, Q, G, Dg), B/C (B, n, Q, G, N),
    keep (B, n, Q) | None, A (G, Dg, N) -> y (B, n, Q, G, Dg) and each chunk's end
    state (B, n, G, Dg, N).
    """
    ys = []
    keeps = keep.unbind(2) if keep is not None else [None] * u.shape[2]
    steps = (t.unbind(2) for t in (u, delta, B, C))
    for (u_q, dt_q, B_q, C_q), keep_q in zip(zip(*steps, strict=True), keeps, strict=True):
        decay = torch.exp(dt_q[..., None] * A)  # (B, n, G, Dg, N); one step: no flush needed
        if keep_q is not None:
            decay = decay.masked_fill(~keep_q[..., None, None, None], 0.0)  # document start
        h = decay * h + (dt_q * u_q)[..., None] * B_q[:, :, :, None, :]
        ys.append(torch.einsum("bcgdn,bcgn->bcgd", h, C_q))
    return torch.stack(ys, dim=2), h


def _pass_states(
    first_end: Tensor,
    ends: Tensor,
    delta: Tensor,
    C: Tensor,
    keep: Tensor | None,
    A: Tensor,
) -> tuple[Tensor, Tensor]:
    """Carry states across chunks 1..n−1 and what they add to those chunks' outputs.

    first_end (B, G, Dg, N): chunk 0's end state; ends (B, m, G, Dg, N): the local end
    states of the m = n − 1 later chunks; delta (B, m, Q, G, Dg); C (B, m, Q, G, N);
    keep (B, m, Q) | None. -> y correction (B, m, Q, G, Dg), final state (B, G, Dg, N).
    """
    keep_prefix = None if keep is None else keep.cumprod(dim=2).bool()  # no start in [0, t]
    keep_chunk = None if keep_prefix is None else keep_prefix[:, :, -1]  # (B, m)
    total = _flushed_exp(A * delta.sum(dim=2)[..., None], keep_chunk)  # (B, m, G, Dg, N)
    state, entering = first_end, []
    for decay_c, end_c in zip(total.unbind(1), ends.unbind(1), strict=True):
        entering.append(state)
        state = decay_c * state + end_c
    prefix = _flushed_exp(A * delta.cumsum(dim=2)[..., None], keep_prefix)  # (B, m, Q, G, Dg, N)
    carried = prefix * torch.stack(entering, dim=1)[:, :, None]
    return torch.einsum("bcqgdn,bcqgn->bcqgd", carried, C), state


def _scan_segment(
    h0: Tensor,  # (B, G, Dg, N): the state entering the segment
    u: Tensor,  # (B, S, G, Dg)
    delta: Tensor,  # (B, S, G, Dg)
    B: Tensor,  # (B, S, G, N)
    C: Tensor,  # (B, S, G, N)
    keep: Tensor | None,  # (B, S)
    A: Tensor,  # (G, Dg, N)
    chunk: int,
) -> tuple[Tensor, Tensor]:
    """Outputs (B, S, G, Dg) and final state (B, G, Dg, N) of one segment of n chunks.

    1. local scans: chunk 0 from ``h0``, every later chunk from a zero state, the chunks
       side by side (Q sequential steps on (B, n, G, Dg, N) tensors);
    2. state passing: ``S_c = exp(A · ΣΔ_c) · S_{c−1} + local_end_c``, sequential over
       the chunks (0 factor where a document starts inside chunk c);
    3. correction of chunks c >= 1: ``y_t += C_t · (exp(A · Σ_{s<=t in c} Δ_s) ⊙ S_{c−1})``.
    Every exponent is ``A`` times a sum of Δ counted from a chunk start (<= 0 for a
    decaying A), never a difference of cumulative sums: the factorised
    ``exp(α_t)·exp(−α_s)`` form overflows once ``|A|·ΣΔ`` passes ~88 in fp32.
    With one chunk per segment this is the plain recurrence (no correction at all).
    """
    length = u.shape[1]
    chunk = min(chunk, length)  # a short segment is one short chunk, not a padded one
    uc, dtc, Bc, Cc = (_chunked(t, chunk) for t in (u, delta, B, C))
    keepc = None  # padded steps start no document
    if keep is not None:
        keepc = _chunked(F.pad(keep, (0, -length % chunk), value=True), chunk)  # (B, n, Q)
    n = uc.shape[1]
    h_start = torch.cat([h0[:, None], h0.new_zeros(h0.shape[0], n - 1, *h0.shape[1:])], dim=1)
    y, ends = _local_scans(h_start, uc, dtc, Bc, Cc, keepc, A)
    state = ends[:, 0]
    if n > 1:
        later = None if keepc is None else keepc[:, 1:]
        fix, state = _pass_states(state, ends[:, 1:], dtc[:, 1:], Cc[:, 1:], later, A)
        y = torch.cat([y[:, :1], y[:, 1:] + fix], dim=1)
    return y.flatten(1, 2)[:, :length], state


@register_backend(KERNEL, "torch")
def selective_scan_chunked(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    D: Tensor | None = None,
    z: Tensor | None = None,
    seq_idx: Tensor | None = None,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
) -> ScanResult:
    """The selective scan with bounded memory; contract of :func:`selective_scan_reference`.

    SSD's trick (a (Q, Q) decay matrix per chunk) does not transfer: here the decay
    depends on (d, n), so that tensor would be (B, L/Q, Q, Q, Dn, N) (docs/math.md#mamba-1). Instead
    the sequence is cut into segments whose (B, S, Dn, N) working set holds about
    ``SEGMENT_ELEMENTS`` numbers, walked in order; within a segment, chunks of
    ``chunk_size`` steps scan side by side and then pass states along
    (:func:`_scan_segment`). Under autograd each segment is checkpointed: backward keeps
    the segment-boundary states and recomputes one segment at a time instead of holding
    the (B, L, Dn, N) history. Work ~ the reference's plus one correction pass;
    sequential steps per segment: Q + S/Q instead of S.
    """
    _check_args(u, delta, A, B, C, chunk_size, D, z, seq_idx, initial_state)
    scan = _prepare(u, delta, A, B, C, seq_idx, initial_state)
    bsz, _, channels = u.shape
    per_step = bsz * channels * A.shape[1]
    segment = chunk_size * max(1, SEGMENT_ELEMENTS // (per_step * chunk_size))
    recompute = torch.is_grad_enabled() and any(
        t.requires_grad for t in (scan.u, scan.delta, scan.B, scan.C, scan.A, scan.h0)
    )
    # split once: slicing [:, a:b] per segment would make backward quadratic in L
    parts = [t.split(segment, dim=1) for t in (scan.u, scan.delta, scan.B, scan.C)]
    keeps = scan.keep.split(segment, dim=1) if scan.keep is not None else None
    h, ys = scan.h0, []
    for s, (u_s, dt_s, B_s, C_s) in enumerate(zip(*parts, strict=True)):
        args = (h, u_s, dt_s, B_s, C_s, None if keeps is None else keeps[s], scan.A, chunk_size)
        if recompute:
            y_s, h = checkpoint(_scan_segment, *args, use_reentrant=False)
        else:
            y_s, h = _scan_segment(*args)
        ys.append(y_s)
    return _finish(torch.cat(ys, dim=1), scan, h, D, z, u.dtype, return_final_state)


# -- native: csrc/selective.c, the recurrence compiled, forward and backward -------------------

# Steps between stored states: the backward recomputes a segment's states and decays from
# its checkpoint (scratch: 2·NATIVE_SEGMENT·N·64 floats per thread, 256 KiB at N = 16 with
# AVX-512, in L2), and the checkpoints take (B, L/NATIVE_SEGMENT, Dn, N) floats.
NATIVE_SEGMENT = 32


@functools.cache
def _selective_library() -> ctypes.CDLL:
    """csrc/selective.c, with its entry points' argument types declared."""
    return _declare_selective(native.load("selective"))


def _declare_selective(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the argument and return types of a build of csrc/selective.c."""
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    return native.declare(
        lib,
        {
            "selective_forward": [i64, i64, *[ptr] * 11, *[i64] * 6],
            "selective_backward": [i64, i64, *[ptr] * 18, *[i64] * 6],
            "selective_lanes": [],
            "selective_block": [],
        },
    )


class _NativeSelective(torch.autograd.Function):
    """The scan, D's skip and the silu(z) gate in ``csrc/selective.c``, float32
    contiguous: u, delta (B, L, Dn), At (N, Dn) (A transposed), B, C (B, L, G, N),
    h0 (B, N, Dn) | None, D (Dn,) | None, z (B, L, Dn) | None -> y (B, L, Dn), final
    state (B, N, Dn). Units: (batch row, group, block of channels:
    one vector forward, ``selective_block()`` channels backward); the per-unit partial
    sums of dB, dC (over a block's channels) and dA (over batch rows) are summed here, in
    a fixed order."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        u: Tensor,
        delta: Tensor,
        At: Tensor,
        B: Tensor,
        C: Tensor,
        h0: Tensor | None,
        D: Tensor | None,
        z: Tensor | None,
        store: bool,
    ) -> tuple[Tensor, Tensor]:
        lib = _selective_library()
        bsz, length, channels = u.shape
        groups, nstate = B.shape[2], B.shape[3]
        vectors = -(-(channels // groups) // lib.selective_lanes())  # per group
        units = bsz * groups * vectors
        y = u.new_empty(bsz, length, channels)
        final = u.new_empty(bsz, nstate, channels)
        # checkpoints only where a backward can follow (not under no_grad)
        ck = u.new_empty(bsz, -(-length // NATIVE_SEGMENT), nstate, channels) if store else None
        native.run_units(
            lib.selective_forward, units,
            *map(native.pointer, (u, delta, At, B, C, h0, D, z, y, final, ck)),
            bsz, length, channels, nstate, groups, NATIVE_SEGMENT,
        )  # fmt: skip
        ctx.save_for_backward(u, delta, At, B, C, D, z, ck)
        ctx.has_h0 = h0 is not None
        return y, final

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, dy: Tensor | None, dfinal: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        lib = _selective_library()
        u, delta, At, B, C, D, z, ck = ctx.saved_tensors
        bsz, length, channels = u.shape
        groups, nstate = B.shape[2], B.shape[3]
        blocks = -(-(channels // groups) // lib.selective_block())  # per group
        dy = torch.zeros_like(u) if dy is None else dy.contiguous()
        dfinal = None if dfinal is None else dfinal.contiguous()
        du, ddelta = torch.empty_like(u), torch.empty_like(u)
        dA = u.new_empty(bsz, nstate, channels)  # per batch row
        dB = u.new_empty(bsz, length, groups, blocks, nstate)  # per channel block
        dC = torch.empty_like(dB)
        dh0 = u.new_empty(bsz, nstate, channels) if ctx.has_h0 else None
        dD = u.new_empty(bsz, channels) if D is not None else None  # per batch row
        dz = torch.empty_like(u) if z is not None else None
        native.run_units(
            lib.selective_backward, bsz * groups * blocks,
            *map(native.pointer, (u, delta, At, B, C, D, z, ck, dy, dfinal)),
            *map(native.pointer, (du, ddelta, dA, dB, dC, dh0, dD, dz)),
            bsz, length, channels, nstate, groups, NATIVE_SEGMENT,
        )  # fmt: skip
        d_skip = dD.sum(0) if dD is not None else None
        return du, ddelta, dA.sum(0), dB.sum(3), dC.sum(3), dh0, d_skip, dz, None


@native.register(KERNEL, "selective")
def selective_scan_native(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    D: Tensor | None = None,
    z: Tensor | None = None,
    seq_idx: Tensor | None = None,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
) -> ScanResult:
    """The recurrence in compiled C (``csrc/selective.c``): one sequential pass forward,
    one backward (states recomputed from checkpoints every ``NATIVE_SEGMENT`` steps),
    channels vectorised, (batch row, group, channel block) units spread over threads,
    D's skip and the silu(z) gate fused (their backward recomputes C·h). CPU, computed in float32
    (``chunk_size`` is accepted and ignored); packed calls (``seq_idx``) take the torch
    path. Contract of :func:`selective_scan_reference`."""
    if seq_idx is not None:
        return selective_scan_chunked(
            u, delta, A, B, C, chunk_size=chunk_size, D=D, z=z, seq_idx=seq_idx,
            initial_state=initial_state, return_final_state=return_final_state,
        )  # fmt: skip
    _check_args(u, delta, A, B, C, chunk_size, D, z, seq_idx, initial_state)
    f = torch.float32
    if B.dim() == 3:
        B, C = B.unsqueeze(2), C.unsqueeze(2)  # (B, L, 1, N)
    uf = u.to(f).contiguous()
    h0 = None
    if initial_state is not None:
        h0 = initial_state.to(f).transpose(1, 2).contiguous()  # (B, N, Dn)
    inputs = (u, delta, A, B, C, D, z, initial_state)
    store = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    y, final = _NativeSelective.apply(
        uf,
        delta.to(f).contiguous(),
        A.to(f).t().contiguous(),  # (N, Dn): a state index's decays contiguous over channels
        B.to(f).contiguous(),
        C.to(f).contiguous(),
        h0,
        None if D is None else D.to(f).contiguous(),
        None if z is None else z.to(f).contiguous(),
        store,
    )
    y = y.to(u.dtype)
    if return_final_state:
        return y, final.transpose(1, 2).contiguous()  # (B, Dn, N)
    return y


# -- dispatcher --------------------------------------------------------------------------------


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    D: Tensor | None = None,
    z: Tensor | None = None,
    seq_idx: Tensor | None = None,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
    backends: BackendPolicy | None = None,
) -> ScanResult:
    """The selective scan through the backend ``backends`` picks for ``u``'s device and
    dtype (``None``: ``auto``); arguments and result as in :func:`selective_scan_reference`."""
    return dispatch(KERNEL, locals())


# -- decoding ----------------------------------------------------------------------------------


def selective_scan_step(
    state: Tensor,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    *,
    D: Tensor | None = None,
    z: Tensor | None = None,
) -> Tensor:
    """One decoding step; updates ``state`` in place and returns ``y_t``.

    state (B, Dn, N) (kept in its own dtype, fp32 in the mixer), u/delta/z (B, Dn),
    A (Dn, N), B/C (B, N) or (B, G, N), D (Dn,) | None -> y_t (B, Dn) in ``u.dtype``.
    """
    f = state.dtype
    if B.dim() == 2:
        B, C = B.unsqueeze(1), C.unsqueeze(1)  # (B, 1, N)
    per_group = u.shape[1] // B.shape[1]
    B_d = B.to(f).repeat_interleave(per_group, dim=1)  # (B, Dn, N)
    C_d = C.to(f).repeat_interleave(per_group, dim=1)
    dt = delta.to(f)[..., None]  # (B, Dn, 1)
    u_f = u.to(f)
    # Under autograd the step saves the state it reads; it is overwritten below, so read a
    # copy (backward through decoding steps then works; no copy at inference).
    prev = state.clone() if torch.is_grad_enabled() else state
    new_state = torch.exp(dt * A.to(f)) * prev + dt * u_f[..., None] * B_d  # (B, Dn, N)
    state.copy_(new_state)
    y = (new_state * C_d).sum(dim=-1)  # (B, Dn)
    if D is not None:
        y = y + D.to(f) * u_f
    if z is not None:
        y = y * F.silu(z.to(f))
    return y.to(u.dtype)


# -- random inputs for tests and benchmarks -------------------------------------------------------


def random_inputs(
    g: torch.Generator,
    bsz: int,
    length: int,
    channels: int,
    nstate: int,
    groups: int = 0,
    *,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Tensor]:
    """Well-scaled random inputs: Δ log-uniform in (1e-3, 1), A = −U(0.5, 16) (Mamba-1's
    S4D-real init spans −1..−N); ``groups`` 0 gives B, C as (B, L, N), else (B, L, G, N)."""
    bc = (bsz, length, nstate) if groups == 0 else (bsz, length, groups, nstate)
    delta = torch.exp(torch.empty(bsz, length, channels).uniform_(math.log(1e-3), 0.0, generator=g))
    return {
        "u": torch.randn(bsz, length, channels, generator=g).to(dtype),
        "delta": delta.to(dtype),
        "A": -torch.empty(channels, nstate).uniform_(0.5, 16.0, generator=g).to(dtype),
        "B": torch.randn(*bc, generator=g).to(dtype),
        "C": torch.randn(*bc, generator=g).to(dtype),
    }
