"""Composite layers: several layers under one pattern symbol (DESIGN §3, docs/math.md#composites).

``sequential``  one symbol holding several residual sub-layers, each with its own norm
                and residual: the block convention of mamba_ssm / HF models, e.g. a
                classic transformer block ``{type: sequential, layers: [attention, mlp]}``.
``parallel``    several mixers reading the same normed input, outputs summed or
                averaged, one residual (Hymba / Falcon-H1 style)::

                    x ─┬──────────────────────────────────────┐
                       └─> norm ─┬─> layer 0 ─┐               │
                                 ├─> layer 1 ─┼─> sum|mean ──(+)──> out
                                 └─> ...    ──┘

Protocol with the builder (archs/): composite module classes are constructed as
``cls(cfg, ctx, children)`` where ``children`` are already built, one per entry of
``cfg.layers``. The class variable ``child_role`` says what the builder must build
for each child: ``"block"`` (a norm + residual wrapped :class:`ResidualBlock`; the
composite is then itself the block at its position) or ``"mixer"`` (a bare layer; the
builder wraps the composite in one ResidualBlock). This module never imports mixers/,
so ``mixstack.dsl.registry`` can import it on first access. Decode states of composites
are plain lists of child states, in the order of ``cfg.layers``.

Composites do not nest (a composite inside a composite is refused at load): one level
covers the published block layouts and keeps layer indices and state-dict keys flat.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from mixstack.dsl.base import Capabilities, LayerConfig
from mixstack.dsl.context import LayerContext
from mixstack.dsl.errors import CapabilityError
from mixstack.dsl.registry import register
from mixstack.dsl.spec import AnyLayer

ChildRole = Literal["block", "mixer"]


def _refuse_nested(layers: list[LayerConfig], composite: str) -> list[LayerConfig]:
    for j, child in enumerate(layers):
        if child.kind == "composite":
            raise ValueError(
                f"layers[{j}] is a {child.type!r} composite inside a {composite!r} composite; "
                "composites do not nest: list the inner layers directly, or bind them to "
                "their own pattern symbols"
            )
    return layers


class _CompositeConfig(LayerConfig):
    """Shared behaviour: capabilities, resolution and checks come from the children."""

    kind: ClassVar[Literal["composite"]] = "composite"
    child_fields: ClassVar[tuple[str, ...]] = ("layers",)
    layers: list[AnyLayer]

    def capabilities(self, ctx: LayerContext) -> Capabilities:
        return Capabilities.combine([child.capabilities(ctx) for child in self.layers])

    def resolve(self, ctx: LayerContext) -> LayerConfig:
        return self.model_copy(update={"layers": [child.resolve(ctx) for child in self.layers]})

    def check(self, ctx: LayerContext) -> list[tuple[tuple[str | int, ...], str]]:
        return [
            (("layers", j, *path), message)
            for j, child in enumerate(self.layers)
            for path, message in child.check(ctx)
        ]


class SequentialConfig(_CompositeConfig):
    """Several residual sub-layers applied one after another under one symbol."""

    type: Literal["sequential"] = "sequential"
    layers: list[AnyLayer] = Field(
        ..., min_length=1, description="sub-layers, each with its own norm and residual"
    )

    @field_validator("layers")
    @classmethod
    def _no_nesting(cls, layers: list[LayerConfig]) -> list[LayerConfig]:
        return _refuse_nested(layers, "sequential")


class ParallelConfig(_CompositeConfig):
    """Several layers on the same normed input, outputs combined, one residual."""

    type: Literal["parallel"] = "parallel"
    layers: list[AnyLayer] = Field(
        ..., min_length=2, description="branches reading the same normed input"
    )
    combine: Literal["sum", "mean"] = Field("sum", description="how branch outputs are combined")

    @field_validator("layers")
    @classmethod
    def _no_nesting(cls, layers: list[LayerConfig]) -> list[LayerConfig]:
        return _refuse_nested(layers, "parallel")


def _child_states(state: Any, n: int) -> list[Any]:
    """Per-child states of a composite (``None`` when not decoding)."""
    if state is None:
        return [None] * n
    if not isinstance(state, list) or len(state) != n:
        raise CapabilityError(
            f"a composite's decode state is a list of {n} child states, got "
            f"{type(state).__name__}; pass the entry the model's init_state made for it"
        )
    return state


class _Composite(nn.Module, ABC):
    """Children, capabilities and bookkeeping shared by both composite modules."""

    child_role: ClassVar[ChildRole]
    parts_attr: ClassVar[str]  # name of the ModuleList holding the children (state-dict keys)

    def __init__(self, cfg: _CompositeConfig, ctx: LayerContext, children: Sequence[nn.Module]):
        super().__init__()
        if len(children) != len(cfg.layers):
            raise ValueError(
                f"{cfg.type} composite has {len(cfg.layers)} layers but got {len(children)} "
                "built children"
            )
        self.cfg = cfg
        self.ctx = ctx
        self.capabilities = cfg.capabilities(ctx)

    def _parts(self) -> nn.ModuleList:
        return getattr(self, self.parts_attr)

    def forward(
        self,
        x: Tensor,
        *,
        input_ids: Tensor | None = None,
        seq_idx: Tensor | None = None,
        state: list[Any] | None = None,
    ) -> Tensor:
        """``x (B, L, D) -> (B, L, D)`` through the children (a prefill when ``state``)."""
        states = _child_states(state, len(self._parts()))
        return self._forward(x, input_ids, seq_idx, states)

    @abstractmethod
    def _forward(
        self, x: Tensor, input_ids: Tensor | None, seq_idx: Tensor | None, states: list[Any]
    ) -> Tensor:
        """The composite's own wiring of its children, one state (or None) per child."""

    def init_state(
        self, batch: int, max_len: int, *, device: torch.device | str | None, dtype: torch.dtype
    ) -> list[Any]:
        """One decode state per child, in order."""
        if not self.capabilities.decode:
            kinds = [c.type for c in self.cfg.layers]
            raise CapabilityError(
                f"{self.cfg.type} composite of {kinds} cannot decode (capability `decode`): "
                "some child cannot; run it on whole sequences with forward(x) and no state"
            )
        return [p.init_state(batch, max_len, device=device, dtype=dtype) for p in self._parts()]

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        for part in self._parts():
            part.reset_parameters(generator)

    def state_nbytes(self, seq_len: int, dtype: torch.dtype) -> int:
        """Sum over children; 0 when the composite as a whole cannot decode."""
        if not self.capabilities.decode:
            return 0
        return sum(int(p.state_nbytes(seq_len, dtype)) for p in self._parts())

    def flops_per_token(self, seq_len: int) -> float:
        return sum(float(p.flops_per_token(seq_len)) for p in self._parts())


