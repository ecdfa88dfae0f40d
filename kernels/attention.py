"""Scaled dot-product attention with masks, GQA and KV-cache alignment (docs/math.md#attention).

One signature, two backends:

* ``reference``: the materialized score matrix, an explicit boolean mask and a softmax
  in fp32 (or fp64 for fp64 inputs). Readable; used by the tests.
* ``torch``: ``torch.nn.functional.scaled_dot_product_attention`` (SDPA), which picks
  flash / memory-efficient / math kernels by itself.

Visibility rule (both backends). Queries carry absolute positions on the key axis,
``pos`` (default bottom-right alignment: the ``Lq`` queries are the last ``Lq`` of the
``Lk`` keys, so ``pos_i = Lk - Lq + i``). Key ``j`` is visible to query ``i`` iff

* ``not causal`` or ``j <= pos_i``;
* ``window is None`` or ``pos_i - j < window`` (the query and ``window - 1`` keys before);
* with sequence ids: ``q_seq[i] == k_seq[j]`` and ``k_seq[j] >= 0`` (-1 is padding).

A query that sees no key at all outputs exactly 0, forward and backward (no NaN).

Callers use the dispatcher :func:`attention` (the reference's signature plus
``backends``, the policy that picks the backend).

SDPA trap (docs/math.md#pitfalls): ``is_causal=True`` is top-left aligned, which is only right
when ``Lq == Lk``; any other case gets an explicit bottom-right boolean mask.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mixstack.kernels.backends import (
    BackendPolicy,
    dispatch,
    register_backend,
)

KERNEL = "attention"


def _torch_minor() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


# SDPA learned `enable_gqa` in torch 2.5; older versions get explicitly repeated KV heads.
_SDPA_HAS_GQA = _torch_minor() >= (2, 5)


def check_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_seq_idx: Tensor | None,
    k_seq_idx: Tensor | None,
    window: int | None,
) -> None:
    """Raise ``ValueError`` naming the mismatch; kernels get shapes from code, not users."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention expects q (B, Lq, H, P), k (B, Lk, Hkv, P), v (B, Lk, Hkv, Pv); "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    (B, _, H, P), (Bk, Lk, Hkv, Pk) = q.shape, k.shape
    if Bk != B or v.shape[0] != B or v.shape[1] != Lk or v.shape[2] != Hkv or Pk != P:
        raise ValueError(
            f"attention shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)} (need matching B, Lk, Hkv and P)"
        )
    if H % Hkv != 0:
        raise ValueError(f"attention: {H} query heads is not a multiple of {Hkv} KV heads")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if (q_seq_idx is None) != (k_seq_idx is None):
        raise ValueError("attention: give both q_seq_idx and k_seq_idx, or neither")
    if window is not None and window < 1:
        raise ValueError(f"attention: window must be >= 1, got {window}")


def visibility_mask(
    Lq: int,
    Lk: int,
    *,
    causal: bool,
    window: int | None,
    q_positions: Tensor | None,
    q_seq_idx: Tensor | None,
    k_seq_idx: Tensor | None,
    device: torch.device,
) -> Tensor | None:
    """Boolean ``(B or 1, 1, Lq, Lk)`` mask, True = visible; None when nothing is masked."""
    if not causal and window is None and q_seq_idx is None:
        return None
    mask: Tensor | None = None
    if causal or window is not None:
        if q_positions is None:
            q_positions = torch.arange(Lk - Lq, Lk, device=device)
        pos = q_positions.to(device=device, dtype=torch.long)
        pos = pos[None] if pos.dim() == 1 else pos  # (B or 1, Lq)
        delta = pos[:, :, None] - torch.arange(Lk, device=device)  # (B|1, Lq, Lk): pos_i - j
        mask = torch.ones_like(delta, dtype=torch.bool)
        if causal:
            mask = mask & (delta >= 0)
        if window is not None:
            mask = mask & (delta < window)
    if q_seq_idx is not None and k_seq_idx is not None:
        same = q_seq_idx[:, :, None] == k_seq_idx[:, None, :]  # (B, Lq, Lk)
        same = same & (k_seq_idx[:, None, :] >= 0)
        mask = same if mask is None else mask & same
    assert mask is not None  # one of the branches above ran
    return mask[:, None]  # (B|1, 1, Lq, Lk)


