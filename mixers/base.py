"""The mixer protocol (DESIGN §4).

A sequence mixer maps ``x (B, L, D) -> (B, L, D)``. Its core is split into
``coefficients`` (everything computed from the input) and ``mix`` (linear in the
value stream ``v``); ``mixing_terms`` returns both plus the outer ``finish``, and the
generic :func:`materialize` turns them into explicit ``(B, H, L, L)`` matrices by
applying ``mix`` to an identity basis in fp64. Channel mixers (MLP) implement only
``forward_sequence`` (and ``prefill``) and the bookkeeping methods.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from mixstack.dsl.base import Capabilities, LayerConfig
from mixstack.dsl.context import LayerContext
from mixstack.dsl.errors import CapabilityError, SpecError, SpecIssue
from mixstack.kernels.backends import BackendPolicy
from mixstack.kernels.causal_conv1d import causal_conv1d


@dataclass(frozen=True)
class ParamHint:
    """How the optimizer and casting treat one parameter.

    no_weight_decay: exclude from weight decay (norms, biases, SSM scalars).
    lr_scale: multiplies the base learning rate.
    keep_fp32: stays fp32 when the model is cast to bf16/fp16 (A_log, D, dt_bias).
    residual_out: the projection writing into the residual stream; the builder rescales
        its init by 1/sqrt(n_layers) (GPT-2 / mamba_ssm convention).
    """

    no_weight_decay: bool = False
    lr_scale: float = 1.0
    keep_fp32: bool = False
    residual_out: bool = False


@dataclass
class State:
    """Decode state: a dataclass of tensors with static shapes, batch first.

    Subclasses add tensor fields; non-tensor fields (ints) are shared by the whole
    batch. ``index_select`` reorders the batch (beam search).
    """

    def index_select(self, index: Tensor) -> State:
        changes = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor) and value.dim() > 0:
                changes[f.name] = value.index_select(0, index)
            elif isinstance(value, State):
                changes[f.name] = value.index_select(index)
            elif isinstance(value, list) and value and all(isinstance(v, State) for v in value):
                changes[f.name] = [v.index_select(index) for v in value]
        return dataclasses.replace(self, **changes)

    def tensors(self) -> list[Tensor]:
        out: list[Tensor] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                out.append(value)
            elif isinstance(value, State):
                out.extend(value.tensors())
            elif isinstance(value, list):
                for v in value:
                    if isinstance(v, State):
                        out.extend(v.tensors())
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


StateT = TypeVar("StateT", bound=State)


@dataclass
class MixTerms:
    """The matrix view of one call: ``out = finish(Σ_t mix(coeffs_t, v_t))``.

    terms: ``[(coeffs, v (B, L, H, P)), ...]``; ``mix`` is linear in ``v`` and must
        accept any P (materialize feeds P = L).
    finish: ``(B, L, H, P) -> (B, L, D)``: outer gates, norms, projections.
    """

    terms: list[tuple[Any, Tensor]]
    finish: Callable[[Tensor], Tensor]


class Mixer(nn.Module):
    """Base class of every registered layer module.

    Subclasses are registered with ``@register(TheirConfig)``. ``__init__`` resolves and
    checks the config (``self.cfg`` is the resolved one). Sequence mixers with a matrix
    view implement ``mixing_terms`` and ``mix`` (``forward`` is then derived) and may
    override ``forward_sequence`` with a faster path; others implement
    ``forward_sequence``. Decode mixers implement ``init_state``, ``step`` and
    ``prefill`` (``forward`` with a state), using ``own_state`` to check the state they
    get. Every refusal is a :class:`CapabilityError` (``decode_refusal``,
    ``check_length``, no matrix view).
    """

    config_cls: ClassVar[type[LayerConfig]]

    def __init__(self, cfg: LayerConfig, ctx: LayerContext):
        """Resolve ``cfg`` against ``ctx`` (``None`` defaults -> values), run its
        cross-field ``check`` and raise :class:`SpecError` listing every problem, so a
        layer built outside the loader is refused exactly as a spec would be. Subclasses
        call this first and read the resolved ``self.cfg``."""
        super().__init__()
        cfg = cfg.resolve(ctx)
        problems = cfg.check(ctx)
        if problems:
            raise SpecError([SpecIssue(message, path=path) for path, message in problems])
        self.cfg = cfg
        self.ctx = ctx
        self.capabilities: Capabilities = cfg.capabilities(ctx)
        # Shared by every layer of a model; the builder replaces it. Kernel calls go
        # through it, so the backend is resolved lazily per (kernel, device, dtype).
        self.backends: BackendPolicy = BackendPolicy.default()

    # -- the forward pass ---------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        *,
        input_ids: Tensor | None = None,
        seq_idx: Tensor | None = None,
        state: State | None = None,
    ) -> Tensor:
        """``x (B, L, D) -> (B, L, D)``: :meth:`forward_sequence` without ``state``,
        :meth:`prefill` with it. Subclasses override those two, not this."""
        if state is not None:
            return self.prefill(x, state, input_ids=input_ids, seq_idx=seq_idx)
        return self.forward_sequence(x, input_ids=input_ids, seq_idx=seq_idx)

    def forward_sequence(
        self, x: Tensor, *, input_ids: Tensor | None, seq_idx: Tensor | None
    ) -> Tensor:
        """Whole sequences, no decode state. Default: the matrix view, evaluated; a mixer
        with a faster path to the same output overrides this."""
        terms = self.mixing_terms(x, input_ids=input_ids, seq_idx=seq_idx)
        mixed = [self.mix(coeffs, v) for coeffs, v in terms.terms]
        return terms.finish(functools.reduce(operator.add, mixed))

    def prefill(
        self, x: Tensor, state: State, *, input_ids: Tensor | None, seq_idx: Tensor | None
    ) -> Tensor:
        """``forward`` that continues from ``state`` and fills it (chunked prefills).
        Default: refused (:meth:`decode_refusal`); decoding mixers override it."""
        raise self.decode_refusal()

    # -- matrix view ----------------------------------------------------------------
    def mixing_terms(
        self, x: Tensor, *, input_ids: Tensor | None = None, seq_idx: Tensor | None = None
    ) -> MixTerms:
        raise self._no_matrix_view()

    def mix(self, coeffs: Any, v: Tensor) -> Tensor:
        raise self._no_matrix_view()

    @property
    def has_matrix_view(self) -> bool:
        return type(self).mixing_terms is not Mixer.mixing_terms

    def _no_matrix_view(self) -> CapabilityError:
        return CapabilityError(
            f"{self.cfg.type} layer ({type(self).__name__}, a {self.cfg.kind} layer) has no "
            "matrix view (mixing_terms / mix); compare it through forward(x) instead"
        )

    # -- decoding ---------------------------------------------------------------------
    def init_state(
        self, batch: int, max_len: int, *, device: torch.device | str | None, dtype: torch.dtype
    ) -> State:
        raise self.decode_refusal()

    def step(self, x_t: Tensor, state: State, *, token_t: Tensor | None = None) -> Tensor:
        """One token: ``x_t (B, D) -> (B, D)``, updating ``state`` in place."""
        raise self.decode_refusal()

    def no_decode_reason(self) -> str:
        """Why this configuration cannot decode, for the refusal message ("" = no detail)."""
        return ""

    @property
    def bounded_state(self) -> bool:
        """Whether the decode state has a fixed size however many tokens it consumes (a
        recurrence, a ring buffer of the last ``window`` keys), so decoding may run past
        ``max_seq_len``. Default False: a layer declares it; a layer that keeps a growing
        history (a full KV cache, a token history) is then refused past ``max_seq_len``."""
        return False

    def unbounded_reason(self) -> str:
        """Why the state grows with the tokens consumed, for refusals ("" = no detail)."""
        return ""

    def decode_refusal(self) -> CapabilityError:
        """The error for decoding (``init_state``, ``step``, ``forward(state=...)``) a layer
        without the ``decode`` capability: names the layer type and what to do instead."""
        why = self.no_decode_reason()
        return CapabilityError(
            f"{self.cfg.type} layer ({type(self).__name__}) does not support decoding "
            f"(capability `decode`){': ' + why if why else ''}; run it on whole sequences "
            "with forward(x) and no state, or use a layer type that can decode"
        )

    def require_decode(self) -> None:
        """Raise :meth:`decode_refusal` unless this configuration can decode."""
        if not self.capabilities.decode:
            raise self.decode_refusal()

    def own_state(self, state: State, state_cls: type[StateT]) -> StateT:
        """``state`` checked to be what this layer's ``init_state`` returns (and that the
        layer can decode at all)."""
        self.require_decode()
        if not isinstance(state, state_cls):
            raise CapabilityError(
                f"{self.cfg.type} layer ({type(self).__name__}) needs the state from its own "
                f"init_state(), got {type(state).__name__}; pass the matching entry of the "
                "model's state"
            )
        return state

    def check_length(self, length: int) -> None:
        """Refuse a sequence longer than the ``max_seq_len`` the layer's parameters span
        (filters and kernels of ``length_dependent`` layers)."""
        if length > self.ctx.max_seq_len:
            raise CapabilityError(
                f"{self.cfg.type} layer got a sequence of {length} tokens but its filters are "
                f"built for max_seq_len = {self.ctx.max_seq_len}; raise model.max_seq_len"
            )

    # -- bookkeeping --------------------------------------------------------------------
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """(Re)initialise every parameter; works after ``to_empty`` from the meta device."""
        for module in self.modules():
            if module is not self and isinstance(module, nn.Linear):
                init_linear(module, self.ctx.init_std, generator)

    def param_hints(self) -> dict[str, ParamHint]:
        """Per parameter name (relative to this module). Missing names get defaults;
        biases and 1-d parameters are excluded from weight decay by the trainer anyway."""
        return {}

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token (2·MACs), averaged over a sequence of ``seq_len``.

        Default: 2 × (parameters used once per token); mixers with sequence-length
        dependent work override this.
        """
        return 2.0 * sum(p.numel() for p in self.parameters())

    def state_nbytes(self, seq_len: int, dtype: torch.dtype) -> int:
        """Decode state size in bytes for one sequence of ``seq_len`` tokens."""
        if not self.capabilities.decode:
            return 0
        return self.init_state(1, seq_len, device="meta", dtype=dtype).nbytes()


