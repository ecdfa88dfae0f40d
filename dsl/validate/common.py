"""The issue plumbing of validation, shared by every section."""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import UnionType
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from mixstack.dsl.context import LayerContext
from mixstack.dsl.errors import (
    IssueCollector,
    Path,
    SpecError,
    did_you_mean,
    format_path,
    keys_text,
)
from mixstack.dsl.provenance import Provenance
from mixstack.dsl.validate.pydantic_errors import pydantic_issues

log = logging.getLogger(__name__)

LAYERS_PATH: Path = ("model", "layers")


def _int_only(annotation: Any) -> bool:
    """Whether a field's type takes integers but not booleans (``int``, ``int | None``)."""
    if annotation is int:
        return True
    if get_origin(annotation) in (Union, UnionType):
        args = get_args(annotation)
        return int in args and bool not in args
    return False


def booleans_for_ints(model: Any, data: Any, rel: Path = ()) -> list[tuple[Path, bool]]:
    """``(path, value)`` of every boolean in ``data`` that validated into an ``int``
    field of ``model`` (nested models and lists of models included)."""
    if isinstance(model, (list, tuple)) and isinstance(data, (list, tuple)):
        pairs = zip(model, data, strict=False)
        return [hit for i, (m, d) in enumerate(pairs) for hit in booleans_for_ints(m, d, (*rel, i))]
    if not (isinstance(model, BaseModel) and isinstance(data, dict)):
        return []
    found: list[tuple[Path, bool]] = []
    for name, field in type(model).model_fields.items():
        if name not in data:
            continue
        value = data[name]
        if isinstance(value, bool) and _int_only(field.annotation):
            found.append(((*rel, name), value))
        else:
            found.extend(booleans_for_ints(getattr(model, name), value, (*rel, name)))
    return found


NOT_GIVEN = object()


class Checker:
    """The issue plumbing every section uses: where a path comes from, recording an
    issue there, and validation that turns failures into issues."""

    def __init__(self, prov: Provenance, issues: IssueCollector):
        self.prov = prov
        self.issues = issues

    def origin(self, path: Path) -> str | None:
        return self.prov.origin(path)

    def add(
        self,
        message: str,
        path: Path,
        value: Any = NOT_GIVEN,
        allowed: str | None = None,
        suggestion: str | None = None,
        at: Path | None = None,
    ) -> None:
        """Record an issue at ``path``; its origin is that of ``at`` when given (a missing
        key is best reported on the line of the value that requires it)."""
        got = {} if value is NOT_GIVEN else {"value": value}
        origin = self.origin(path if at is None else at)
        self.issues.add(message, path, origin, allowed=allowed, suggestion=suggestion, **got)

    def unknown_keys(self, data: dict[Any, Any], valid: tuple[str, ...], path: Path) -> None:
        """One issue per key of ``data`` not in ``valid``, with a near-miss suggestion."""
        for key in data:
            if key not in valid:
                self.add(
                    f"unknown key {key!r}",
                    (*path, key),
                    allowed=f"valid keys: {keys_text(valid)}",
                    suggestion=did_you_mean(str(key), valid),
                )

    def optional(
        self, data: dict[Any, Any], key: str, kind: type, message: str, example: str, path: Path
    ) -> Any:
        """``data[key]`` if it is a ``kind`` (an empty one when absent or null), else None
        with ``message`` recorded at ``path``."""
        value = data.get(key)
        if value is None:
            return kind()
        if not isinstance(value, kind):
            self.add(message, path, value=value, allowed=example)
            return None
        return value

    def pydantic(self, cls: type[BaseModel], data: Any, path: Path) -> Any:
        """``cls.model_validate(data)``, or None with its errors recorded. A YAML boolean
        given where an integer is expected is refused (Pydantic reads ``true`` as 1)."""
        try:
            result = cls.model_validate(data)
            booleans = booleans_for_ints(result, data)
            for rel, value in booleans:
                self.add(
                    f"expected an integer, got {str(value).lower()}",
                    (*path, *rel),
                    value=value,
                    allowed="an integer",
                )
            return None if booleans else result
        except ValidationError as exc:
            self.issues.extend(pydantic_issues(exc, path, data, cls, self.origin))
        except (TypeError, ValueError, KeyError, ArithmeticError) as exc:
            self.add(f"{cls.__name__} rejected the value: {type(exc).__name__}: {exc}", path)
        return None

    def hook(
        self, fn: Callable[[LayerContext], Any], ctx: LayerContext, path: Path, what: str
    ) -> Any:
        """Call a config hook; a crash on user values becomes an issue, not a traceback."""
        try:
            return fn(ctx)
        except SpecError as exc:  # issues relative to the layer: anchor them here
            for issue in exc.issues:
                self.add(
                    issue.message,
                    (*path, *issue.path),
                    allowed=issue.allowed,
                    suggestion=issue.suggestion,
                    **({"value": issue.value} if issue.has_value else {}),
                )
            return None
        except Exception as exc:  # a hook failing on user input must still name the line
            log.debug("%s failed at %s", what, format_path(path), exc_info=True)
            self.add(f"{what} failed: {type(exc).__name__}: {exc}", path)
            return None

    def tagged(
        self, data: Any, path: Path, classes: dict[str, type[BaseModel]], default: str | None
    ) -> Any:
        """Two-stage validation of a ``type``-tagged config: the tag first (unknown ones
        listed, with a near-miss suggestion), then that class's fields."""
        kinds = keys_text(classes)
        if data is None and default is not None:
            return classes[default]()
        if not isinstance(data, dict):
            self.add(
                f"{format_path(path)} must be a mapping with a `type`",
                path,
                value=data,
                allowed=f"{{type: NAME, ...}} with NAME one of {kinds}",
            )
            return None
        kind = data.get("type", default)
        if kind is None:
            self.add("missing `type`", path, allowed=f"one of {kinds}")
            return None
        if not isinstance(kind, str) or kind not in classes:
            self.add(
                f"unknown {path[-1]} type {kind!r}",
                (*path, "type"),
                value=kind,
                allowed=f"one of {kinds}",
                suggestion=did_you_mean(kind, classes) if isinstance(kind, str) else None,
            )
            return None
        return self.pydantic(classes[kind], data, path)
