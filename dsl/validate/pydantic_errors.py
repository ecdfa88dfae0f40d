"""Pydantic errors -> :class:`SpecIssue` s: one per YAML path (union members merged),
with the value got, what the field allows and a "did you mean" for near misses."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from mixstack.dsl.errors import Path, SpecIssue, did_you_mean, keys_text


def _annotation_args(ann: Any) -> tuple[Any, ...]:
    origin = get_origin(ann)
    if origin is Annotated:
        return (get_args(ann)[0],)
    if origin is Union or type(ann).__name__ == "UnionType":
        return tuple(a for a in get_args(ann) if a is not type(None))
    return ()


def _as_model(ann: Any) -> type[BaseModel] | None:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in _annotation_args(ann):
        found = _as_model(arg)
        if found is not None:
            return found
    return None


def _step_annotation(ann: Any, part: Any) -> Any:
    """Annotation of ``part`` inside a value annotated ``ann`` (None if unknown)."""
    model = _as_model(ann)
    if model is not None and isinstance(part, str) and part in model.model_fields:
        return model.model_fields[part].annotation
    origin = get_origin(ann)
    args = get_args(ann)
    if origin in (list, tuple, set, frozenset) and args:
        return args[0]
    if origin is dict and len(args) == 2:
        return args[1]
    for arg in _annotation_args(ann):
        found = _step_annotation(arg, part)
        if found is not None:
            return found
    return None


def _field_at(cls: type[BaseModel], rel: Path) -> FieldInfo | None:
    ann: Any = cls
    for part in rel[:-1]:
        ann = _step_annotation(ann, part)
        if ann is None:
            return None
    model = _as_model(ann)
    if model is None or not rel or not isinstance(rel[-1], str):
        return None
    return model.model_fields.get(rel[-1])


def _model_at(cls: type[BaseModel], rel: Path) -> type[BaseModel] | None:
    ann: Any = cls
    for part in rel:
        ann = _step_annotation(ann, part)
        if ann is None:
            return None
    return _as_model(ann)


def _data_path(loc: tuple[Any, ...], data: Any, err_type: str) -> Path:
    """Pydantic's ``loc`` -> the path inside ``data``, dropping union member tags
    (``('dt_rank', 'int')``) and dict-key markers that are not keys of the data."""
    path: list[Any] = []
    node = data
    for i, part in enumerate(loc):
        in_dict = isinstance(node, dict) and part in node
        in_list = isinstance(node, (list, tuple)) and isinstance(part, int)
        if in_dict or (in_list and 0 <= part < len(node)):
            node = node[part]
            path.append(part)
        elif (
            i == len(loc) - 1
            and err_type in ("missing", "extra_forbidden")
            and isinstance(node, dict)
        ):
            path.append(part)
    return tuple(path)


def _bounds(field: FieldInfo | None) -> str | None:
    if field is None:
        return None
    parts = []
    for meta in field.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            bound = getattr(meta, attr, None)
            if bound is not None:
                parts.append(f"{sign} {bound}")
    return " and ".join(parts) or None


_KIND_TEXT = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "string": "a string",
    "str": "a string",
    "dict": "a mapping",
    "model": "a mapping",
    "list": "a list",
    "tuple": "a list",
    "none": "null",
}


def _allowed(err: dict[str, Any], field: FieldInfo | None) -> tuple[str | None, str | None]:
    """(allowed text, suggestion) for one Pydantic error."""
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "literal_error":
        options = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        value = err.get("input")
        hint = did_you_mean(value, options) if isinstance(value, str) else None
        return "one of " + ", ".join(repr(o) for o in options), hint
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        return _bounds(field) or err["msg"].replace("Input should be ", ""), None
    if kind in ("too_short", "too_long"):
        return err["msg"].replace("List should have ", "").replace("Input should have ", ""), None
    head = kind.split("_", 1)[0]
    if head in _KIND_TEXT:
        text = _KIND_TEXT[head]
        return (f"{text} {_bounds(field)}" if _bounds(field) else text), None
    return None, None


def _plain_message(err: dict[str, Any]) -> str:
    msg = str(err["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    return msg


def pydantic_issues(
    exc: ValidationError,
    base: Path,
    data: Any,
    cls: type[BaseModel],
    origin_of: Callable[[Path], str | None],
) -> list[SpecIssue]:
    """Translate a Pydantic error into issues: one per YAML path, union members merged."""
    grouped: dict[Path, list[dict[str, Any]]] = {}
    for err in exc.errors(include_url=False):
        grouped.setdefault(_data_path(err["loc"], data, err["type"]), []).append(err)
    issues = []
    for rel, errs in grouped.items():
        issues.append(_issue_for(rel, errs, base, cls, origin_of))
    return issues


def _issue_for(
    rel: Path,
    errs: list[dict[str, Any]],
    base: Path,
    cls: type[BaseModel],
    origin_of: Callable[[Path], str | None],
) -> SpecIssue:
    path = (*base, *rel)
    origin = origin_of(path)
    kinds = [e["type"] for e in errs]
    key = rel[-1] if rel else None
    if "extra_forbidden" in kinds:
        model = _model_at(cls, rel[:-1])
        keys = list(model.model_fields) if model is not None else []
        return SpecIssue(
            f"unknown key {key!r}",
            path=path,
            origin=origin,
            allowed=f"valid keys: {keys_text(keys)}" if keys else None,
            suggestion=did_you_mean(str(key), keys) if keys else None,
        )
    field = _field_at(cls, rel)
    if "missing" in kinds:
        desc = f" ({field.description})" if field is not None and field.description else ""
        return SpecIssue(f"missing required key {key!r}{desc}", path=path, origin=origin)
    if "invalid_key" in kinds:
        return SpecIssue(
            "mapping keys must be strings",
            path=path,
            origin=origin,
            value=errs[0].get("input"),
            has_value=True,
            allowed="string keys",
        )
    return _value_issue(path, origin, errs, field)


def _value_issue(
    path: Path, origin: str | None, errs: list[dict[str, Any]], field: FieldInfo | None
) -> SpecIssue:
    """A bad value: Pydantic's message(s), the value got, and what the field allows."""
    allowed, hints = [], []
    for err in errs:
        text, hint = _allowed(err, field)
        if text and text not in allowed:
            allowed.append(text)
        if hint:
            hints.append(hint)
    messages = list(dict.fromkeys(_plain_message(e) for e in errs))
    return SpecIssue(
        messages[0] if len(messages) == 1 else "invalid value: " + " or ".join(messages),
        path=path,
        origin=origin,
        value=errs[0].get("input"),
        has_value=True,
        allowed=" or ".join(allowed) or None,
        suggestion=hints[0] if hints else None,
    )
