"""Multi-head softmax attention: MHA, GQA, MQA, sliding window, RoPE (docs/math.md#attention).

``q = x W_q``, ``k = x W_k``, ``v = x W_v`` split into heads, RoPE on q and k,
``o_h = softmax(q_h k_{g(h)}ᵀ · s + mask) v_{g(h)}`` with KV head ``g(h) = h // (H/Hkv)``,
heads concatenated, ``out = o W_o``. Parameter names follow HF Llama
(``q_proj``/``k_proj``/``v_proj``/``o_proj``).

Matrix view: ``M_h[i, j] = softmax_j(q_i·k_j·s + mask_ij)`` (per query head), the value
stream is ``v`` expanded to the H query heads; ``finish`` is the output projection.

Capabilities: causal when ``causal`` (default: the arch is ``causal_lm``); decode
iff causal. Decode state: K and V caches ``2·S·Hkv·P`` values per sequence plus one
int32 document id per slot, with ``S = max_len`` for full attention (the state grows
with the context) and ``S = min(window, max_len)`` with a sliding ``window``: a ring
buffer of the last ``window`` keys, so the state is bounded and decoding may run past
``max_seq_len`` (keys are stored after RoPE at their absolute positions, computed on
the fly). Kernel: ``attention`` (backends ``torch`` = SDPA, ``reference``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from mixstack.blocks.causality import ArchCausalConfig
from mixstack.blocks.rope import Rope, document_positions
from mixstack.dsl.base import Capabilities, LayerConfig, LayerExample
from mixstack.dsl.context import LayerContext
from mixstack.dsl.errors import CapabilityError, divisors
from mixstack.dsl.registry import register
from mixstack.kernels.attention import attention
from mixstack.kernels.common import zero_padding
from mixstack.mixers.base import Mixer, MixTerms, ParamHint, State

CheckResult = list[tuple[tuple[str | int, ...], str]]


class RopeConfig(BaseModel):
    """Rotate-half rotary position embedding (GPT-NeoX / Llama layout)."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False
    )

    theta: float = Field(10000.0, gt=0, description="RoPE base: inv_freq_m = theta^(-2m/dim)")
    dim: int | None = Field(
        None,
        ge=1,
        description="rotary dims per head (even, <= head_dim; the rest pass through); "
        "None -> head_dim",
    )


