"""Facts about how a spec was loaded, attached to the validated objects without being
part of them: not compared, not hashed, not dumped.

* ``authored``: the ``model`` section as written (bases and overrides merged,
  interpolated, migrated; defaults not resolved). A model directory keeps it as
  ``spec.yaml`` beside the resolved ``config.json`` (:mod:`mixstack.hub.modeldir`).
* ``hub_sources``: the ``hf://`` references the spec was composed from, each with the
  commit sha its revision resolved to (:mod:`mixstack.dsl.hubref`); ``run.json`` records
  them.

Pydantic compares private attributes in ``==``, so these live in a side table keyed by
object identity (entries go away with their object) instead of on the models.
"""

from __future__ import annotations

import copy
import weakref
from typing import Any

_TABLE: dict[int, tuple[weakref.ref[Any], dict[str, Any]]] = {}


def _entry(obj: Any, create: bool) -> dict[str, Any] | None:
    key = id(obj)
    found = _TABLE.get(key)
    if found is not None and found[0]() is obj:
        return found[1]
    if not create:
        return None
    facts: dict[str, Any] = {}
    _TABLE[key] = (weakref.ref(obj, lambda _ref, key=key: _TABLE.pop(key, None)), facts)
    return facts


def attach(obj: Any, **facts: Any) -> None:
    entry = _entry(obj, create=True)
    assert entry is not None
    entry.update(copy.deepcopy(facts))


def authored(obj: Any) -> dict[str, Any] | None:
    """The authored ``model`` section of a ``ModelSpec`` (a copy), if known."""
    entry = _entry(obj, create=False)
    value = entry.get("authored") if entry else None
    return copy.deepcopy(value) if value is not None else None


def hub_sources(obj: Any) -> list[dict[str, Any]]:
    """The ``hf://`` sources of a ``Spec`` / ``ModelSpec`` (copies), oldest first."""
    entry = _entry(obj, create=False)
    return copy.deepcopy(entry.get("hub_sources", [])) if entry else []
