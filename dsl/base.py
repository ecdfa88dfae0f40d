"""Base class of every layer config (mixers, channel mixers and composites).

A config class owns: its ``type`` literal (the registry key), its fields (typed,
described, ``extra="forbid"``), its capabilities, the cross-field ``check(ctx)`` hook
run at load, the ``resolve(ctx)`` hook that fills context-dependent defaults (so the
dumped spec is fully resolved) and ``examples()`` used by the contract tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from mixstack.dsl.context import LayerContext

Kind = Literal["sequence", "channel", "composite"]

# Documented upper bounds of size fields (docs/architecture.md#limits). They are far above
# any published model and exist so that a typo (an extra digit, 10**400) gives a located
# error at load instead of an overflow or an allocation failure deep inside torch.
MAX_D_MODEL = 65_536
MAX_VOCAB = 16_777_216  # 2**24 ordinary token ids
MAX_SEQ_LEN = 16_777_216  # 2**24 positions
MAX_LAYER_SIZE = 1_048_576  # every integer field of a layer config (widths, heads, states)


@dataclass(frozen=True)
class Capabilities:
    """What a configured layer can do (DESIGN §4).

    causal: output at i depends only on inputs <= i.
    decode: supports ``init_state`` + ``step``.
    needs_input_ids: consumes token ids.
    length_dependent: parameter shapes depend on ``max_seq_len``.
    """

    causal: bool = True
    decode: bool = True
    needs_input_ids: bool = False
    length_dependent: bool = False

    @staticmethod
    def combine(parts: list[Capabilities]) -> Capabilities:
        """Capabilities of layers applied one after another or side by side."""
        return Capabilities(
            causal=all(p.causal for p in parts),
            decode=all(p.decode for p in parts),
            needs_input_ids=any(p.needs_input_ids for p in parts),
            length_dependent=any(p.length_dependent for p in parts),
        )


class LayerConfig(BaseModel):
    """Base of every registered layer config.

    Subclasses declare ``type: Literal["name"] = "name"`` and set the class variable
    ``kind``. They are frozen (hashable, safe to share) and refuse unknown keys.
    """

    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False
    )

    kind: ClassVar[Kind] = "sequence"
    # Names of fields holding nested layer configs (composites); the loader validates
    # those children first so their errors carry their own paths and lines.
    child_fields: ClassVar[tuple[str, ...]] = ()
    type: str

    def capabilities(self, ctx: LayerContext) -> Capabilities:
        """Capabilities of this configuration; override where they depend on fields."""
        return Capabilities()

    def resolve(self, ctx: LayerContext) -> LayerConfig:
        """Return a copy with context-dependent defaults filled in (``None`` -> value).

        Called once per realized layer at load, before ``check``; the result is what
        the canonical dump stores.
        """
        return self

    def check(self, ctx: LayerContext) -> list[tuple[tuple[str | int, ...], str]]:
        """Cross-field checks that need model-level values.

        Returns ``[(relative_path, message), ...]``; empty when fine. Called at load so
        the error still points at a line.
        """
        return []

    @classmethod
    def examples(cls) -> list[LayerExample]:
        """Small configurations covering every mode, used by the contract tests."""
        return []

    def children(self) -> list[LayerConfig]:
        """Nested layer configs (composites); empty for plain layers."""
        out: list[LayerConfig] = []
        for name in self.child_fields:
            value = getattr(self, name)
            out.extend(value if isinstance(value, (list, tuple)) else [value])
        return out


@dataclass(frozen=True)
class LayerExample:
    """One configuration for the contract tests, with the model context to build it in."""

    config: LayerConfig
    d_model: int = 32
    arch: Literal["causal_lm", "encoder", "classifier"] = "causal_lm"
    max_seq_len: int = 64
    name: str = ""

    def context(self, layer_idx: int = 0, n_layers: int = 2) -> LayerContext:
        return LayerContext(
            d_model=self.d_model,
            layer_idx=layer_idx,
            n_layers=n_layers,
            max_seq_len=self.max_seq_len,
            arch=self.arch,
        )
