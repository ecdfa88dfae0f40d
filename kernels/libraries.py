"""GPU providers backed by existing kernel libraries (the ``cuda`` extra).

Each function here has its kernel's signature (the ``reference`` of that kernel module)
and maps the arguments onto a library's documented entry point, imported when called:

* ``fla``: ``fla.ops.simple_gla.chunk_simple_gla(q, k, v, g, scale, initial_state,
  output_final_state, cu_seqlens)`` serves ``ssd_scan``. SSD is scalar-decay gated
  linear attention: per head the state ``S (K=N, V=P)`` follows
  ``S_t = exp(g_t)·S_{t−1} + k_tᵀ v_t`` and ``o_t = scale·q_t S_t``, so ``q = C``,
  ``k = B`` (each group's B/C repeated over its heads), ``v = Δ·x``, ``g = Δ·A``,
  ``scale = 1``; fla's state is ``(K, V)`` = ours transposed. Packed rows (``seq_idx``)
  become one variable-length batch through ``cu_seqlens``.
* ``mamba_ssm``: ``mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=,
  initial_states=, seq_idx=, dt_softplus=False, return_final_states=)`` for
  ``ssd_scan``; ``selective_scan_fn(u, delta, A, B, C, D=, z=, delta_softplus=False,
  return_last_state=)`` (channels-first) for ``selective_scan``.
* ``causal_conv1d``: ``causal_conv1d_fn(x (B, C, L), weight (C, K), bias, seq_idx=,
  initial_states=, return_final_states=, activation=)``.
* ``flash_attn``: ``flash_attn_func`` / ``flash_attn_varlen_func`` (bottom-right causal
  alignment since flash-attn 2.1, GQA by fewer k/v heads, ``window_size=(left, right)``).

Attention on a GPU is also served by the ``torch`` provider: SDPA picks its flash or
memory-efficient kernel by itself.

Every provider is *available* when its package imports and *applies* on CUDA devices
only (they are Triton/CUDA code). What a library cannot express is refused with a
:class:`BackendError` naming the argument and the backend to use instead (``torch``),
never computed differently: padding inside a row for the conv library, ``seq_idx`` or
an initial state for ``selective_scan_fn``, explicit query positions for flash-attn.
Padding (``seq_idx`` −1) keeps mixstack's meaning everywhere: inert in the scans
(x and Δ zeroed: no decay, no input) and output 0.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mixstack.dsl.errors import BackendError
from mixstack.kernels import attention as attn
from mixstack.kernels import causal_conv1d as conv
from mixstack.kernels import selective_scan as sscan
from mixstack.kernels import ssd
from mixstack.kernels.backends import Reason, register_backend
from mixstack.kernels.common import compute_dtype, document_runs, zero_padding

HINT = "pip install 'mixstack[cuda]' (CUDA builds of mamba-ssm, causal-conv1d, flash-attn, fla)"
FLOATS = (torch.float16, torch.bfloat16, torch.float32)
HALF = (torch.float16, torch.bfloat16)


def _module(name: str) -> Any:
    return importlib.import_module(name)


def _importable(name: str) -> Callable[[], Reason]:
    def available() -> Reason:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        return None if found else f"package {name!r} is not installed"

    return available


def _cuda(dtypes: tuple[torch.dtype, ...]) -> Callable[[torch.device, torch.dtype], Reason]:
    def applies(device: torch.device, dtype: torch.dtype) -> Reason:
        if device.type != "cuda":
            return f"needs a CUDA device (got {device.type})"
        if dtype not in dtypes:
            return f"dtype {dtype} not supported (supported: {', '.join(map(str, dtypes))})"
        return None

    return applies


def _refuse(provider: str, kernel: str, what: str) -> BackendError:
    return BackendError(
        f"backend {provider!r} for kernel {kernel!r} cannot take {what}; "
        "use backend 'torch' for this call (run.backend: {" + f"{kernel}: torch" + "})"
    )


def packed_runs(seq_idx: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Rows of documents flattened into one variable-length batch.

    ``seq_idx (B, L)`` -> ``cu_seqlens (S+1,)`` int32 over the B·L flattened positions
    (each row starts a new sequence; padding joins the run before it, where it is inert),
    ``first (B,)`` / ``last (B,)`` the sequence index of each row's first and last
    document, and ``run (B, L)`` (document runs of :func:`document_runs`).
    """
    run = document_runs(seq_idx)[0]  # (B, L), 0 for the first document of a row
    per_row = run[:, -1] + 1  # (B,) documents per row
    first = F.pad(per_row.cumsum(0)[:-1], (1, 0))  # (B,)
    flat = (run + first[:, None]).reshape(-1)  # (B·L,) global sequence id, non-decreasing
    starts = torch.nonzero(torch.diff(flat) != 0).flatten() + 1
    total = torch.tensor([flat.numel()], device=flat.device)
    cu = torch.cat([flat.new_zeros(1), starts, total]).to(torch.int32)
    return cu, first, first + per_row - 1, run


