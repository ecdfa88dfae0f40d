"""Errors a person can act on.

Every problem found in a spec becomes one :class:`SpecIssue`: where it came from
(``file:line:col``, ``<override key=value>`` or ``<dict>``), the YAML path, the bad
value, what is allowed and, for near misses, a suggestion. :class:`SpecError`
carries all issues of one load, so a file with five mistakes reports five.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

Path = tuple[str | int, ...]


def format_path(path: Path) -> str:
    """``("model", "layers", "symbols", "M", "headdim")`` -> ``model.layers.symbols.M.headdim``;
    list indices print as ``[3]``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "<root>"


def did_you_mean(word: str, options: Iterable[str], *, cutoff: float = 0.6) -> str | None:
    """The closest option to ``word`` if it is a near miss, else None."""
    matches = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=cutoff)
    return matches[0] if matches else None


def keys_text(keys: Iterable[Any]) -> str:
    """Keys as a comma-separated list, for "allowed:" lines."""
    return ", ".join(str(k) for k in keys)


DIVISOR_SEARCH = 10**6  # trial divisions at most: complete for n up to 10**12


def divisors(n: int) -> list[int]:
    """The divisors of ``n`` in increasing order, for "allowed:" lines (heads, groups,
    widths). Pairs ``d, n // d`` by trial division up to √n, so an absurd width from a
    spec (a property test drew 2**70) answers at once instead of counting to n; past
    10**12 only the divisors up to 10**6 and their partners are listed."""
    small = [d for d in range(1, min(math.isqrt(n), DIVISOR_SEARCH) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


def short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class SpecIssue:
    """One problem in a spec."""

    message: str
    path: Path = ()
    origin: str | None = None
    value: Any = field(default=None, compare=False)
    has_value: bool = False
    allowed: str | None = None
    suggestion: str | None = None

    def render(self) -> str:
        where = self.origin or "<unknown origin>"
        head = f"{where}: {format_path(self.path)}: {self.message}"
        lines = [head]
        if self.has_value:
            lines.append(f"    got: {short_repr(self.value)}")
        if self.allowed:
            lines.append(f"    allowed: {self.allowed}")
        if self.suggestion:
            lines.append(f"    did you mean {self.suggestion!r}?")
        return "\n".join(lines)


class MixstackError(Exception):
    """Base class of every error mixstack raises on purpose."""


class SpecError(MixstackError, ValueError):
    """A spec could not be loaded; lists every issue found."""

    def __init__(self, issues: SpecIssue | Sequence[SpecIssue]):
        if isinstance(issues, SpecIssue):
            issues = [issues]
        self.issues: list[SpecIssue] = list(issues)
        super().__init__(self._render())

    def _render(self) -> str:
        n = len(self.issues)
        head = "invalid spec: 1 problem" if n == 1 else f"invalid spec: {n} problems"
        return head + "\n" + "\n".join(issue.render() for issue in self.issues)


class BackendError(MixstackError, RuntimeError):
    """A requested kernel backend is unknown, unavailable or does not apply."""


class CheckpointError(MixstackError, RuntimeError):
    """Weights or a model directory could not be loaded."""


class CapabilityError(MixstackError, TypeError):
    """A layer was asked for something it does not support (decoding a layer without
    the ``decode`` capability, a matrix view it does not have, ...).

    A ``TypeError`` too, so code that already guards a wrong call that way keeps working.
    """


class IssueCollector:
    """Accumulates issues during a load, so all of them are reported at once."""

    def __init__(self) -> None:
        self.issues: list[SpecIssue] = []

    def add(self, message: str, path: Path = (), origin: str | None = None, **kw: Any) -> None:
        if "value" in kw:
            kw["has_value"] = True
        self.issues.append(SpecIssue(message=message, path=tuple(path), origin=origin, **kw))

    def extend(self, issues: Iterable[SpecIssue]) -> None:
        self.issues.extend(issues)

    def __bool__(self) -> bool:
        return bool(self.issues)