def init_linear(linear: nn.Linear, std: float, generator: torch.Generator | None) -> None:
    """Normal(0, std) weights and zero bias (GPT-2 / HF convention)."""
    with torch.no_grad():
        nn.init.normal_(linear.weight, mean=0.0, std=std, generator=generator)
        if linear.bias is not None:
            linear.bias.zero_()


def continue_scan(carried: Tensor, scan: Callable[[Tensor, bool], Any]) -> Tensor:
    """Output of ``scan(initial_state, return_final_state)`` run from ``carried`` (a decode
    state tensor), whose final state is written back into ``carried`` in place.

    The scan gets a copy: autograd may save what the kernel reads, and ``carried`` is
    overwritten.
    """
    out, final = scan(carried.clone(), True)
    carried.copy_(final)
    return out


def silu_short_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    *,
    seq_idx: Tensor | None,
    conv_state: Tensor | None,
    backends: BackendPolicy,
) -> Tensor:
    """``silu(causal depthwise conv(x))`` over ``x (B, L, C)``, the short convolution in
    front of the selective SSMs (Mamba-1, Mamba-2); ``weight (C, K)``.

    With ``conv_state (B, C, K)`` (a decode state: the last K pre-conv columns) the
    convolution continues from it and writes its new value back (a prefill).
    """

    def conv(initial: Tensor | None, final: bool) -> Any:
        return causal_conv1d(
            x,
            weight,
            bias,
            activation="silu",
            seq_idx=seq_idx,
            initial_state=initial,
            return_final_state=final,
            backends=backends,
        )

    return conv(None, False) if conv_state is None else continue_scan(conv_state, conv)