# -- ssd_scan: fla ---------------------------------------------------------------------------------


@register_backend(
    ssd.KERNEL, "fla", available=_importable("fla"), applies=_cuda(FLOATS), install_hint=HINT
)
def ssd_scan_fla(
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
) -> ssd.ScanResult:
    """SSD through fla's ``chunk_simple_gla``; contract of :func:`ssd.ssd_scan_reference`
    (``chunk_size`` is fla's own choice and ignored)."""
    ssd._check_args(x, dt, A, B, C, chunk_size, D, seq_idx, initial_state)
    gla = _module("fla.ops.simple_gla").chunk_simple_gla
    f = compute_dtype(x.dtype)
    bsz, length, heads, hdim = x.shape
    rep = heads // B.shape[2]
    dts = zero_padding(dt.to(f), seq_idx)  # (B, L, H): padding inert
    q = C.repeat_interleave(rep, dim=2)  # (B, L, H, N)
    k = B.repeat_interleave(rep, dim=2)  # (B, L, H, N)
    v = (zero_padding(x, seq_idx).to(f) * dts[..., None]).to(x.dtype)  # (B, L, H, P)
    g = dts * A.to(f)  # (B, L, H) log-decay per step
    h0 = None if initial_state is None else initial_state.to(f).transpose(-1, -2)  # (B,H,N,P)
    cu = None
    if seq_idx is not None:
        cu, first, last, _ = packed_runs(seq_idx)
        q, k, v, g = (t.reshape(1, bsz * length, *t.shape[2:]) for t in (q, k, v, g))
        if h0 is not None:
            h0_all = h0.new_zeros(cu.numel() - 1, *h0.shape[1:])
            h0_all[first] = h0
            h0 = h0_all
    o, ht = gla(
        q=q,
        k=k,
        v=v,
        g=g,
        scale=1.0,
        initial_state=h0,
        output_final_state=return_final_state,
        cu_seqlens=cu,
    )
    y = o.reshape(bsz, length, heads, hdim).to(f) + ssd._skip(x.to(f), D)
    y = zero_padding(y, seq_idx)
    final = None
    if return_final_state:
        final = ht if seq_idx is None else ht[last]  # (B, H, N, P)
        final = final.to(f).transpose(-1, -2)  # (B, H, P, N)
    return ssd._finish(y, final, x.dtype, return_final_state)


# -- ssd_scan and selective_scan: mamba_ssm --------------------------------------------------------


