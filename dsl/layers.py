"""Per-layer configs of a realized stack: symbol bindings plus overrides."""

from __future__ import annotations

import copy
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


def layer_dicts(model: ModelSpec) -> list[dict[str, Any]]:
    """Plain-data config of every realized layer, overrides merged in order."""
    layers = model.layers
    bound = {s: cfg.model_dump(mode="json") for s, cfg in layers.symbols.items()}
    dicts = [copy.deepcopy(bound[s]) for s in layers.symbols_in_order]
    n = len(dicts)
    for override in layers.overrides:
        for selector in override.at:
            for i in select_indices(selector, n):
                if "type" in override.set and override.set["type"] != dicts[i]["type"]:
                    raise ValueError(
                        f"an override cannot change a layer's type "
                        f"({dicts[i]['type']!r} -> {override.set['type']!r}); bind another symbol"
                    )
                dicts[i] = deep_merge(dicts[i], override.set)
    return dicts


def realize_layer_configs(model: ModelSpec) -> list[LayerConfig]:
    """Validated, resolved config of every realized layer."""
    from mixstack.dsl import registry

    out = []
    for i, data in enumerate(layer_dicts(model)):
        cfg = registry.get(data["type"]).config_cls.model_validate(data)
        out.append(cfg.resolve(model.context(i)))
    return out
