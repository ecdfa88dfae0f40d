"""Per-layer configs of a realized stack: symbol bindings plus overrides."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mixstack.dsl.base import LayerConfig

if TYPE_CHECKING:
    from mixstack.dsl.spec import ModelSpec


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; lists and scalars in ``update`` replace what ``base`` had."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def select_indices(selector: int | str, n: int) -> list[int]:
    """Layer indices named by an override selector.

    ``3`` or ``-1`` (Python indexing, must be in range) or ``"a:b:c"`` (a Python slice,
    any part may be empty). Raises ValueError with what is allowed.
    """
    if isinstance(selector, bool):
        raise ValueError(f"layer index must be an int or an 'a:b:c' slice, got {selector!r}")
    if isinstance(selector, int):
        if not -n <= selector < n:
            raise ValueError(
                f"layer index {selector} is out of range for {n} layers (allowed: {-n}..{n - 1})"
            )
        return [selector % n]
    if isinstance(selector, str) and ":" in selector:
        parts = selector.split(":")
        if len(parts) > 3:
            raise ValueError(f"slice {selector!r} has more than three parts; use 'start:stop:step'")
        try:
            nums = [int(p) if p.strip() else None for p in parts]
        except ValueError:
            raise ValueError(f"slice {selector!r} must hold integers, like '0:8:2'") from None
        if len(nums) == 3 and nums[2] == 0:
            raise ValueError(f"slice {selector!r} has step 0")
        indices = list(range(n))[slice(*nums)]
        if not indices:
            raise ValueError(f"slice {selector!r} selects no layer of {n}")
        return indices
    if isinstance(selector, str):
        try:
            return select_indices(int(selector), n)
        except ValueError as exc:
            if "out of range" in str(exc):
                raise
    raise ValueError(
        f"layer selector must be an int (negative allowed) or an 'a:b:c' slice, got {selector!r}"
    )


@dataclass(frozen=True)
class TypeClash:
    """Override ``override`` tried to change the type of layer ``layer``."""

    override: int
    layer: int
    old: str
    new: str

    def message(self) -> str:
        return (
            f"an override cannot change a layer's type ({self.old!r} -> {self.new!r}); "
            "bind another symbol"
        )


@dataclass
class MergedLayers:
    """Per-layer plain configs of a realized stack, overrides merged in order.

    ``dicts[i]`` is None for a layer no override touched (its config is its symbol's,
    unchanged, so it needs no validation of its own); ``last[i]`` is the index of the
    last override that changed layer ``i`` (where its errors point).
    """

    dicts: list[dict[str, Any] | None]
    last: list[int | None]
    clashes: list[TypeClash]


def merge_layer_overrides(
    bound: Mapping[str, LayerConfig],
    order: Sequence[str],
    overrides: Sequence[tuple[Mapping[str, Any], Sequence[int]]],
) -> MergedLayers:
    """The one override-merge path: ``bound`` symbol configs laid out in ``order``, each
    ``(set, indices)`` override deep-merged into the layers it names. An override that
    would change a layer's type is recorded as a clash and not applied further."""
    merged = MergedLayers([None] * len(order), [None] * len(order), [])
    for k, (changes, indices) in enumerate(overrides):
        for i in indices:
            current = merged.dicts[i] or bound[order[i]].model_dump(mode="json")
            new_type = changes.get("type", current["type"])
            if new_type != current["type"]:
                merged.clashes.append(TypeClash(k, i, current["type"], new_type))
                break  # one report per override; the layers keep their own config
            merged.dicts[i] = deep_merge(current, dict(changes))
            merged.last[i] = k
    return merged


def override_indices(at: Sequence[int | str], n: int) -> list[int]:
    """Sorted layer indices named by the selectors ``at`` of one override."""
    return sorted({i for selector in at for i in select_indices(selector, n)})


def realize_layer_configs(model: ModelSpec) -> list[LayerConfig]:
    """Resolved config of every realized layer of a validated model (a spec read back):
    the symbol's config, or the override-merged plain data validated by its class."""
    from mixstack.dsl import registry

    layers = model.layers
    order = layers.symbols_in_order
    overrides = [(o.set, override_indices(o.at, len(order))) for o in layers.overrides]
    merged = merge_layer_overrides(layers.symbols, order, overrides)
    if merged.clashes:
        raise ValueError(merged.clashes[0].message())
    out = []
    for i, (symbol, data) in enumerate(zip(order, merged.dicts, strict=True)):
        cfg = layers.symbols[symbol]
        if data is not None:
            cfg = registry.get(data["type"]).config_cls.model_validate(data)
        out.append(cfg.resolve(model.context(i)))
    return out