@register_backend(
    ssd.KERNEL,
    "mamba_ssm",
    available=_importable("mamba_ssm"),
    applies=_cuda(FLOATS),
    install_hint=HINT,
)
def ssd_scan_mamba_ssm(
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
) -> ssd.ScanResult:
    """SSD through mamba_ssm's ``mamba_chunk_scan_combined`` (Δ already softplus'ed).
    ``seq_idx`` is passed as document runs (padding joins the run before it, inert)."""
    ssd._check_args(x, dt, A, B, C, chunk_size, D, seq_idx, initial_state)
    scan = _module("mamba_ssm.ops.triton.ssd_combined").mamba_chunk_scan_combined
    f = compute_dtype(x.dtype)
    runs = None if seq_idx is None else document_runs(seq_idx)[0].to(torch.int32)
    out = scan(
        zero_padding(x, seq_idx),
        zero_padding(dt, seq_idx),
        A.to(f),
        B,
        C,
        chunk_size,
        D=D,
        initial_states=None if initial_state is None else initial_state.to(f),
        seq_idx=runs,
        dt_softplus=False,
        return_final_states=return_final_state,
    )
    y, final = out if return_final_state else (out, None)
    y = zero_padding(y, seq_idx)
    return ssd._finish(y, None if final is None else final.to(f), x.dtype, return_final_state)


@register_backend(
    sscan.KERNEL,
    "mamba_ssm",
    available=_importable("mamba_ssm"),
    applies=_cuda(FLOATS),
    install_hint=HINT,
)
def selective_scan_mamba_ssm(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    *,
    chunk_size: int = sscan.DEFAULT_CHUNK_SIZE,
    D: Tensor | None = None,
    z: Tensor | None = None,
    seq_idx: Tensor | None = None,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
) -> sscan.ScanResult:
    """Mamba-1's scan through mamba_ssm's ``selective_scan_fn`` (channels first); it has
    no document resets and no initial state, so those are refused."""
    if seq_idx is not None:
        raise _refuse("mamba_ssm", sscan.KERNEL, "seq_idx (selective_scan_fn has no resets)")
    if initial_state is not None:
        raise _refuse("mamba_ssm", sscan.KERNEL, "an initial_state")
    fn = _module("mamba_ssm.ops.selective_scan_interface").selective_scan_fn
    # B/C (B, L, N) -> (B, N, L); grouped (B, L, G, N) -> (B, G, N, L)
    Bt = B.permute(0, 2, 1) if B.dim() == 3 else B.permute(0, 2, 3, 1)
    Ct = C.permute(0, 2, 1) if C.dim() == 3 else C.permute(0, 2, 3, 1)
    out = fn(
        u.transpose(1, 2),
        delta.transpose(1, 2),
        A,
        Bt.contiguous(),
        Ct.contiguous(),
        D=None if D is None else D.float(),
        z=None if z is None else z.transpose(1, 2),
        delta_softplus=False,
        return_last_state=return_final_state,
    )
    y, last = out if return_final_state else (out, None)
    y = y.transpose(1, 2).to(u.dtype)  # (B, L, Dn)
    if return_final_state:
        return y, last.to(compute_dtype(u.dtype))
    return y


# -- causal_conv1d -------------------------------------------------------------------------------


@register_backend(
    conv.CAUSAL,
    "causal_conv1d",
    available=_importable("causal_conv1d"),
    applies=_cuda(FLOATS),
    install_hint=HINT,
)
def causal_conv1d_library(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    activation: conv.Activation = None,
    seq_idx: Tensor | None = None,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
) -> conv.ConvResult:
    """The causal depthwise conv through ``causal_conv1d_fn``. mixstack's padding is
    transparent (taps skip it); the library cannot skip positions, so padding is accepted
    only at the end of a row (where nothing later reads it), and an initial or final
    state only without ``seq_idx`` (the library refuses that combination too)."""
    width = weight.shape[1]
    if seq_idx is not None:
        pad = seq_idx < 0
        later_real = torch.flip(torch.cummax(torch.flip(~pad, [1]).int(), dim=1).values, [1])
        if bool((pad & later_real.bool()).any()):
            raise _refuse(
                "causal_conv1d",
                conv.CAUSAL,
                "padding (seq_idx −1) before a real token: mixstack skips it, the library "
                "would read it as zeros",
            )
        if initial_state is not None or return_final_state:
            raise _refuse("causal_conv1d", conv.CAUSAL, "seq_idx together with a conv state")
    fn = _module("causal_conv1d").causal_conv1d_fn
    xt = x.transpose(1, 2)  # (B, C, L), channel-last in memory as the seq_idx path wants
    init = None
    if initial_state is not None:
        init = initial_state[..., 1:].to(x.dtype)  # our K columns; the library keeps K−1
    y = fn(
        xt,
        weight,
        bias,
        seq_idx=None if seq_idx is None else document_runs(seq_idx)[0].to(torch.int32),
        initial_states=init,
        activation=activation,
    )
    y = zero_padding(y.transpose(1, 2), seq_idx).to(x.dtype)  # (B, L, C)
    if not return_final_state:
        return y
    # our final state: the last K columns of [initial | x] (zeros when there was none)
    history = x.new_zeros(x.shape[0], x.shape[2], width) if initial_state is None else initial_state
    final = torch.cat([history.to(x.dtype), xt], dim=-1)[..., -width:]
    return y, final


