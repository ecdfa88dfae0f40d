"""Config mixin of layers whose direction the architecture decides (attention, Hyena,
long conv): ``causal: null`` means causal exactly when the arch is ``causal_lm``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mixstack.dsl.context import LayerContext


class ArchCausalConfig:
    """``is_causal(ctx)`` for a config with a ``causal: bool | None`` field."""

    if TYPE_CHECKING:  # declared by the config itself, with its own description
        causal: bool | None

    def is_causal(self, ctx: LayerContext) -> bool:
        """The field when set, else whether the arch is causal (``ctx.causal_arch``)."""
        return ctx.causal_arch if self.causal is None else self.causal
