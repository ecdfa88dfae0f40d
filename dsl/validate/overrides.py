"""Per-layer ``overrides`` (``at`` selectors and ``set``) and layer selectors."""

from __future__ import annotations

from typing import Any

from mixstack.dsl.errors import Path
from mixstack.dsl.layers import select_indices
from mixstack.dsl.spec import STAGE_MARK, OverrideSpec
from mixstack.dsl.validate.common import LAYERS_PATH, Checker
from mixstack.dsl.validate.request import Request


def layer_overrides(
    ck: Checker, layers: dict[Any, Any], request: Request | None
) -> list[tuple[OverrideSpec, list[int]]] | None:
    """Each override with the sorted layer indices it names (None if any is
    invalid); indices are checked only when the pattern is known."""
    path = (*LAYERS_PATH, "overrides")
    example = "[{at: [3], set: {window: 128}}, ...]"
    items = ck.optional(layers, "overrides", list, "overrides must be a list", example, path)
    if items is None:
        return None
    n = sum(1 for c in request.pattern if c != STAGE_MARK) if request else None
    out = [one_override(ck, item, (*path, k), n) for k, item in enumerate(items)]
    return None if any(o is None for o in out) else out  # type: ignore[return-value]


def one_override(
    ck: Checker, item: Any, path: Path, n: int | None
) -> tuple[OverrideSpec, list[int]] | None:
    """One ``{at: [...], set: {...}}`` item, or None with its issues recorded."""
    if not isinstance(item, dict):
        ck.add(
            "an override must be a mapping with `at` and `set`",
            path,
            value=item,
            allowed="{at: [3, '8:16:2'], set: {window: 128}}",
        )
        return None
    ck.unknown_keys(item, ("at", "set"), path)
    at, changes = item.get("at"), item.get("set")
    shapes = (  # (key, its value is well formed, message, allowed)
        (
            "at",
            isinstance(at, list) and bool(at),
            "`at` must be a non-empty list of layer selectors",
            "ints (negative allowed) or 'a:b:c' slices, like [3, -1]",
        ),
        (
            "set",
            isinstance(changes, dict) and all(isinstance(k, str) for k in changes),
            "`set` must be a mapping of field -> value",
            "{window: 128}",
        ),
    )
    for key, good, message, allowed in shapes:
        if not good:
            ck.add(message, (*path, key), value=item.get(key), allowed=allowed)
    ok = set(item) <= {"at", "set"} and all(good for _, good, _, _ in shapes)
    indices = layer_selectors(ck, at, (*path, "at"), n) if ok else None
    if indices is None:
        return None
    spec = ck.pydantic(OverrideSpec, {"at": at, "set": changes}, path)
    return (spec, indices) if spec is not None else None


def layer_selectors(ck: Checker, at: list[Any], path: Path, n: int | None) -> list[int] | None:
    """Sorted layer indices named by ``at`` (none checked while ``n`` is unknown)."""
    indices: set[int] = set()
    ok = True
    for j, selector in enumerate(at):
        if isinstance(selector, bool) or not isinstance(selector, (int, str)):
            ck.add(
                "invalid layer selector",
                (*path, j),
                value=selector,
                allowed="an int (negative allowed) or an 'a:b:c' slice",
            )
            ok = False
        elif n is not None:
            try:
                indices.update(select_indices(selector, n))
            except ValueError as exc:
                ck.add(
                    str(exc),
                    (*path, j),
                    value=selector,
                    allowed=f"indices {-n}..{n - 1} or 'a:b:c' slices",
                )
                ok = False
    return sorted(indices) if ok else None
