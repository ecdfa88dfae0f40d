"""The issue plumbing of validation, shared by every section."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

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
        """``cls.model_validate(data)``, or None with its errors recorded."""
        try:
            return cls.model_validate(data)
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