class AttentionConfig(ArchCausalConfig, LayerConfig):
    """Softmax attention (Vaswani et al. 2017), grouped-query (Ainslie et al. 2023)."""

    type: Literal["attention"] = "attention"
    n_heads: int = Field(8, ge=1, description="query heads H")
    n_kv_heads: int | None = Field(
        None, ge=1, description="key/value heads (divides n_heads; 1 = MQA); None -> n_heads"
    )
    head_dim: int | None = Field(None, ge=1, description="P per head; None -> d_model // n_heads")
    causal: bool | None = Field(
        None, description="mask future keys; None -> true iff the arch is causal_lm"
    )
    window: int | None = Field(
        None, ge=1, description="sliding window: a query sees itself and window-1 earlier keys"
    )
    rope: RopeConfig | None = Field(
        default_factory=RopeConfig, description="rotary position embedding; null = no RoPE"
    )
    qkv_bias: bool = Field(False, description="bias on q_proj, k_proj and v_proj")
    out_bias: bool = Field(False, description="bias on o_proj")
    softmax_scale: float | None = Field(
        None, gt=0, description="multiplies q·k before the softmax; None -> 1/sqrt(head_dim)"
    )

    def capabilities(self, ctx: LayerContext) -> Capabilities:
        causal = self.is_causal(ctx)
        return Capabilities(causal=causal, decode=causal)

    def resolve(self, ctx: LayerContext) -> AttentionConfig:
        head_dim = self.head_dim
        if head_dim is None and ctx.d_model % self.n_heads == 0:
            head_dim = ctx.d_model // self.n_heads  # left None otherwise: check() reports it
        rope = self.rope
        if rope is not None and rope.dim is None and head_dim is not None:
            rope = rope.model_copy(update={"dim": head_dim})
        return self.model_copy(
            update={
                "n_kv_heads": self.n_heads if self.n_kv_heads is None else self.n_kv_heads,
                "head_dim": head_dim,
                "causal": self.is_causal(ctx),
                "rope": rope,
            }
        )

    def check(self, ctx: LayerContext) -> CheckResult:
        out: CheckResult = []
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            out.append(
                (
                    ("n_kv_heads",),
                    f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                    f"({self.n_kv_heads}); allowed n_kv_heads: "
                    f"{', '.join(str(d) for d in divisors(self.n_heads))}",
                )
            )
        head_dim = self.head_dim
        if head_dim is None:
            if ctx.d_model % self.n_heads:
                out.append(
                    (
                        ("n_heads",),
                        f"d_model ({ctx.d_model}) is not divisible by n_heads "
                        f"({self.n_heads}); set head_dim or pick n_heads in "
                        f"{', '.join(str(d) for d in divisors(ctx.d_model))}",
                    )
                )
            else:
                head_dim = ctx.d_model // self.n_heads
        out.extend(self._check_rope(head_dim))
        if self.window is not None and not self.is_causal(ctx):
            out.append(
                (
                    ("window",),
                    f"window ({self.window}) needs causal attention (a query sees itself and "
                    f"window-1 earlier keys), but this layer is bidirectional "
                    f"(causal false, arch {ctx.arch}); remove window or set causal: true",
                )
            )
        return out

    def _check_rope(self, head_dim: int | None) -> CheckResult:
        dim = None if self.rope is None else (self.rope.dim or head_dim)
        if dim is None:
            return []
        if dim % 2:
            return [
                (
                    ("rope", "dim"),
                    f"rotary dim must be even (pairs of channels), got {dim}; rope.dim "
                    "defaults to head_dim, set it to an even value <= head_dim",
                )
            ]
        if head_dim is not None and dim > head_dim:
            return [(("rope", "dim"), f"rotary dim ({dim}) exceeds head_dim ({head_dim})")]
        return []

    @classmethod
    def examples(cls) -> list[LayerExample]:
        return [
            LayerExample(cls(n_heads=4), name="causal-mha-rope"),
            LayerExample(cls(n_heads=4, n_kv_heads=2), name="gqa"),
            LayerExample(cls(n_heads=4, n_kv_heads=1, rope=RopeConfig(theta=500.0)), name="mqa"),
            LayerExample(cls(n_heads=2, n_kv_heads=1, window=3), name="sliding-window"),
            LayerExample(cls(n_heads=4), arch="encoder", name="bidirectional"),
            LayerExample(cls(n_heads=4, rope=None), name="no-rope"),
            LayerExample(
                cls(n_heads=2, head_dim=12, rope=RopeConfig(dim=4), softmax_scale=0.5),
                name="partial-rotary",
            ),
            LayerExample(cls(n_heads=4, qkv_bias=True, out_bias=True), name="biases"),
        ]


