"""Stage two of loading: merged plain data -> an immutable :class:`Spec`.

Every problem is collected as a :class:`SpecIssue` (origin from the provenance map,
full YAML path, the bad value, what is allowed, a "did you mean" for near misses)
and raised together as one :class:`SpecError`. Validation runs in layers:

1. the top level (``model``, ``train``, ``run``, ``schema_version``): here;
2. the model's own fields, with Pydantic, its errors translated to issues
   (:mod:`.model`, :mod:`.pydantic_errors`; the issue plumbing is :mod:`.common`);
3. how the layers are asked for (``pattern`` | ``layer_types`` | ``n_layers`` +
   ``ratios`` + ``fill``), realized to a literal pattern (:mod:`.request`);
4. symbol bindings, two-stage: read ``type``, look it up in the registry, validate
   with that config class (children of composites first, so their errors carry
   their own paths) (:mod:`.bindings`); then per-layer ``overrides`` (``at``
   selectors and ``set``) (:mod:`.overrides`);
5. per realized layer, with the model context: ``resolve`` (fills context defaults;
   the resolved config is what the spec stores), ``check`` (cross-field rules) and
   the capability check (a ``causal_lm`` refuses non-causal layers, pointing at the
   binding's line) (:mod:`.realize`). Stage 5 runs only when 2-4 found the inputs it
   needs valid, so an error is never reported as a consequence of another;
6. the ``train`` (:mod:`.train`) and ``run`` (:mod:`.run`) sections, their own fields
   first and, once the model is valid, their checks against it.

Overrides are merged on top of the *resolved* symbol configs by
:func:`mixstack.dsl.layers.merge_layer_overrides`, the one merge path that
``ModelSpec.layer_configs()`` also takes when a spec is read back.
"""

from __future__ import annotations

import re
from typing import Any

from mixstack.dsl.errors import IssueCollector, SpecError, SpecIssue
from mixstack.dsl.migrations import unsupported_version
from mixstack.dsl.provenance import Provenance
from mixstack.dsl.spec import SCHEMA_VERSION, Spec
from mixstack.dsl.validate.common import Checker
from mixstack.dsl.validate.model import model_section
from mixstack.dsl.validate.pydantic_errors import pydantic_issues
from mixstack.dsl.validate.request import LAYER_FORMS, form_conflict, layer_forms
from mixstack.dsl.validate.run import run_against, run_section
from mixstack.dsl.validate.train import train_against, train_against_run, train_section

__all__ = ["LAYER_FORMS", "form_conflict", "layer_forms", "pydantic_issues", "validate_spec"]

TOP_KEYS = ("model", "train", "run", "base", "schema_version")


def document(ck: Checker, data: dict[Any, Any]) -> Spec | None:
    """The top level: ``schema_version``, then each section; ``train`` and ``run`` are
    checked against the model only once the model is valid."""
    ck.unknown_keys(data, TOP_KEYS, ())
    version = data.get("schema_version", SCHEMA_VERSION)
    if type(version) is not int or version != SCHEMA_VERSION:  # older ones are migrated
        ck.add(
            unsupported_version(version) or f"schema_version {version} was not migrated",
            ("schema_version",),
            value=version,
            allowed=f"1..{SCHEMA_VERSION} (older versions are migrated)",
        )
    train = train_section(ck, data.get("train"))
    run = run_section(ck, data.get("run"))
    if "model" not in data:
        ck.add(
            "missing required section `model`",
            ("model",),
            allowed="a `model:` mapping with at least `layers:`",
        )
        return None
    model = model_section(ck, data["model"])
    if model is not None and train is not None:
        train = train_against(ck, train, model)
    if model is not None and run is not None:
        run_against(ck, run, model)
    if train is not None and run is not None:
        train_against_run(ck, train, run)
    if model is None or run is None or ck.issues:
        return None
    return ck.pydantic(Spec, {"model": model, "train": train, "run": run}, ())


_POSITION = re.compile(r"^(.*):(\d+):(\d+)$")


def _ordered(issues: list[SpecIssue]) -> list[SpecIssue]:
    """Duplicates dropped; issues with a file position sorted by file (in order of first
    appearance), line and column; the others (overrides, ``<dict>``) after them."""
    unique = list(dict.fromkeys(issues))
    files: dict[str, int] = {}
    keyed = []
    for n, issue in enumerate(unique):
        match = _POSITION.match(issue.origin or "")
        if match is None:
            keyed.append(((1, 0, 0, 0, n), issue))
            continue
        rank = files.setdefault(match.group(1), len(files))
        keyed.append(((0, rank, int(match.group(2)), int(match.group(3)), n), issue))
    return [issue for _, issue in sorted(keyed, key=lambda pair: pair[0])]


def validate_spec(data: dict[Any, Any], prov: Provenance, issues: IssueCollector) -> Spec:
    """Validate merged, interpolated plain data; raises one :class:`SpecError` with every
    issue (``issues`` may already hold problems found while merging)."""
    spec = document(Checker(prov, issues), data)
    if issues.issues or spec is None:
        raise SpecError(_ordered(issues.issues) or [SpecIssue("spec could not be validated")])
    return spec
