"""Fake layer types for the spec-loader tests, and a helper writing YAML fixtures.

The loader machinery is tested against these fakes so it does not depend on the
real mixers' fields. They are registered for the duration of each test module in
tests/dsl and removed afterwards, so registry-wide tests elsewhere never see them
(their ``examples()`` are empty as well).
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar, Literal

import pytest
from pydantic import Field
from torch import nn

from mixstack.dsl import registry
from mixstack.dsl.base import Capabilities, LayerConfig
from mixstack.dsl.context import LayerContext
from mixstack.dsl.errors import SpecError, SpecIssue
from mixstack.dsl.spec import AnyLayer


class FakeSeqConfig(LayerConfig):
    """A sequence layer with a context default (``scale``), a cross-field check and a
    ``causal`` flag whose default follows the arch, like attention."""

    type: Literal["fake_seq"] = "fake_seq"
    width: int = Field(4, ge=1, description="must divide d_model")
    scale: float | None = Field(None, gt=0, description="None -> d_model / width")
    mode: Literal["alpha", "beta"] = "alpha"
    causal: bool | None = None

    def capabilities(self, ctx: LayerContext) -> Capabilities:
        causal = ctx.causal_arch if self.causal is None else self.causal
        return Capabilities(causal=causal, decode=causal)

    def resolve(self, ctx: LayerContext) -> FakeSeqConfig:
        return self.model_copy(
            update={
                "scale": ctx.d_model / self.width if self.scale is None else self.scale,
                "causal": ctx.causal_arch if self.causal is None else self.causal,
            }
        )

    def check(self, ctx: LayerContext) -> list[tuple[tuple[str | int, ...], str]]:
        if ctx.d_model % self.width:
            return [
                (("width",), f"d_model ({ctx.d_model}) is not divisible by width ({self.width})")
            ]
        return []


class FakeNonCausalConfig(LayerConfig):
    """A layer that is never causal and has no flag to make it so (like Hydra)."""

    type: Literal["fake_noncausal"] = "fake_noncausal"
    k: int = Field(1, ge=1)

    def capabilities(self, ctx: LayerContext) -> Capabilities:
        return Capabilities(causal=False, decode=False)


class FakeChannelConfig(LayerConfig):
    """A channel mixer with a resolved default that depends on the layer index."""

    kind: ClassVar[Literal["channel"]] = "channel"
    type: Literal["fake_channel"] = "fake_channel"
    hidden: int | None = Field(None, ge=1, description="None -> 2 * d_model + layer_idx")

    def resolve(self, ctx: LayerContext) -> FakeChannelConfig:
        if self.hidden is not None:
            return self
        return self.model_copy(update={"hidden": 2 * ctx.d_model + ctx.layer_idx})


class FakeBoomConfig(LayerConfig):
    """A buggy plugin: the hook named by ``explode`` raises."""

    type: Literal["fake_boom"] = "fake_boom"
    explode: Literal["resolve", "check", "capabilities", "spec_error", "none"] = "none"

    def capabilities(self, ctx: LayerContext) -> Capabilities:
        if self.explode == "capabilities":
            raise RuntimeError("capabilities exploded")
        return Capabilities()

    def resolve(self, ctx: LayerContext) -> FakeBoomConfig:
        if self.explode == "resolve":
            raise ZeroDivisionError("resolve exploded")
        return self

    def check(self, ctx: LayerContext) -> list[tuple[tuple[str | int, ...], str]]:
        if self.explode == "check":
            raise KeyError("check exploded")
        if self.explode == "spec_error":
            raise SpecError(SpecIssue("refused by the layer", path=("explode",), allowed="none"))
        return []


class FakeStackConfig(LayerConfig):
    """A composite whose own ``check`` does not look at its children (the loader must)."""

    kind: ClassVar[Literal["composite"]] = "composite"
    child_fields: ClassVar[tuple[str, ...]] = ("layers",)
    type: Literal["fake_stack"] = "fake_stack"
    layers: list[AnyLayer] = Field(..., min_length=1)

    def capabilities(self, ctx: LayerContext) -> Capabilities:
        return Capabilities.combine([c.capabilities(ctx) for c in self.layers])

    def resolve(self, ctx: LayerContext) -> FakeStackConfig:
        return self.model_copy(update={"layers": [c.resolve(ctx) for c in self.layers]})


class FakeWrapConfig(LayerConfig):
    """A composite with a single child field."""

    kind: ClassVar[Literal["composite"]] = "composite"
    child_fields: ClassVar[tuple[str, ...]] = ("inner",)
    type: Literal["fake_wrap"] = "fake_wrap"
    inner: AnyLayer
    gain: float = 1.0

    def capabilities(self, ctx: LayerContext) -> Capabilities:
        return self.inner.capabilities(ctx)

    def resolve(self, ctx: LayerContext) -> FakeWrapConfig:
        return self.model_copy(update={"inner": self.inner.resolve(ctx)})


class _FakeModule(nn.Module):
    """Stands in for a module class; the loader never builds modules."""


FAKE_CONFIGS: tuple[type[LayerConfig], ...] = (
    FakeSeqConfig,
    FakeNonCausalConfig,
    FakeChannelConfig,
    FakeBoomConfig,
    FakeStackConfig,
    FakeWrapConfig,
)


@pytest.fixture(autouse=True, scope="module")
def fake_layer_types() -> Iterator[None]:
    with registry.scoped():
        for cfg in FAKE_CONFIGS:
            registry.register(cfg)(
                type(f"Fake_{cfg.model_fields['type'].default}", (_FakeModule,), {})
            )
        yield


@pytest.fixture
def write(tmp_path: Path) -> Callable[[str, str], Path]:
    """``write("a.yaml", text)`` -> path of a dedented YAML file in tmp_path."""

    def _write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
        return path

    return _write
