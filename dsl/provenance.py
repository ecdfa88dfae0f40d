"""Where every value of a spec came from.

Plain dicts keep no positions, so the loader carries a side map from
YAML path (a tuple of keys and list indices) to an origin string:
``file:line:col`` (1-based, from PyYAML node marks), ``<override key=value>`` for
command-line overrides, ``<dict>`` for Python input. The map follows the value that
wins through every merge, so an error in a value inherited through ``base:`` points
at the base file's line. Lookups fall back to the nearest ancestor with an origin
(a missing key is reported where its parent mapping is written).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path as FilePath
from typing import Any

import yaml

from mixstack.dsl.errors import Path, SpecError, SpecIssue

# A legitimate spec has a few hundred values; this bounds alias ("billion laughs") blow-up.
MAX_NODES = 100_000
# Nesting deeper than this is a mistake and would exhaust recursion further down.
MAX_DEPTH = 64


class Provenance:
    """Map from YAML path to origin, with nearest-ancestor lookup."""

    def __init__(self, entries: dict[Path, str] | None = None):
        self.entries: dict[Path, str] = dict(entries or {})

    @classmethod
    def uniform(cls, origin: str) -> Provenance:
        """Every path has the same origin (Python dicts, ``Spec`` objects)."""
        return cls({(): origin})

    def copy(self) -> Provenance:
        return Provenance(self.entries)

    def origin(self, path: Path) -> str | None:
        """Origin of ``path`` or of its nearest ancestor that has one."""
        path = tuple(path)
        for end in range(len(path), -1, -1):
            found = self.entries.get(path[:end])
            if found is not None:
                return found
        return None

    def subtree(self, path: Path) -> dict[Path, str]:
        """Entries at or below ``path``."""
        n = len(path)
        return {p: o for p, o in self.entries.items() if p[:n] == path}

    def drop(self, path: Path) -> None:
        """Forget ``path`` and everything below it."""
        n = len(path)
        for p in [p for p in self.entries if p[:n] == path]:
            del self.entries[p]

    def replace(self, path: Path, entries: dict[Path, str]) -> None:
        """The value at ``path`` was replaced: its old entries give way to ``entries``."""
        self.drop(path)
        self.entries.update(entries)

    def mark_value(self, path: Path, value: Any, origin: str) -> None:
        """``value`` was written at ``path`` by one source: all of it gets ``origin``."""
        self.replace(path, {p: origin for p in iter_paths(value, path)})


def iter_paths(value: Any, prefix: Path = ()) -> Iterator[Path]:
    """``prefix`` and the path of every key / item below it."""
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from iter_paths(child, (*prefix, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            yield from iter_paths(child, (*prefix, i))


def merge(
    lower: dict[str, Any], lower_prov: Provenance, upper: dict[str, Any], upper_prov: Provenance
) -> tuple[dict[str, Any], Provenance]:
    """Deep-merge ``upper`` over ``lower`` (dicts merge, everything else is replaced),
    carrying provenance of whichever value wins. Inputs are not modified."""
    data = copy.deepcopy(lower)
    prov = lower_prov.copy()
    _merge_into(data, prov, upper, upper_prov, ())
    root = upper_prov.entries.get(())
    if root is not None:
        prov.entries[()] = root
    return data, prov


def _merge_into(
    target: dict[Any, Any],
    prov: Provenance,
    upper: dict[Any, Any],
    upper_prov: Provenance,
    path: Path,
) -> None:
    for key, value in upper.items():
        sub = (*path, key)
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            origin = upper_prov.entries.get(sub)
            if origin is not None:
                prov.entries[sub] = origin
            _merge_into(target[key], prov, value, upper_prov, sub)
        else:
            target[key] = copy.deepcopy(value)
            prov.replace(sub, upper_prov.subtree(sub))


# -- YAML with positions ----------------------------------------------------------------


def _mark(filename: str, mark: yaml.Mark | None) -> str:
    if mark is None:
        return filename
    return f"{filename}:{mark.line + 1}:{mark.column + 1}"


class _Builder:
    """Turns a composed PyYAML node tree into plain data plus provenance.

    Scalars are constructed by the SafeLoader itself (so ``1e-5``, ``true``, ``null``
    mean what YAML says). A scalar's origin is the position of its value; a mapping's
    or list's origin is the position of the key (or ``-`` item) that holds it, which is
    the line a person looks for.
    """

    def __init__(self, loader: yaml.SafeLoader, filename: str):
        self.loader = loader
        self.filename = filename
        self.prov = Provenance()
        self.issues: list[SpecIssue] = []
        self.count = 0

    def build(self, node: yaml.Node, path: Path, origin: str) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise self._fail(node, f"document has more than {MAX_NODES} values (alias bomb?)")
        if len(path) > MAX_DEPTH:
            raise self._fail(node, f"nesting deeper than {MAX_DEPTH} levels")
        if isinstance(node, yaml.ScalarNode):
            self.prov.entries[path] = _mark(self.filename, node.start_mark)
            return self.loader.construct_object(node, deep=True)
        self.prov.entries[path] = origin
        if isinstance(node, yaml.SequenceNode):
            return [
                self.build(item, (*path, i), _mark(self.filename, item.start_mark))
                for i, item in enumerate(node.value)
            ]
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path)
        raise self._fail(node, f"unsupported YAML node {type(node).__name__}")

    def _fail(self, node: yaml.Node, message: str) -> SpecError:
        return SpecError(SpecIssue(message, origin=_mark(self.filename, node.start_mark)))

    def _key(self, key_node: yaml.Node, path: Path) -> Any:
        if not isinstance(key_node, yaml.ScalarNode):
            raise SpecError(
                SpecIssue(
                    "a mapping key must be a plain scalar, not a list or mapping",
                    path=path,
                    origin=_mark(self.filename, key_node.start_mark),
                )
            )
        return self.loader.construct_object(key_node, deep=True)

    def _mapping(self, node: yaml.MappingNode, path: Path) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self._key(key_node, path)
            if key in seen:
                self.issues.append(
                    SpecIssue(
                        f"duplicate key {key!r} (first set at line {seen[key].line + 1})",
                        path=(*path, key),
                        origin=_mark(self.filename, key_node.start_mark),
                        allowed="each key once per mapping",
                    )
                )
            seen[key] = key_node.start_mark
        self.loader.flatten_mapping(node)  # resolves `<<:` merge keys in place
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = self._key(key_node, path)
            out[key] = self.build(
                value_node, (*path, key), _mark(self.filename, key_node.start_mark)
            )
        return out


def parse_yaml(text: str, filename: str) -> tuple[Any, Provenance]:
    """Parse one YAML document into plain data and its provenance map.

    Raises :class:`SpecError` for invalid YAML (with line and column), duplicate keys,
    unsupported tags and unhashable keys.
    """
    try:
        loader = yaml.SafeLoader(text)
    except yaml.YAMLError as exc:  # the reader refuses control characters up front
        raise _reader_error(exc, text, filename) from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None, Provenance({(): f"{filename}:1:1"})
        builder = _Builder(loader, filename)
        data = builder.build(node, (), _mark(filename, node.start_mark))
    except yaml.MarkedYAMLError as exc:
        raise _yaml_error(exc, filename) from None
    except yaml.YAMLError as exc:
        raise _reader_error(exc, text, filename) from None
    except TypeError as exc:  # e.g. a key the constructor makes unhashable
        raise SpecError(SpecIssue(f"invalid YAML: {exc}", origin=filename)) from None
    except RecursionError:
        raise SpecError(SpecIssue("invalid YAML: nested too deeply", origin=filename)) from None
    finally:
        loader.dispose()
    if builder.issues:
        raise SpecError(builder.issues)
    return data, builder.prov


def _reader_error(exc: yaml.YAMLError, text: str, filename: str) -> SpecError:
    """Errors without a mark (the reader's) carry a character offset instead."""
    position = getattr(exc, "position", None)
    origin = filename
    if isinstance(position, int):
        line = text.count("\n", 0, position) + 1
        column = position - (text.rfind("\n", 0, position) + 1) + 1
        origin = f"{filename}:{line}:{column}"
    reason = getattr(exc, "reason", None) or str(exc).split("\n", 1)[0]
    return SpecError(SpecIssue(f"invalid YAML: {reason}", origin=origin))


def _yaml_error(exc: yaml.MarkedYAMLError, filename: str) -> SpecError:
    mark = exc.problem_mark or exc.context_mark
    problem = exc.problem or "could not parse"
    if exc.context and exc.context_mark is not None and exc.context_mark is not mark:
        problem += f" ({exc.context} at line {exc.context_mark.line + 1})"
    elif exc.context:
        problem += f" ({exc.context})"
    return SpecError(SpecIssue(f"invalid YAML: {problem}", origin=_mark(filename, mark)))


def read_yaml_file(path: FilePath, display: str, via: str | None = None) -> tuple[Any, Provenance]:
    """Read and parse ``path``; ``display`` is how origins name the file, ``via`` the
    origin of whatever asked for it (a ``base:`` entry)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(
            SpecIssue(
                f"spec file {display!r} does not exist",
                origin=via or display,
                allowed="a path to an existing YAML file (relative to the including file), "
                "or zoo:NAME",
            )
        ) from None
    except IsADirectoryError:
        raise SpecError(
            SpecIssue(f"{display!r} is a directory, not a YAML file", origin=via or display)
        ) from None
    except UnicodeDecodeError as exc:
        raw = exc.object[: exc.start]
        line = raw.count(b"\n") + 1
        column = exc.start - (raw.rfind(b"\n") + 1) + 1
        bad = bytes(exc.object[exc.start : exc.end]).hex(" ")
        raise SpecError(
            SpecIssue(
                f"{display!r} is not UTF-8 text: byte 0x{bad} at line {line}, column "
                f"{column} (offset {exc.start}): {exc.reason}",
                origin=f"{display}:{line}:{column}",
                allowed="a file saved as UTF-8",
            )
        ) from None
    except OSError as exc:
        raise SpecError(
            SpecIssue(f"cannot read {display!r}: {exc.strerror or exc}", origin=via or display)
        ) from None
    return parse_yaml(text, display)