# -- attention: flash_attn ----------------------------------------------------------------------


def _attention_runs(seq_idx: Tensor) -> tuple[Tensor, Tensor]:
    """Non-padding positions ``keep (B·L,)`` bool and ``cu_seqlens`` over them, refusing an
    id that appears in two separate runs of a row (mixstack lets those see each other)."""
    run = document_runs(seq_idx)[0]
    keep = (seq_idx >= 0).reshape(-1)
    for row_ids, row_run, row_keep in zip(seq_idx, run, seq_idx >= 0, strict=True):
        ids, runs = row_ids[row_keep], row_run[row_keep]
        if ids.unique().numel() != runs.unique().numel():
            raise _refuse(
                "flash_attn",
                attn.KERNEL,
                "a document id split by another document (its parts see each other in "
                "mixstack; varlen attention cannot express that)",
            )
    offsets = F.pad((run[:, -1] + 1).cumsum(0)[:-1], (1, 0))  # (B,) first run of each row
    flat_run = (run + offsets[:, None]).reshape(-1)  # (B·L,)
    counts = torch.bincount(flat_run[keep], minlength=int(flat_run.max().item()) + 1)
    counts = counts[counts > 0]  # runs made only of padding drop out
    cu_kept = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
    return keep, cu_kept


@register_backend(
    attn.KERNEL,
    "flash_attn",
    available=_importable("flash_attn"),
    applies=_cuda(HALF),
    install_hint=HINT,
)
def attention_flash_attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    window: int | None = None,
    scale: float | None = None,
    q_positions: Tensor | None = None,
    q_seq_idx: Tensor | None = None,
    k_seq_idx: Tensor | None = None,
) -> Tensor:
    """Attention through flash-attn (fp16/bf16). Packed rows go through the varlen entry
    point with padding dropped; it needs the same ids for queries and keys."""
    attn.check_inputs(q, k, v, q_seq_idx, k_seq_idx, window)
    if q_positions is not None:
        raise _refuse("flash_attn", attn.KERNEL, "explicit q_positions")
    fa = _module("flash_attn")
    left = -1 if window is None else window - 1
    window_size = (left, 0 if causal else -1)
    if q_seq_idx is None and k_seq_idx is None:
        return fa.flash_attn_func(
            q, k, v, softmax_scale=scale, causal=causal, window_size=window_size
        )
    if q_seq_idx is None or k_seq_idx is None or not torch.equal(q_seq_idx, k_seq_idx):
        raise _refuse("flash_attn", attn.KERNEL, "different query and key seq_idx")
    keep, cu = _attention_runs(q_seq_idx)
    bsz, length, heads = q.shape[:3]
    longest = int((cu[1:] - cu[:-1]).max().item()) if cu.numel() > 1 else 0
    qf, kf, vf = (t.reshape(bsz * length, *t.shape[2:])[keep] for t in (q, k, v))
    of = fa.flash_attn_varlen_func(
        qf,
        kf,
        vf,
        cu,
        cu,
        longest,
        longest,
        softmax_scale=scale,
        causal=causal,
        window_size=window_size,
    )  # (kept, H, Pv)
    out = q.new_zeros(bsz * length, heads, v.shape[-1])
    out[keep] = of.to(q.dtype)
    return out.reshape(bsz, length, heads, v.shape[-1])
