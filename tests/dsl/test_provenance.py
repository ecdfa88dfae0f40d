"""YAML with positions: plain data plus a file:line:col for every key, value and item."""

from __future__ import annotations

import pytest

from mixstack.dsl.errors import SpecError
from mixstack.dsl.provenance import MAX_NODES, Provenance, merge, parse_yaml

TEXT = """\
model:
  d_model: 64
  norm: {type: rmsnorm, eps: 1.0e-5}
  special_tokens:
    - pad
    - bos
  layers:
    symbols:
      "*": {type: attention}
"""


def test_values_keys_and_items_have_positions() -> None:
    data, prov = parse_yaml(TEXT, "f.yaml")
    assert data["model"]["norm"] == {"type": "rmsnorm", "eps": 1.0e-5}
    assert prov.entries[("model", "d_model")] == "f.yaml:2:12"  # the scalar value
    assert prov.entries[("model", "norm", "eps")] == "f.yaml:3:30"
    assert prov.entries[("model", "special_tokens", 1)] == "f.yaml:6:7"  # a list item
    assert prov.entries[("model", "layers")] == "f.yaml:7:3"  # a mapping: its key's position
    assert prov.entries[("model", "layers", "symbols", "*", "type")] == "f.yaml:9:19"
    assert prov.entries[()] == "f.yaml:1:1"


def test_lookup_falls_back_to_nearest_ancestor() -> None:
    _, prov = parse_yaml(TEXT, "f.yaml")
    assert prov.origin(("model", "norm", "bias")) == "f.yaml:3:3"
    assert prov.origin(("model", "layers", "symbols", "*", "n_heads", "x")) == "f.yaml:9:7"
    assert prov.origin(("nothing",)) == "f.yaml:1:1"
    assert Provenance().origin(("a",)) is None


def test_yaml_types_are_yaml_types() -> None:
    data, _ = parse_yaml("a: 1e-5\nb: 1.0e-5\nc: yes\nd: null\ne: '12'\nf: 0x10\n", "f")
    assert data == {"a": "1e-5", "b": 1.0e-5, "c": True, "d": None, "e": "12", "f": 16}


def test_merge_keys_are_resolved_not_duplicates() -> None:
    text = "base: &b {x: 1, y: 2}\nuse:\n  <<: *b\n  y: 3\n"
    data, prov = parse_yaml(text, "f.yaml")
    assert data["use"] == {"x": 1, "y": 3}
    assert prov.entries[("use", "y")] == "f.yaml:4:6"


@pytest.mark.parametrize(
    ("text", "origin", "fragment"),
    [
        ("a: 1\nb: [1, 2\n", "f.yaml:3:1", "invalid YAML: expected ',' or ']'"),
        ("a: 1\n  b: 2\n", "f.yaml:2:4", "invalid YAML: mapping values are not allowed here"),
        ("a: 'x\n", "f.yaml:2:1", "invalid YAML: found unexpected end of stream"),
        ("a: 1\n---\nb: 2\n", "f.yaml:2:1", "expected a single document"),
        ("a: !!python/object:os.system x\n", "f.yaml:1:4", "could not determine a constructor"),
        ("a:\n  x: 1\n  y: 2\n  x: 3\n", "f.yaml:4:3", "duplicate key 'x' (first set at line 2)"),
        ("? [1, 2]\n: x\n", "f.yaml:1:3", "mapping key must be a plain scalar"),
        ("a: \x07\n", "f.yaml:1:4", "invalid YAML: special characters are not allowed"),
    ],
)
def test_errors(text: str, origin: str, fragment: str) -> None:
    with pytest.raises(SpecError, match=fragment.replace("(", r"\(").replace(")", r"\)")) as info:
        parse_yaml(text, "f.yaml")
    assert info.value.issues[0].origin == origin


def test_all_duplicate_keys_are_reported() -> None:
    with pytest.raises(SpecError) as info:
        parse_yaml("a: 1\na: 2\nb: {c: 1, c: 2}\n", "f.yaml")
    assert [i.origin for i in info.value.issues] == ["f.yaml:2:1", "f.yaml:3:11"]
    assert [i.path for i in info.value.issues] == [("a",), ("b", "c")]


def test_alias_bomb_is_refused() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 7):
        prev = f"*a{i - 1}"
        lines.append(f"a{i}: &a{i} [{', '.join([prev] * 10)}]")
    with pytest.raises(SpecError, match=f"more than {MAX_NODES} values"):
        parse_yaml("\n".join(lines) + "\n", "bomb.yaml")


def test_deep_nesting_is_refused() -> None:
    with pytest.raises(SpecError, match="nesting deeper than"):
        parse_yaml("a: " + "[" * 80 + "]" * 80 + "\n", "deep.yaml")


def test_empty_document() -> None:
    data, prov = parse_yaml("# only a comment\n", "f.yaml")
    assert data is None and prov.origin(()) == "f.yaml:1:1"


def test_merge_carries_provenance_of_the_winner() -> None:
    low, low_prov = parse_yaml("m:\n  a: 1\n  b: [1, 2]\n  c: {x: 1}\n", "low.yaml")
    up, up_prov = parse_yaml("m:\n  b: [3]\n  c: {y: 2}\n", "up.yaml")
    data, prov = merge(low, low_prov, up, up_prov)
    assert data == {"m": {"a": 1, "b": [3], "c": {"x": 1, "y": 2}}}
    assert prov.origin(("m", "a")) == "low.yaml:2:6"
    assert prov.origin(("m", "b", 0)) == "up.yaml:2:7"
    assert ("m", "b", 1) not in prov.entries  # the replaced list's items are gone
    assert prov.origin(("m", "c", "x")) == "low.yaml:4:10"
    assert prov.origin(("m", "c", "y")) == "up.yaml:3:10"
    assert low == {"m": {"a": 1, "b": [1, 2], "c": {"x": 1}}}  # inputs untouched