def mean_visible_keys(seq_len: int, causal: bool, window: int | None) -> float:
    """Keys a query sees, averaged over the queries of one sequence of ``seq_len``."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    L = seq_len
    total = L * (L + 1) / 2 if causal else float(L * L)
    if window is not None and window < L:
        total -= (L - window) * (L - window + 1) / 2  # keys older than the window
    return total / L


@dataclass
class AttentionState(State):
    """KV cache with static shapes; slot ``s`` holds the token written at offset ``s``
    (full attention) or the latest token written at an offset ``≡ s (mod S)`` (sliding
    window: a ring buffer of ``S = min(window, max_len)`` slots).

    k, v: (B, S, Hkv, P) after RoPE. seq_ids: (B, S) document id per slot, -1 = empty or
    padding (never attended). next_pos: (B,) RoPE position of the next token of the
    row's current document, seq_id: (B,) that document's id. offset: tokens written so
    far (the filled slots are the last min(offset, S) of them).
    """

    k: Tensor
    v: Tensor
    seq_ids: Tensor
    next_pos: Tensor
    seq_id: Tensor
    offset: int = 0


@dataclass
class AttentionCoeffs:
    """What ``mix`` needs: q, k after RoPE, k expanded to the query heads, document ids."""

    q: Tensor  # (B, L, H, P)
    k: Tensor  # (B, L, H, P)
    seq_idx: Tensor | None  # (B, L)


@register(AttentionConfig)
class Attention(Mixer):
    """Softmax attention mixer; see the module docstring for equations and state size."""

    cfg: AttentionConfig

    def __init__(self, cfg: AttentionConfig, ctx: LayerContext):
        super().__init__(cfg, ctx)
        cfg = self.cfg  # resolved and checked by Mixer.__init__
        assert cfg.n_kv_heads is not None and cfg.head_dim is not None  # set by resolve
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.causal = bool(cfg.causal)
        D, H, Hkv, P = ctx.d_model, self.n_heads, self.n_kv_heads, self.head_dim
        self.q_proj = nn.Linear(D, H * P, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(D, Hkv * P, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(D, Hkv * P, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(H * P, D, bias=cfg.out_bias)
        rope = cfg.rope
        self.rope = None if rope is None else Rope(dim=rope.dim or P, theta=rope.theta)

    # -- pieces shared by forward, the matrix view and decoding -------------------------
    def _project(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, L, D) -> q (B, L, H, P), k, v (B, L, Hkv, P); RoPE at ``positions``."""
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, L, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, L, self.n_kv_heads, self.head_dim)
        if self.rope is not None:
            q, k = self.rope(q, positions), self.rope(k, positions)
        return q, k, v

    def _positions(self, seq_idx: Tensor | None, L: int, device: torch.device) -> Tensor:
        if seq_idx is None:
            return torch.arange(L, device=device)  # (L,)
        return document_positions(seq_idx)[0]  # (B, L): restart at each document

    def _attend(
        self, q: Tensor, k: Tensor, v: Tensor, q_seq: Tensor | None, k_seq: Tensor | None
    ) -> Tensor:
        return attention(
            q,
            k,
            v,
            causal=self.causal,
            window=self.cfg.window,
            scale=self.cfg.softmax_scale,
            q_seq_idx=q_seq,
            k_seq_idx=k_seq,
            backends=self.backends,
        )

    def _finish(self, o: Tensor, seq_idx: Tensor | None) -> Tensor:
        """o (B, L, H, P) -> (B, L, D); padding positions (seq_idx -1) output exactly 0."""
        B, L = o.shape[:2]
        out = self.o_proj(o.reshape(B, L, -1))
        return zero_padding(out, seq_idx)

    # -- forward and matrix view -------------------------------------------------------
    def forward_sequence(
        self, x: Tensor, *, input_ids: Tensor | None, seq_idx: Tensor | None
    ) -> Tensor:
        """x (B, L, D) -> (B, L, D)."""
        q, k, v = self._project(x, self._positions(seq_idx, x.shape[1], x.device))
        return self._finish(self._attend(q, k, v, seq_idx, seq_idx), seq_idx)

    def mixing_terms(
        self, x: Tensor, *, input_ids: Tensor | None = None, seq_idx: Tensor | None = None
    ) -> MixTerms:
        q, k, v = self._project(x, self._positions(seq_idx, x.shape[1], x.device))
        group = self.n_heads // self.n_kv_heads  # query head h reads KV head h // group
        k_h = k.repeat_interleave(group, dim=2)  # (B, L, H, P)
        v_h = v.repeat_interleave(group, dim=2)  # (B, L, H, P)
        coeffs = AttentionCoeffs(q=q, k=k_h, seq_idx=seq_idx)
        return MixTerms([(coeffs, v_h)], lambda o: self._finish(o, seq_idx))

    def mix(self, coeffs: AttentionCoeffs, v: Tensor) -> Tensor:
        """Softmax weights applied to v (B, L, H, Pv), any Pv -> (B, L, H, Pv)."""
        return self._attend(coeffs.q, coeffs.k, v, coeffs.seq_idx, coeffs.seq_idx)

    # -- decoding ------------------------------------------------------------------------
    def init_state(
        self, batch: int, max_len: int, *, device: torch.device | str | None, dtype: torch.dtype
    ) -> AttentionState:
        self.require_decode()
        window = self.cfg.window
        slots = max_len if window is None else min(window, max_len)
        shape = (batch, slots, self.n_kv_heads, self.head_dim)
        return AttentionState(
            k=torch.zeros(shape, device=device, dtype=dtype),
            v=torch.zeros(shape, device=device, dtype=dtype),
            seq_ids=torch.full((batch, slots), -1, device=device, dtype=torch.int32),
            next_pos=torch.zeros(batch, device=device, dtype=torch.long),
            seq_id=torch.zeros(batch, device=device, dtype=torch.long),
        )

    def step(self, x_t: Tensor, state: State, *, token_t: Tensor | None = None) -> Tensor:
        """One token x_t (B, D) -> (B, D): a prefill of length 1."""
        return self.forward(x_t[:, None], state=state)[:, 0]

    def prefill(
        self, x: Tensor, state: State, *, input_ids: Tensor | None, seq_idx: Tensor | None
    ) -> Tensor:
        """Write q/k/v of the chunk at [offset, offset + L) and attend over the cache.

        Queries sit at key slots offset..offset+L-1 (the kernel's default bottom-right
        alignment). Without ``seq_idx`` the chunk continues each row's current document.
        """
        return self._prefill(x, seq_idx, self.own_state(state, AttentionState))

    def _prefill(self, x: Tensor, seq_idx: Tensor | None, state: AttentionState) -> Tensor:
        if self.cfg.window is not None:
            return self._prefill_ring(x, seq_idx, state, self.cfg.window)
        B, L, _ = x.shape
        start, end = state.offset, state.offset + L
        max_len = state.k.shape[1]
        if end > max_len:
            raise CapabilityError(
                f"attention KV cache overflow: it holds {max_len} tokens, {start} are filled "
                f"and this call adds {L}; allocate init_state(..., max_len >= {end})"
            )
        ids = state.seq_id[:, None].expand(B, L) if seq_idx is None else seq_idx.long()
        positions, last_id, next_pos = document_positions(
            ids, start_id=state.seq_id, start_pos=state.next_pos
        )
        q, k, v = self._project(x, positions)
        state.k[:, start:end] = k.to(state.k.dtype)
        state.v[:, start:end] = v.to(state.v.dtype)
        state.seq_ids[:, start:end] = ids.to(state.seq_ids.dtype)
        state.next_pos.copy_(next_pos)
        state.seq_id.copy_(last_id)
        state.offset = end
        k_all, v_all = state.k[:, :end].to(q.dtype), state.v[:, :end].to(q.dtype)
        o = self._attend(q, k_all, v_all, ids, state.seq_ids[:, :end])
        return self._finish(o, ids)

    def _prefill_ring(
        self, x: Tensor, seq_idx: Tensor | None, state: AttentionState, window: int
    ) -> Tensor:
        """Sliding-window prefill over a ring buffer of ``S`` slots.

        The cached keys are read back in time order (the last ``min(offset, S)`` tokens)
        and put in front of the chunk's own, so the kernel's bottom-right alignment and
        window mask see one contiguous key axis; then the last ``min(L, S)`` tokens of the
        chunk overwrite their slots ``offset mod S``. Keys older than the window were
        never needed: with ``S = window`` a query sees itself and the ``window - 1`` keys
        before it, all still cached.
        """
        B, L, _ = x.shape
        start, end = state.offset, state.offset + L
        slots = state.k.shape[1]
        if slots < window and end > slots:  # allocated for fewer tokens than the window
            raise CapabilityError(
                f"attention KV cache overflow: it holds {slots} tokens, {start} are filled "
                f"and this call adds {L}; allocate init_state(..., max_len >= {end})"
            )
        ids = state.seq_id[:, None].expand(B, L) if seq_idx is None else seq_idx.long()
        positions, last_id, next_pos = document_positions(
            ids, start_id=state.seq_id, start_pos=state.next_pos
        )
        q, k, v = self._project(x, positions)  # RoPE at the tokens' absolute positions
        cached = torch.arange(start - min(start, slots), start, device=x.device) % slots
        k_all = torch.cat((state.k[:, cached].to(q.dtype), k), dim=1)  # (B, Lk, Hkv, P)
        v_all = torch.cat((state.v[:, cached].to(q.dtype), v), dim=1)
        ids_all = torch.cat((state.seq_ids[:, cached].long(), ids), dim=1)  # (B, Lk)
        o = self._attend(q, k_all, v_all, ids, ids_all)
        kept = min(L, slots)
        written = torch.arange(end - kept, end, device=x.device) % slots  # (kept,)
        state.k[:, written] = k[:, L - kept :].to(state.k.dtype)
        state.v[:, written] = v[:, L - kept :].to(state.v.dtype)
        state.seq_ids[:, written] = ids[:, L - kept :].to(state.seq_ids.dtype)
        state.next_pos.copy_(next_pos)
        state.seq_id.copy_(last_id)
        state.offset = end
        return self._finish(o, ids)

    @property
    def bounded_state(self) -> bool:
        """With a sliding ``window`` the cache is a ring buffer of ``window`` slots."""
        return self.cfg.window is not None

    def unbounded_reason(self) -> str:
        return (
            "full attention keeps every key and value (a KV cache growing with the "
            "context); a sliding `window` would bound it"
        )

    def no_decode_reason(self) -> str:
        return (
            "bidirectional attention (causal false) cannot decode token by token: "
            "every output depends on future tokens"
        )

    # -- bookkeeping ---------------------------------------------------------------------
    def param_hints(self) -> dict[str, ParamHint]:
        return {"o_proj.weight": ParamHint(residual_out=True)}

    def flops_per_token(self, seq_len: int) -> float:
        D, H, Hkv, P = self.ctx.d_model, self.n_heads, self.n_kv_heads, self.head_dim
        projection_macs = D * H * P + 2 * D * Hkv * P + H * P * D
        keys = mean_visible_keys(seq_len, self.causal, self.cfg.window)
        return 2.0 * projection_macs + 4.0 * H * P * keys