@torch.no_grad()
def materialize(
    mixer: Mixer,
    x: Tensor,
    *,
    input_ids: Tensor | None = None,
    seq_idx: Tensor | None = None,
) -> tuple[list[tuple[Tensor, Tensor]], Callable[[Tensor], Tensor]]:
    """Explicit mixing matrices of one call, derived from ``mix`` alone.

    Returns ``([(M (B, H, L, L), v (B, H, L, P)), ...], finish)`` such that
    ``mixer(x) == finish(Σ (M @ v).transpose(1, 2))`` up to rounding. ``mix`` is applied
    to the identity basis ``E (B, L, H, L)`` with ``E[b, j, h, p] = δ_jp``, so its output
    at ``(b, i, h, p)`` is ``M_h[i, p]``. Run it in fp64 for exact comparisons.
    """
    terms = mixer.mixing_terms(x, input_ids=input_ids, seq_idx=seq_idx)
    out = []
    for coeffs, v in terms.terms:
        B, L, H, _ = v.shape
        basis = torch.eye(L, dtype=v.dtype, device=v.device)  # (L, L): [j, p]
        basis = basis[None, :, None, :].expand(B, L, H, L)
        matrix = mixer.mix(coeffs, basis).permute(0, 2, 1, 3)  # (B, H, L, L): [i, j]
        out.append((matrix, v.permute(0, 2, 1, 3)))
    return out, terms.finish


def apply_materialized(
    matrices: list[tuple[Tensor, Tensor]], finish: Callable[[Tensor], Tensor]
) -> Tensor:
    """``finish(Σ M @ v)`` with the (B, L, H, P) layout ``finish`` expects."""
    total = sum(m @ v for m, v in matrices)  # (B, H, L, P)
    return finish(total.permute(0, 2, 1, 3))
