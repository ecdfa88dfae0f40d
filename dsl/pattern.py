"""The literal layer-pattern grammar (DESIGN §3).

A pattern names the residual sub-layers of a model, one character per sub-layer::

    "(M-M*)2 | N-"   ->   "M-M*M-M*|N-"

Grammar (whitespace is ignored everywhere)::

    pattern := item+
    item    := SYMBOL | "|" | "(" item+ ")" COUNT?
    COUNT   := digit+            (k >= 1; a group without a count appears once)

* ``SYMBOL`` is any printable, non-space character that is not reserved. Reserved:
  digits and ``( ) | . [ ] $ { } : /``. They are kept free so a pattern can never be
  confused with a count, an interpolation (``${...}``), a slice (``a:b``) or a path.
* ``|`` marks a pipeline-stage boundary (Megatron's ``--hybrid-layer-pattern``). It
  is kept in the realized pattern but never counted as a layer; it may not start or
  end the pattern, nor follow another ``|``.

The realized pattern is capped at :data:`MAX_LAYERS` symbols, so a typo such as
``(M-)1000000000`` fails at once instead of allocating gigabytes.

Every error is a :class:`PatternError` carrying the 1-based column inside the
pattern string, so the loader can point at the offending character.
"""

from __future__ import annotations

from dataclasses import dataclass

STAGE_MARK = "|"
RESERVED = frozenset("0123456789()|.[]${}:/")
# Far above any published model (the 8B hybrid has 56); guards against runaway counts.
MAX_LAYERS = 65_536
# Nesting deeper than this is surely a mistake and would exhaust Python's recursion.
MAX_DEPTH = 32

GRAMMAR_HELP = (
    "one symbol character per sub-layer; '(...)k' repeats a group k >= 1 times; "
    "'|' marks a pipeline-stage boundary; spaces are ignored; digits and "
    "'()|.[]${}:/' are not symbols"
)


class PatternError(ValueError):
    """A malformed pattern; ``column`` is 1-based inside the pattern string."""

    def __init__(self, message: str, column: int):
        super().__init__(message)
        self.message = message
        self.column = column

    def __str__(self) -> str:
        return f"{self.message} (column {self.column})"


def symbol_problem(char: str) -> str | None:
    """Why ``char`` cannot be a layer symbol, or None if it can."""
    if not isinstance(char, str) or len(char) != 1:
        return f"a symbol is exactly one character, got {char!r}"
    if char.isspace():
        return "whitespace is not a symbol"
    if char.isdigit():
        return f"digit {char!r} is not a symbol (digits are repeat counts)"
    if char in RESERVED:
        return f"{char!r} is reserved and cannot be a symbol"
    if not char.isprintable():
        return f"{char!r} is not a printable character"
    return None


@dataclass(frozen=True)
class _Node:
    """One parsed item: a symbol / stage mark (``char``) or a repeated group."""

    column: int
    char: str | None = None
    children: tuple[_Node, ...] = ()
    count: int = 1

    def length(self) -> int:
        """Number of characters (stage marks included) this item realizes to."""
        if self.char is not None:
            return 1
        return self.count * sum(child.length() for child in self.children)

    def expand(self, out: list[tuple[str, int]]) -> None:
        """Append ``(char, source column)`` pairs to ``out``."""
        if self.char is not None:
            out.append((self.char, self.column))
            return
        for _ in range(self.count):
            for child in self.children:
                child.expand(out)


class _Parser:
    """Recursive descent over the pattern text; positions are 0-based internally."""

    def __init__(self, text: str):
        self.text = text
        self.pos = 0
        self.depth = 0

    def _skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def _peek(self) -> str | None:
        self._skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else None

    def parse_items(self, open_column: int | None) -> list[_Node]:
        """Items up to the end of text (top level) or up to the ``)`` closing the group
        opened at ``open_column``."""
        items: list[_Node] = []
        while (char := self._peek()) is not None:
            if char == ")":
                if open_column is None:
                    raise PatternError("unbalanced ')': no group is open", self.pos + 1)
                return items
            items.append(self._parse_item(char))
        if open_column is not None:
            raise PatternError("unbalanced '(': this group is never closed", open_column)
        return items

    def _parse_item(self, char: str) -> _Node:
        column = self.pos + 1
        if char == "(":
            return self._parse_group(column)
        if char.isdigit():
            raise PatternError(
                f"digit {char!r} is not after ')': counts follow a group, like '(M-)4'", column
            )
        self.pos += 1
        if char == STAGE_MARK:
            return _Node(column, char=char)
        problem = symbol_problem(char)
        if problem is not None:
            raise PatternError(problem, column)
        return _Node(column, char=char)

    def _parse_group(self, column: int) -> _Node:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise PatternError(f"groups nested deeper than {MAX_DEPTH} levels", column)
        self.pos += 1  # past "("
        children = self.parse_items(open_column=column)
        self.depth -= 1
        if not children:
            raise PatternError("empty group '()'", column)
        self.pos += 1  # past ")"
        return _Node(column, children=tuple(children), count=self._parse_count())

    def _parse_count(self) -> int:
        if (char := self._peek()) is None or not char.isdigit():
            return 1
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos].isdigit():
            self.pos += 1
        count = int(self.text[start : self.pos])
        if count == 0:
            raise PatternError("repeat count 0: a group must repeat at least once", start + 1)
        return count


def _check_stage_marks(realized: list[tuple[str, int]]) -> None:
    for i, (char, column) in enumerate(realized):
        if char != STAGE_MARK:
            continue
        if i == 0 or i == len(realized) - 1:
            raise PatternError("'|' cannot start or end the pattern (empty stage)", column)
        if realized[i - 1][0] == STAGE_MARK:
            raise PatternError("'||' leaves an empty pipeline stage", column)


def realize_pattern(text: str) -> str:
    """Expand a pattern to its literal form: one symbol per sub-layer plus stage marks.

    Raises :class:`PatternError` (with the column) for any malformed input.
    """
    if not isinstance(text, str):
        raise PatternError(f"a pattern is a string, got {type(text).__name__}", 1)
    items = _Parser(text).parse_items(open_column=None)
    if not items:
        raise PatternError("empty pattern: it must name at least one layer", 1)
    total = sum(item.length() for item in items)
    if total > MAX_LAYERS:
        raise PatternError(
            f"pattern expands to {total} symbols; at most {MAX_LAYERS} are allowed", 1
        )
    realized: list[tuple[str, int]] = []
    for item in items:
        item.expand(realized)
    _check_stage_marks(realized)
    return "".join(char for char, _ in realized)