@register_backend(KERNEL, "reference")
def attention_reference(
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
    """Materialized attention: explicit scores, mask and softmax.

    q (B, Lq, H, P), k (B, Lk, Hkv, P), v (B, Lk, Hkv, Pv) -> (B, Lq, H, Pv).
    Scores and softmax run in fp32 (fp64 for fp64 inputs), so bf16 inputs do not lose
    the softmax normalisation to rounding.
    """
    check_inputs(q, k, v, q_seq_idx, k_seq_idx, window)
    _, Lq, H, P = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    compute = torch.promote_types(q.dtype, torch.float32)
    group = H // Hkv  # query head h reads KV head h // group
    k_h = k.to(compute).repeat_interleave(group, dim=2)  # (B, Lk, H, P)
    v_h = v.to(compute).repeat_interleave(group, dim=2)  # (B, Lk, H, Pv)
    scale = 1.0 / math.sqrt(P) if scale is None else scale
    scores = torch.einsum("bihp,bjhp->bhij", q.to(compute), k_h) * scale  # (B, H, Lq, Lk)
    mask = visibility_mask(
        Lq,
        Lk,
        causal=causal,
        window=window,
        q_positions=q_positions,
        q_seq_idx=q_seq_idx,
        k_seq_idx=k_seq_idx,
        device=q.device,
    )
    if mask is None:
        probs = torch.softmax(scores, dim=-1)
    else:
        has_key = mask.any(dim=-1, keepdim=True)  # (B|1, 1, Lq, 1)
        scores = scores.masked_fill(~mask, float("-inf"))
        # An all -inf row would softmax to NaN; give it finite scores, then zero it.
        scores = scores.masked_fill(~has_key, 0.0)
        probs = torch.softmax(scores, dim=-1).masked_fill(~has_key, 0.0)
    out = torch.einsum("bhij,bjhp->bihp", probs, v_h)  # (B, Lq, H, Pv)
    return out.to(v.dtype)


def _is_plain_causal(
    causal: bool,
    window: int | None,
    q_positions: Tensor | None,
    q_seq_idx: Tensor | None,
) -> bool:
    return causal and window is None and q_positions is None and q_seq_idx is None


@register_backend(KERNEL, "torch")
def attention_torch(
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
    """SDPA fast path; same contract as :func:`attention_reference`.

    Uses ``is_causal=True`` only for square causal attention with nothing else masked
    (SDPA aligns it top-left); no mask at all when nothing is masked (bidirectional,
    or one causal query at the end of the keys); an explicit mask otherwise.
    """
    check_inputs(q, k, v, q_seq_idx, k_seq_idx, window)
    Lq, H = q.shape[1], q.shape[2]
    Lk, Hkv = k.shape[1], k.shape[2]
    plain_causal = _is_plain_causal(causal, window, q_positions, q_seq_idx)
    is_causal, mask, has_key = False, None, None
    if plain_causal and Lq == Lk:
        is_causal = True
    elif not (plain_causal and Lq == 1):  # a single last query sees every key
        mask = visibility_mask(
            Lq,
            Lk,
            causal=causal,
            window=window,
            q_positions=q_positions,
            q_seq_idx=q_seq_idx,
            k_seq_idx=k_seq_idx,
            device=q.device,
        )
    if mask is not None:
        # Rows without a visible key: let them see everything (finite softmax), zero later.
        has_key = mask.any(dim=-1, keepdim=True)  # (B|1, 1, Lq, 1)
        mask = mask | ~has_key
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, L, P)
    extra: dict[str, Any] = {}
    if Hkv != H:
        if _SDPA_HAS_GQA:
            extra["enable_gqa"] = True
        else:
            kt = kt.repeat_interleave(H // Hkv, dim=1)
            vt = vt.repeat_interleave(H // Hkv, dim=1)
    out = F.scaled_dot_product_attention(
        qt, kt, vt, attn_mask=mask, is_causal=is_causal, scale=scale, **extra
    )  # (B, H, Lq, Pv)
    if has_key is not None:
        out = torch.where(has_key, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out.transpose(1, 2)  # (B, Lq, H, Pv)


def attention(
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
    backends: BackendPolicy | None = None,
) -> Tensor:
    """Attention through the backend ``backends`` picks for ``q``'s device and dtype
    (``None``: ``auto``); arguments and result as in :func:`attention_reference`."""
    return dispatch(KERNEL, locals())
