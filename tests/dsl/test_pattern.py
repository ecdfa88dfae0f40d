"""Pattern grammar: expansion against a naive reference, and every error with its column."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mixstack.dsl.pattern import MAX_LAYERS, PatternError, realize_pattern, symbol_problem


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("M", "M"),
        ("M-M*", "M-M*"),
        ("(M-M*)2 | N-", "M-M*M-M*|N-"),
        ("(M-)3", "M-M-M-"),
        ("((M)2-)3", "MM-MM-MM-"),
        ("(M)", "M"),  # a group without a count appears once
        ("(M-)1", "M-"),
        ("(M-)02", "M-M-"),
        ("  M - ( * ) 2  ", "M-**"),  # whitespace anywhere is ignored, also before a count
        ("M\n-\t*", "M-*"),
        ("(M|N)2", "M|NM|N"),
        ("(A(BC)2)2|D", "ABCBCABCBC|D"),
        ("ä*", "ä*"),  # any printable non-reserved character is a symbol
        ("(M)10", "M" * 10),
    ],
)
def test_realizes(text: str, expected: str) -> None:
    assert realize_pattern(text) == expected


@pytest.mark.parametrize(
    ("text", "column", "fragment"),
    [
        ("", 1, "empty pattern"),
        ("   ", 1, "empty pattern"),
        ("(M-", 1, "unbalanced '('"),
        ("M((-)2", 2, "unbalanced '('"),
        ("M-)", 3, "unbalanced ')'"),
        ("(M-))2", 5, "unbalanced ')'"),
        ("2M", 1, "digit '2' is not after ')'"),
        ("M2", 2, "digit '2' is not after ')'"),
        ("(M-)2 3", 7, "digit '3' is not after ')'"),
        ("(M-)0", 5, "repeat count 0"),
        ("(M(-)00)2", 6, "repeat count 0"),
        ("()2", 1, "empty group"),
        ("M(  )", 2, "empty group"),
        ("|M-", 1, "cannot start or end"),
        ("M-|", 3, "cannot start or end"),
        ("(|M)2", 2, "cannot start or end"),
        ("M||-", 3, "empty pipeline stage"),
        ("M.M", 2, "'.' is reserved"),
        ("M[", 2, "'[' is reserved"),
        ("M]", 2, "']' is reserved"),
        ("${M}", 1, "'$' is reserved"),
        ("M{", 2, "'{' is reserved"),
        ("M}", 2, "'}' is reserved"),
        ("M:-", 2, "':' is reserved"),
        ("M/-", 2, "'/' is reserved"),
        ("M\x00", 2, "not a printable"),
        ("(M)70000", 1, f"at most {MAX_LAYERS}"),
        ("((M)1000)1000", 1, f"at most {MAX_LAYERS}"),
        ("(" * 40 + "M" + ")" * 40, 33, "nested deeper"),
    ],
)
def test_errors_carry_the_column(text: str, column: int, fragment: str) -> None:
    with pytest.raises(PatternError, match=re.escape(fragment)) as info:
        realize_pattern(text)
    assert info.value.column == column
    assert f"(column {column})" in str(info.value)


def test_non_string_pattern_is_an_error() -> None:
    with pytest.raises(PatternError, match="a pattern is a string, got int"):
        realize_pattern(1234)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("char", "fragment"),
    [
        ("M", None),
        ("*", None),
        ("-", None),
        ("E", None),
        ("7", "digit"),
        ("(", "reserved"),
        ("|", "reserved"),
        (" ", "whitespace"),
        ("MM", "exactly one character"),
        ("", "exactly one character"),
        ("\n", "whitespace"),
    ],
)
def test_symbol_problem(char: str, fragment: str | None) -> None:
    problem = symbol_problem(char)
    assert (problem is None) if fragment is None else (fragment in problem)


# -- property: expansion equals a naive reference ---------------------------------------

SYMBOLS = st.sampled_from(list("M-*NEa"))


def _trees(depth: int) -> st.SearchStrategy:
    """Random pattern trees: a symbol, or (children, count or None)."""
    if depth == 0:
        return SYMBOLS
    group = st.tuples(
        st.lists(_trees(depth - 1), min_size=1, max_size=3),
        st.one_of(st.none(), st.integers(1, 3)),
    )
    return st.one_of(SYMBOLS, group)


def _render(tree: object, spaced: bool) -> str:
    """Tree -> pattern text (optionally with spaces sprinkled in)."""
    sep = " " if spaced else ""
    if isinstance(tree, str):
        return tree
    children, count = tree  # type: ignore[misc]
    inner = sep.join(_render(c, spaced) for c in children)
    return f"({inner}){sep}{'' if count is None else count}"


def _naive(tree: object) -> str:
    """Reference expansion by string repetition."""
    if isinstance(tree, str):
        return tree
    children, count = tree  # type: ignore[misc]
    return "".join(_naive(c) for c in children) * (1 if count is None else count)


@given(st.lists(_trees(3), min_size=1, max_size=4), st.booleans())
def test_expansion_matches_naive_reference(trees: list[object], spaced: bool) -> None:
    text = (" " if spaced else "").join(_render(t, spaced) for t in trees)
    assert realize_pattern(text) == "".join(_naive(t) for t in trees)


@given(st.lists(_trees(2), min_size=1, max_size=3), st.lists(_trees(2), min_size=1, max_size=3))
def test_stage_mark_is_kept_between_parts(left: list[object], right: list[object]) -> None:
    text = (
        "".join(_render(t, False) for t in left) + " | " + "".join(_render(t, False) for t in right)
    )
    expected = "".join(_naive(t) for t in left) + "|" + "".join(_naive(t) for t in right)
    assert realize_pattern(text) == expected
