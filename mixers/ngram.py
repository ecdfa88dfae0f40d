"""n-gram layer (Akyürek et al. 2024, "In-Context Language Learning: Architectures and
Algorithms"; reference code berlino/seq_icl ``Ngram``), docs/math.md#n-gram-layers.

With token ids ``t`` and ``k = match_len``, position ``i`` averages the layer inputs at
every earlier position ``j`` whose preceding ``k`` tokens equal the ``k`` tokens ending
at ``i`` (the tokens that *followed* earlier occurrences of the current k-gram)::

    A[i, j] = 1  iff  j < i  and  t_{i-r} = t_{j-1-r}  for r = 0..k-1
    h_i = Σ_j A[i, j] x_j / Σ_j A[i, j]        (0 when the row is empty)
    y = t0(h) + t1(x)                           (t0, t1: Linear(D, D) with bias)

So ``k = 1`` is the classic induction head (in-context bigram statistics) and
``match_len = k`` gives in-context (k+1)-gram statistics. No softmax, no heads, no
learned attention weights. Packed rows (``seq_idx``) never match across documents and
padding never matches or is averaged.

Memory: the match matrix is built row-chunk by row-chunk as booleans with a running
AND over the ``k`` shifted token comparisons (never ``k`` integer masks); a custom
autograd function recomputes the chunks in backward instead of saving float copies.

Matrix view: ``M = A / rowsum(A)`` (one head), the value stream is ``x``; ``finish``
applies ``t0`` and adds ``t1(x)``. Capabilities: causal, ``needs_input_ids``, decode.
Decode state: token-id, document-id and input histories (``max_len·(D + 2)`` values
per sequence); a step compares the current k-gram with the history, O(L).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from mixstack.dsl.base import Capabilities, LayerConfig, LayerExample
from mixstack.dsl.context import LayerContext
from mixstack.dsl.errors import CapabilityError
from mixstack.dsl.registry import register
from mixstack.kernels.common import document_runs, zero_padding
from mixstack.mixers.base import Mixer, MixTerms, State

# Entries (batch × rows × keys) of one chunk of the match matrix: bounds the boolean
# chunk and its float copy (32 MiB in fp64) whatever B and L are.
CHUNK_ENTRIES = 1 << 22


class NgramConfig(LayerConfig):
    """n-gram layer: uniform average over the successors of earlier k-gram matches."""

    type: Literal["ngram"] = "ngram"
    match_len: int = Field(
        1,
        ge=1,
        description="k: tokens that must match (k = 1 is an induction head; the layer "
        "then uses in-context (k+1)-gram statistics)",
    )

    def capabilities(self, ctx: LayerContext) -> Capabilities:
        return Capabilities(causal=True, decode=True, needs_input_ids=True)

    @classmethod
    def examples(cls) -> list[LayerExample]:
        return [
            LayerExample(cls(match_len=1), name="k1"),
            LayerExample(cls(match_len=2), name="k2"),
            LayerExample(cls(match_len=3), name="k3"),
        ]


@dataclass
class NgramMatch:
    """What the match matrix of rows ``row_start..T-1`` over keys ``0..T-1`` depends on.

    row_ids: (k, B, T) long, ``row_ids[r, :, i] = t_{i-r}`` (-1 off the edge or padding).
    key_ids: (k, B, T) long, ``key_ids[r, :, j] = t_{j-1-r}`` (-2 off the edge or padding).
    row_run: (B, T) document run of i (-3 for padding rows: matches nothing).
    row_first_run: (B, T) run of i-k+1 (-1 off the edge): the k-gram lies in i's document.
    key_first_run: (B, T) run of j-k (-2 off the edge or if j is padding).
    row_start: first row computed (a prefill continues after the cached rows).
    """

    row_ids: Tensor
    key_ids: Tensor
    row_run: Tensor
    row_first_run: Tensor
    key_first_run: Tensor
    row_start: int = 0

    @property
    def n_keys(self) -> int:
        return self.row_ids.shape[-1]

    def chunk(self, s: int, e: int) -> Tensor:
        """Boolean match rows ``s..e-1`` (absolute positions), ``(B, e-s, T)``."""
        T = self.n_keys
        device = self.row_ids.device
        rows = torch.arange(s, e, device=device)
        keys = torch.arange(T, device=device)
        # j < i: (C, T), broadcast over the batch
        mask = (keys[None, :] < rows[:, None]).unsqueeze(0)
        run = self.row_run[:, s:e, None]  # (B, C, 1)
        mask = mask & (self.key_first_run[:, None, :] == run)  # (B, C, T) bool
        mask &= self.row_first_run[:, s:e, None] == run
        for r in range(self.row_ids.shape[0]):  # running AND over the k shifts
            mask &= self.row_ids[r, :, s:e, None] == self.key_ids[r, :, None, :]
        return mask

    def chunks(self, batch: int) -> list[tuple[int, int]]:
        T = self.n_keys
        step = max(1, CHUNK_ENTRIES // max(1, batch * T))
        return [(s, min(s + step, T)) for s in range(self.row_start, T, step)]


def _shifted(x: Tensor, shift: int, fill: int) -> Tensor:
    """``out[:, i] = x[:, i - shift]`` (``fill`` where ``i < shift``), x (B, T)."""
    if shift == 0:
        return x
    return F.pad(x, (shift, 0), value=fill)[:, : x.shape[1]]


def ngram_match(
    ids: Tensor, seq_idx: Tensor | None, match_len: int, row_start: int = 0
) -> NgramMatch:
    """The match description of ``ids (B, T)`` packed as ``seq_idx (B, T)`` (-1 padding)."""
    ids = ids.long()
    B, T = ids.shape
    if seq_idx is None:
        run = torch.zeros(B, T, dtype=torch.long, device=ids.device)
        pad = torch.zeros(B, T, dtype=torch.bool, device=ids.device)
    else:
        run, pad = document_runs(seq_idx.long())
    k = match_len
    row_tok = ids.masked_fill(pad, -1)
    key_tok = ids.masked_fill(pad, -2)
    row_ids = torch.stack([_shifted(row_tok, r, -1) for r in range(k)])
    key_ids = torch.stack([_shifted(key_tok, r + 1, -2) for r in range(k)])
    row_run = run.masked_fill(pad, -3)
    key_first_run = _shifted(run, k, -2).masked_fill(pad, -2)  # the key j itself is real
    return NgramMatch(
        row_ids=row_ids,
        key_ids=key_ids,
        row_run=row_run,
        row_first_run=_shifted(run, k - 1, -1),
        key_first_run=key_first_run,
        row_start=row_start,
    )


def _average(match: NgramMatch, v: Tensor) -> Tensor:
    """``(A / rowsum A) v`` for rows ``row_start..T-1``: v (B, T, P) -> (B, T - row_start, P)."""
    out = v.new_empty(v.shape[0], match.n_keys - match.row_start, v.shape[2])
    for s, e in match.chunks(v.shape[0]):
        mask = match.chunk(s, e)  # (B, C, T) bool
        counts = mask.sum(dim=-1, keepdim=True).clamp(min=1).to(v.dtype)  # (B, C, 1)
        out[:, s - match.row_start : e - match.row_start] = (mask.to(v.dtype) @ v) / counts
    return out


def _average_transposed(match: NgramMatch, g: Tensor) -> Tensor:
    """Adjoint of :func:`_average`: g (B, T - row_start, P) -> (B, T, P)."""
    out = g.new_zeros(g.shape[0], match.n_keys, g.shape[2])
    for s, e in match.chunks(g.shape[0]):
        mask = match.chunk(s, e)  # (B, C, T)
        counts = mask.sum(dim=-1, keepdim=True).clamp(min=1).to(g.dtype)
        rows = g[:, s - match.row_start : e - match.row_start] / counts  # (B, C, P)
        out += mask.to(g.dtype).transpose(1, 2) @ rows
    return out


class _NgramAverage(torch.autograd.Function):
    """Row-normalised match matrix times v, recomputing the boolean chunks in backward
    (only the token/run tensors, O(k·B·T), are kept for it)."""

    @staticmethod
    def forward(ctx: Any, v: Tensor, match: NgramMatch) -> Tensor:
        ctx.match = match
        return _average(match, v)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _average_transposed(ctx.match, grad.contiguous()), None


def ngram_average(match: NgramMatch, v: Tensor) -> Tensor:
    """``h = (A / rowsum A) v``, v (B, T, P) -> (B, T - row_start, P); differentiable in v."""
    return _NgramAverage.apply(v, match)


@dataclass
class NgramState(State):
    """Histories with static shapes; slot ``s`` holds the token at offset ``s``.

    ids: (B, S) token ids. xs: (B, S, D) layer inputs. seq_ids: (B, S) document id per
    slot (-1 = padding). seq_id: (B,) document the next token continues. offset: filled
    slots.
    """

    ids: Tensor
    xs: Tensor
    seq_ids: Tensor
    seq_id: Tensor
    offset: int = 0


@register(NgramConfig)
class Ngram(Mixer):
    """n-gram layer; see the module docstring for the equations, memory and state."""

    cfg: NgramConfig

    def __init__(self, cfg: NgramConfig, ctx: LayerContext):
        super().__init__(cfg, ctx)
        self.match_len = self.cfg.match_len
        D = ctx.d_model
        self.t0 = nn.Linear(D, D)  # applied to the n-gram average h
        self.t1 = nn.Linear(D, D)  # applied to the layer input x

    def _ids(self, input_ids: Tensor | None, x: Tensor) -> Tensor:
        if input_ids is None:
            raise CapabilityError(
                "ngram layer needs the token ids (capability `needs_input_ids`): call it as "
                "layer(x, input_ids=ids) / layer.step(x_t, state, token_t=ids_t); a model "
                "built from a spec passes them itself"
            )
        if input_ids.shape != x.shape[:2]:
            raise CapabilityError(
                f"ngram layer: input_ids has shape {tuple(input_ids.shape)}, expected "
                f"{tuple(x.shape[:2])} (the (B, L) of x)"
            )
        return input_ids

    def _finish(self, h: Tensor, x: Tensor, seq_idx: Tensor | None) -> Tensor:
        """h, x (B, L, D) -> t0(h) + t1(x); padding positions output exactly 0."""
        return zero_padding(self.t0(h) + self.t1(x), seq_idx)

    # -- forward and matrix view ------------------------------------------------------------
    def forward_sequence(
        self, x: Tensor, *, input_ids: Tensor | None, seq_idx: Tensor | None
    ) -> Tensor:
        """x (B, L, D) -> (B, L, D)."""
        match = ngram_match(self._ids(input_ids, x), seq_idx, self.match_len)
        return self._finish(ngram_average(match, x), x, seq_idx)

    def mixing_terms(
        self, x: Tensor, *, input_ids: Tensor | None = None, seq_idx: Tensor | None = None
    ) -> MixTerms:
        match = ngram_match(self._ids(input_ids, x), seq_idx, self.match_len)
        return MixTerms([(match, x[:, :, None, :])], lambda h: self._finish(h[:, :, 0], x, seq_idx))

    def mix(self, coeffs: NgramMatch, v: Tensor) -> Tensor:
        """Row-normalised match matrix applied to v (B, L, 1, P), any P."""
        B, L, H, P = v.shape
        return ngram_average(coeffs, v.reshape(B, L, H * P)).reshape(B, L, H, P)

    # -- decoding -----------------------------------------------------------------------------
    def init_state(
        self, batch: int, max_len: int, *, device: torch.device | str | None, dtype: torch.dtype
    ) -> NgramState:
        return NgramState(
            ids=torch.zeros(batch, max_len, dtype=torch.long, device=device),
            xs=torch.zeros(batch, max_len, self.ctx.d_model, dtype=dtype, device=device),
            seq_ids=torch.full((batch, max_len), -1, dtype=torch.long, device=device),
            seq_id=torch.zeros(batch, dtype=torch.long, device=device),
        )

    def step(self, x_t: Tensor, state: State, *, token_t: Tensor | None = None) -> Tensor:
        """One token x_t (B, D) -> (B, D): a prefill of length 1."""
        if token_t is None:
            self._ids(None, x_t[:, None])
        return self.prefill(x_t[:, None], state, input_ids=token_t[:, None], seq_idx=None)[:, 0]

    def prefill(
        self, x: Tensor, state: State, *, input_ids: Tensor | None, seq_idx: Tensor | None
    ) -> Tensor:
        """Append the chunk to the histories, then compute its rows against all of them.

        The rows' own k-grams are compared with keys ``j < i`` only, so a token never
        matches itself ("aaaa" at i reads x_{i-1}, x_{i-2}, ... but not x_i). Without
        ``seq_idx`` the chunk continues each row's current document.
        """
        state = self.own_state(state, NgramState)
        ids = self._ids(input_ids, x)
        B, L, _ = x.shape
        start, end = state.offset, state.offset + L
        if end > state.ids.shape[1]:
            raise CapabilityError(
                f"ngram history overflow: it holds {state.ids.shape[1]} tokens, {start} are "
                f"filled and this call adds {L}; allocate init_state(..., max_len >= {end})"
            )
        docs = state.seq_id[:, None].expand(B, L) if seq_idx is None else seq_idx.long()
        state.ids[:, start:end] = ids
        state.xs[:, start:end] = x.to(state.xs.dtype)
        state.seq_ids[:, start:end] = docs
        real = docs >= 0
        last = torch.where(real, torch.arange(L, device=x.device), -1).amax(dim=1)  # (B,)
        last_id = docs.gather(1, last.clamp(min=0)[:, None])[:, 0]
        state.seq_id.copy_(torch.where(last >= 0, last_id, state.seq_id))
        state.offset = end
        match = ngram_match(state.ids[:, :end], state.seq_ids[:, :end], self.match_len, start)
        values = torch.cat([state.xs[:, :start].to(x.dtype), x], dim=1)  # (B, end, D)
        return self._finish(ngram_average(match, values), x, docs)

    # -- bookkeeping ----------------------------------------------------------------------------
    def flops_per_token(self, seq_len: int) -> float:
        D = self.ctx.d_model
        mean_keys = (seq_len - 1) / 2  # earlier positions a row may average
        return 2.0 * 2 * D * D + 2.0 * D * mean_keys
