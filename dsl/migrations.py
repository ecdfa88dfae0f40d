"""Schema versions of the spec and the steps that bring an older document up to date.

Any change to the canonical ``model`` section, or to the numerics of an existing
option, bumps :data:`SCHEMA_VERSION` and adds one step to :data:`MIGRATIONS`. A step
``MIGRATIONS[n]`` turns a plain document of version ``n`` (``{"model": ..., "run":
...}``, ``run`` optional) into version ``n + 1`` in place and returns notes for the
user (logged at INFO by :func:`migrate`). Steps work on raw data, before validation,
so an old file never has to validate under the current models.

:func:`spec_hash_of` is the hash rule of every version: sha256 of the canonical JSON
of ``{"schema_version": version, "model": model}`` with ``layers.requested`` left out.
A saved file's hash is checked with the rule of the version it was written by,
before its content is migrated.

History:

- 1 -> 2: ``model.activation_checkpointing`` removed (it never changed the model; it is
  ``run.activation_checkpointing``, where a v1 ``true`` moves); ``model.init.scheme``
  added, a v1 model reads ``mixstack`` (the only init v1 had).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2

# Version n document (mutated in place) -> notes for the user.
MigrationStep = Callable[[dict[str, Any]], list[str]]


def _v1_to_v2(document: dict[str, Any]) -> list[str]:
    """Drop ``model.activation_checkpointing`` (a ``true`` moves to ``run``); pin the init
    scheme v1 used (``mixstack``), whatever the current default."""
    model = document.get("model")
    if not isinstance(model, dict):
        return []
    notes: list[str] = []
    if "activation_checkpointing" in model:
        value = model.pop("activation_checkpointing")
        run = document.get("run")
        # v1 checkpointed every block when this was true, whatever `run` selected.
        if value is True and (run is None or isinstance(run, dict)):
            document["run"] = {**(run or {}), "activation_checkpointing": True}
            notes.append(
                "model.activation_checkpointing: true moved to run.activation_checkpointing "
                "(a run setting since schema 2; it never changed the model)"
            )
    init = model.setdefault("init", {})
    if isinstance(init, dict):
        init.setdefault("scheme", "mixstack")  # the only init v1 had
    return notes


MIGRATIONS: dict[int, MigrationStep] = {1: _v1_to_v2}


def unsupported_version(version: Any) -> str | None:
    """Why ``version`` cannot be read (naming it and the versions read), or None."""
    if type(version) is not int or version < 1:
        return f"schema_version {version!r} is not a version (an integer 1..{SCHEMA_VERSION})"
    if version > SCHEMA_VERSION:
        return (
            f"schema_version {version} is newer than this mixstack reads (1..{SCHEMA_VERSION}); "
            "upgrade mixstack to load it"
        )
    return None


def migrate(document: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A copy of ``document`` brought to :data:`SCHEMA_VERSION`, and what changed.

    ``document``: plain data with ``model`` (and optionally ``run``); a missing
    ``schema_version`` means the current one. An unsupported version is left as it is
    for the caller to report (:func:`unsupported_version`).
    """
    out = dict(document)
    version = out.get("schema_version", SCHEMA_VERSION)
    if unsupported_version(version) is not None or version == SCHEMA_VERSION:
        return out, []
    out = copy.deepcopy(out)
    notes: list[str] = []
    for step_from in range(version, SCHEMA_VERSION):
        notes += MIGRATIONS[step_from](out)
    out["schema_version"] = SCHEMA_VERSION
    for note in notes:
        log.info("schema_version %d -> %d: %s", version, SCHEMA_VERSION, note)
    return out, notes


def spec_hash_of(model: Mapping[str, Any], version: int = SCHEMA_VERSION) -> str:
    """The spec hash of a canonical ``model`` section under schema ``version``'s rule.

    ``layers.requested`` (provenance) is left out: the same realized architecture
    reached by a pattern or by ratios has one hash.
    """
    data = copy.deepcopy(dict(model))
    layers = data.get("layers")
    if isinstance(layers, dict):
        layers.pop("requested", None)
    payload = json.dumps(
        {"schema_version": version, "model": data}, sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(payload.encode()).hexdigest()