@register(SequentialConfig)
class SequentialLayer(_Composite):
    """Residual blocks applied in order; it is the block at its pattern position.

    Keys: ``blocks.{j}.norm.*``, ``blocks.{j}.mixer.*`` (under ``layers.{i}.`` in a model).
    """

    child_role: ClassVar[ChildRole] = "block"
    parts_attr: ClassVar[str] = "blocks"

    def __init__(self, cfg: SequentialConfig, ctx: LayerContext, children: Sequence[nn.Module]):
        super().__init__(cfg, ctx, children)
        self.blocks = nn.ModuleList(children)

    def _forward(
        self, x: Tensor, input_ids: Tensor | None, seq_idx: Tensor | None, states: list[Any]
    ) -> Tensor:
        """Through every sub-block in order."""
        for block, child_state in zip(self.blocks, states, strict=True):
            x = block(x, input_ids=input_ids, seq_idx=seq_idx, state=child_state)
        return x

    def step(self, x_t: Tensor, state: list[Any], *, token_t: Tensor | None = None) -> Tensor:
        """One token ``x_t (B, D) -> (B, D)`` through every sub-block."""
        for block, child_state in zip(
            self.blocks, _child_states(state, len(self.blocks)), strict=True
        ):
            x_t = block.step(x_t, child_state, token_t=token_t)
        return x_t


@register(ParallelConfig)
class ParallelMixer(_Composite):
    """Branches on the same input, combined by ``sum`` or ``mean``; a mixer, not a block.

    Keys: ``branches.{j}.*`` (under ``layers.{i}.mixer.`` in a model).
    """

    child_role: ClassVar[ChildRole] = "mixer"
    parts_attr: ClassVar[str] = "branches"

    def __init__(self, cfg: ParallelConfig, ctx: LayerContext, children: Sequence[nn.Module]):
        super().__init__(cfg, ctx, children)
        self.branches = nn.ModuleList(children)
        self.combine = cfg.combine

    def _combine(self, outs: list[Tensor]) -> Tensor:
        total = torch.stack(outs).sum(dim=0)
        return total / len(outs) if self.combine == "mean" else total

    def _forward(
        self, x: Tensor, input_ids: Tensor | None, seq_idx: Tensor | None, states: list[Any]
    ) -> Tensor:
        """Combined outputs of every branch on ``x``."""
        outs = [
            branch(x, input_ids=input_ids, seq_idx=seq_idx, state=s)
            for branch, s in zip(self.branches, states, strict=True)
        ]
        return self._combine(outs)

    def step(self, x_t: Tensor, state: list[Any], *, token_t: Tensor | None = None) -> Tensor:
        """One token ``x_t (B, D) -> (B, D)``."""
        states = _child_states(state, len(self.branches))
        outs = [
            branch.step(x_t, s, token_t=token_t)
            for branch, s in zip(self.branches, states, strict=True)
        ]
        return self._combine(outs)

    def param_hints(self) -> dict[str, Any]:
        """Children's hints under ``branches.{j}.``."""
        hints: dict[str, Any] = {}
        for j, branch in enumerate(self.branches):
            for name, hint in branch.param_hints().items():
                hints[f"branches.{j}.{name}"] = hint
        return hints
