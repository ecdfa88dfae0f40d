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
- 2 -> 3: SGConv long-convolution kernels follow the reference (``ctlllll/SGConv``):
  normalised by the norm of the full concatenated kernel before it is cut to its length
  (``kernel.normalize: concat``), sub-kernel size 64, and a plain output projection
  unless ``output_glu``. Every SGConv kernel of a v2 document pins what v2 computed:
  ``kernel.normalize: truncated``, ``kernel.sub_kernel_len: 32`` when it was left to
  the default, and ``output_glu: true`` on its layer.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3

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


# Defaults of an SGConv long-convolution layer before schema 3.
_V2_SGCONV_KERNEL = {"normalize": "truncated", "sub_kernel_len": 32}


def _pin_v2_sgconv(node: Any) -> int:
    """Pin v2 SGConv numerics in every layer mapping under ``node``; how many were pinned.

    A layer mapping is a binding (``type: long_conv``) or an override's ``set`` (no
    ``type``) whose ``kernel`` is ``{type: sgconv, ...}``; composites nest them in lists.
    """
    count = 0
    if isinstance(node, dict):
        kernel = node.get("kernel")
        is_layer = node.get("type", "long_conv") == "long_conv"
        if is_layer and isinstance(kernel, dict) and kernel.get("type") == "sgconv":
            for key, value in _V2_SGCONV_KERNEL.items():
                kernel.setdefault(key, value)
            node.setdefault("output_glu", True)
            count += 1
        children = node.values()
    elif isinstance(node, list):
        children = node
    else:
        return 0
    return count + sum(_pin_v2_sgconv(child) for child in children)


def _v2_to_v3(document: dict[str, Any]) -> list[str]:
    """Pin the SGConv normalisation, sub-kernel size and output GLU that v2 used."""
    model = document.get("model")
    if not isinstance(model, dict):
        return []
    count = _pin_v2_sgconv(model.get("layers"))
    if not count:
        return []
    return [
        f"{count} SGConv kernel(s) keep their schema-2 numerics (kernel.normalize: truncated, "
        "output_glu: true; sub_kernel_len 32 unless given); schema 3 defaults to the "
        "reference's (concat, no GLU, 64)"
    ]


MIGRATIONS: dict[int, MigrationStep] = {1: _v1_to_v2, 2: _v2_to_v3}


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
