"""Validation with fake layer types: two-stage bindings, composites, hooks, capabilities."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import BaseModel, Field, ValidationError

from mixstack.dsl.errors import SpecError, format_path
from mixstack.dsl.loader import load_spec
from mixstack.dsl.schema import spec_file_model, spec_json_schema
from mixstack.dsl.validate import pydantic_issues

Write = Callable[[str, str], Path]


def spec_text(symbols: str, pattern: str = "AB", arch: str = "causal_lm", extra: str = "") -> str:
    """A spec whose symbols block starts on line 6."""
    return (
        f"model:\n  arch: {arch}\n  d_model: 24\n  layers:\n    pattern: '{pattern}'\n"
        f"    symbols:\n{symbols}{extra}"
    )


def errors(write: Write, text: str, overrides: tuple[str, ...] = ()) -> dict[str, object]:
    path = write("s.yaml", text)
    with pytest.raises(SpecError) as info:
        load_spec(path, overrides)
    return {format_path(i.path): i for i in info.value.issues}


def line(issue: object) -> int:
    return int(issue.origin.rsplit(":", 2)[1])  # type: ignore[attr-defined]


def test_check_hook_issue_points_at_the_field(write: Write) -> None:
    found = errors(
        write, spec_text("      A: {type: fake_seq, width: 5}\n      B: {type: fake_channel}\n")
    )
    issue = found["model.layers.symbols.A.width"]
    assert issue.message == "d_model (24) is not divisible by width (5)"
    assert issue.origin.endswith("s.yaml:7:34")


def test_check_runs_per_layer_with_override_paths(write: Write) -> None:
    text = spec_text(
        "      A: {type: fake_seq}\n      B: {type: fake_channel}\n",
        pattern="(AB)3",
        extra="    overrides:\n      - at: ['2:']\n        set: {width: 7}\n",
    )
    found = errors(write, text)
    assert list(found) == ["model.layers.overrides[0].set.width"]
    assert line(found["model.layers.overrides[0].set.width"]) == 11


def test_composite_children_are_validated_with_their_own_paths(write: Write) -> None:
    text = spec_text(
        "      A:\n"
        "        type: fake_stack\n"
        "        layers:\n"
        "          - {type: fake_seq, mode: gamma}\n"
        "          - {type: fake_wrap, inner: {type: fake_seq, widht: 2}}\n"
        "          - {type: fake_sek}\n"
        "      B: {type: fake_stack, layers: []}\n"
    )
    found = errors(write, text)
    mode = found["model.layers.symbols.A.layers[0].mode"]
    assert line(mode) == 10 and "'alpha', 'beta'" in mode.allowed
    widht = found["model.layers.symbols.A.layers[1].inner.widht"]
    assert line(widht) == 11 and widht.suggestion == "width"
    sek = found["model.layers.symbols.A.layers[2].type"]
    assert line(sek) == 12 and sek.suggestion == "fake_seq"
    empty = found["model.layers.symbols.B.layers"]
    assert line(empty) == 13 and "at least 1 item" in empty.allowed


def test_composite_children_are_checked_and_resolved(write: Write) -> None:
    text = spec_text(
        "      A: {type: fake_stack, layers: [{type: fake_seq}, {type: fake_seq, width: 5}]}\n"
        "      B: {type: fake_wrap, inner: {type: fake_channel}}\n"
    )
    found = errors(write, text)
    assert list(found) == ["model.layers.symbols.A.layers[1].width"]
    spec = load_spec(write("ok.yaml", text.replace("width: 5", "width: 6")))
    stack = spec.model.layers.symbols["A"]
    assert [c.scale for c in stack.layers] == [6.0, 4.0]
    assert spec.model.layers.symbols["B"].inner.hidden == 2 * 24 + 1


def test_noncausal_layer_in_causal_lm(write: Write) -> None:
    text = spec_text(
        "      A: {type: fake_noncausal}\n      B: {type: fake_seq, causal: false}\n",
        pattern="(AB)2A",
    )
    found = errors(write, text)
    a = found["model.layers.symbols.A"]
    assert a.message == (
        "arch causal_lm needs causal layers; 'A' (type fake_noncausal) at "
        "layers [0, 2, 4] is not causal"
    )
    assert a.allowed == "a causal layer type, or arch: encoder" and line(a) == 7
    b = found["model.layers.symbols.B.causal"]
    assert "'B' (type fake_seq) at layers [1, 3]" in b.message
    assert b.allowed == "set causal: true, or use arch: encoder"
    assert b.origin.endswith("s.yaml:8:35")
    # an encoder accepts both
    spec = load_spec(write("enc.yaml", text.replace("causal_lm", "encoder")))
    assert spec.model.layers.symbols["B"].causal is False


def test_noncausal_child_of_a_composite_is_named(write: Write) -> None:
    text = spec_text(
        "      A: {type: fake_stack, layers: [{type: fake_seq}, "
        "{type: fake_wrap, inner: {type: fake_noncausal}}]}\n"
        "      B: {type: fake_channel}\n"
    )
    found = errors(write, text)
    issue = found["model.layers.symbols.A.layers[1].inner"]
    assert "'A' (type fake_noncausal) at layers [0]" in issue.message


def test_override_can_make_a_layer_noncausal(write: Write) -> None:
    text = spec_text(
        "      A: {type: fake_seq}\n      B: {type: fake_channel}\n",
        pattern="(AB)2",
        extra="    overrides:\n      - {at: [-2], set: {causal: false}}\n",
    )
    found = errors(write, text)
    issue = found["model.layers.overrides[0].set.causal"]
    assert "at layers [2]" in issue.message and line(issue) == 10


@pytest.mark.parametrize(
    ("hook", "fragment"),
    [
        ("resolve", "resolving fake_boom failed: ZeroDivisionError: resolve exploded"),
        ("check", "checking fake_boom failed: KeyError: 'check exploded'"),
        ("capabilities", "capabilities of fake_boom failed: RuntimeError: capabilities exploded"),
    ],
)
def test_crashing_hooks_become_issues(write: Write, hook: str, fragment: str) -> None:
    text = spec_text(
        f"      A: {{type: fake_boom, explode: {hook}}}\n      B: {{type: fake_channel}}\n"
    )
    found = errors(write, text)
    assert found["model.layers.symbols.A"].message == fragment
    assert line(found["model.layers.symbols.A"]) == 7


def test_spec_error_from_a_hook_is_anchored_at_the_binding(write: Write) -> None:
    text = spec_text(
        "      A: {type: fake_boom, explode: spec_error}\n      B: {type: fake_channel}\n"
    )
    issue = errors(write, text)["model.layers.symbols.A.explode"]
    assert issue.message == "refused by the layer" and issue.allowed == "none"
    assert issue.origin.endswith("s.yaml:7:37")


def test_unused_bindings_are_validated_but_not_stored(write: Write) -> None:
    symbols = "      A: {type: fake_seq}\n      B: {type: fake_channel}\n"
    found = errors(write, spec_text(symbols + "      Z: {type: fake_seq, width: -1}\n"))
    assert list(found) == ["model.layers.symbols.Z.width"]
    spec = load_spec(write("ok.yaml", spec_text(symbols + "      Z: {type: fake_seq}\n")))
    assert list(spec.model.layers.symbols) == ["A", "B"]


def test_unbound_symbol_without_default(write: Write) -> None:
    found = errors(write, spec_text("      A: {type: fake_seq}\n", pattern="AQ"))
    issue = found["model.layers.pattern"]
    assert issue.message == "symbol 'Q' is used by the layers but not bound"
    assert "bound: A;" in issue.allowed and line(issue) == 5


@pytest.mark.parametrize(
    ("symbols", "path", "fragment"),
    [
        ("      A: fake_seq\n", "model.layers.symbols.A", "a layer config must be a mapping"),
        ("      A: {width: 3}\n", "model.layers.symbols.A", "missing `type`"),
        ("      A: {type: 3}\n", "model.layers.symbols.A.type", "unknown layer type 3"),
        ("      AB: {type: fake_seq}\n", "model.layers.symbols.AB", "exactly one character"),
        ("      3: {type: fake_seq}\n", "model.layers.symbols[3]", "not a string"),
    ],
)
def test_binding_shapes(write: Write, symbols: str, path: str, fragment: str) -> None:
    found = errors(write, spec_text(symbols + "      B: {type: fake_channel}\n"))
    assert fragment in found[path].message


def test_every_error_of_a_file_in_one_spec_error(write: Write) -> None:
    text = (
        "model:\n"  # 1
        "  arch: causal_lm\n"  # 2
        "  d_modle: 24\n"  # 3  misspelled key
        "  dropout: 2\n"  # 4  out of range
        "  layers:\n"  # 5
        "    pattern: '(AB)2'\n"  # 6
        "    symbols:\n"  # 7
        "      A: {type: fake_seq, mode: alpah}\n"  # 8  bad literal
        "      B: {type: fake_chanel}\n"  # 9  unknown type
        "      C: {type: fake_noncausal, k: 0}\n"  # 10 unused, still validated
        "    overrides:\n"  # 11
        "      - {at: [9], set: {width: 1}}\n"  # 12 index out of range
        "run: {backend: [torch]}\n"  # 13 bad backend
        "trian: {}\n"  # 14 misspelled section
    )
    found = errors(write, text)
    assert {p: line(i) for p, i in found.items()} == {
        "model.d_modle": 3,
        "model.dropout": 4,
        "model.layers.symbols.A.mode": 8,
        "model.layers.symbols.B.type": 9,
        "model.layers.symbols.C.k": 10,
        "model.layers.overrides[0].at[0]": 12,
        "run.backend": 13,
        "trian": 14,
    }
    assert found["model.d_modle"].suggestion == "d_model"
    assert found["model.dropout"].allowed == ">= 0 and < 1"
    assert found["model.layers.symbols.A.mode"].suggestion == "alpha"
    assert found["model.layers.symbols.B.type"].suggestion == "fake_channel"
    assert found["trian"].suggestion == "train"


# -- Pydantic error translation -----------------------------------------------------------------


class _Inner(BaseModel):
    model_config = {"extra": "forbid"}
    theta: float = Field(1.0, gt=0, le=10)


class _Outer(BaseModel):
    model_config = {"extra": "forbid"}
    rank: int | str = "auto"
    inner: _Inner | None = None
    items: list[_Inner] = []
    table: dict[str, int] = {}


@pytest.mark.parametrize(
    ("data", "path", "message", "allowed"),
    [
        ({"inner": {"theta": 0}}, ("inner", "theta"), "greater than 0", "> 0 and <= 10"),
        (
            {"inner": {"thetta": 1}},
            ("inner", "thetta"),
            "unknown key 'thetta'",
            "valid keys: theta",
        ),
        (
            {"items": [{}, {"theta": "x"}]},
            ("items", 1, "theta"),
            "valid number",
            "a number > 0 and <= 10",
        ),
        (
            {"rank": [1]},
            ("rank",),
            "invalid value: Input should be a valid integer or",
            "an integer or a string",
        ),
        ({"table": {"a": "b"}}, ("table", "a"), "valid integer", "an integer"),
        ({"inner": 3}, ("inner",), "valid dictionary", "a mapping"),
    ],
)
def test_pydantic_translation(data: dict, path: tuple, message: str, allowed: str) -> None:
    with pytest.raises(ValidationError) as info:
        _Outer.model_validate(data)
    issues = pydantic_issues(info.value, ("x",), data, _Outer, lambda p: "o")
    assert len(issues) == 1
    issue = issues[0]
    assert issue.path == ("x", *path) and message in issue.message and issue.allowed == allowed


# -- JSON schema ---------------------------------------------------------------------------------


def test_json_schema_discriminates_every_registered_type() -> None:
    schema = spec_json_schema()
    union = schema["$defs"]["LayerConfig"]
    mapping = union["discriminator"]["mapping"]
    assert union["discriminator"]["propertyName"] == "type"
    for name in ("fake_seq", "fake_stack", "attention", "mlp"):
        assert name in mapping
    assert mapping["fake_seq"] == "#/$defs/FakeSeqConfig"
    symbols = schema["$defs"]["LayersFile"]["properties"]["symbols"]["anyOf"][0]
    assert symbols["additionalProperties"] == union
    # composite children refer to the same union
    assert schema["$defs"]["FakeStackConfig"]["properties"]["layers"]["items"] == {
        "$ref": "#/$defs/LayerConfig"
    }
    assert set(schema["properties"]) == {"base", "schema_version", "model", "train", "run"}
    assert schema["$defs"]["FakeSeqConfig"]["properties"]["mode"]["enum"] == ["alpha", "beta"]


def test_file_model_accepts_spec_files_and_rejects_bad_types() -> None:
    model = spec_file_model()
    model.model_validate(
        {
            "base": "zoo:x",
            "model": {
                "layers": {
                    "n_layers": 4,
                    "ratios": {"*": 0.5},
                    "fill": "A",
                    "symbols": {"A": {"type": "fake_stack", "layers": [{"type": "fake_seq"}]}},
                }
            },
        }
    )
    with pytest.raises(ValidationError, match="does not match any of the expected tags"):
        model.model_validate(
            {"model": {"layers": {"pattern": "A", "symbols": {"A": {"type": "nope"}}}}}
        )


@pytest.mark.parametrize(
    ("layers", "path", "fragment"),
    [
        ("layer_types: A", "model.layers.layer_types", "a non-empty list of symbols"),
        ("layer_types: []", "model.layers.layer_types", "a non-empty list of symbols"),
        ("layer_types: [A, 7]", "model.layers.layer_types[1]", "not a string"),
        ("layer_types: [A, '|']", "model.layers.layer_types[1]", "'|' is reserved"),
        ("layer_types: [A, BB]", "model.layers.layer_types[1]", "exactly one character"),
        ("pattern: 7", "model.layers.pattern", "pattern must be a string"),
        ("{}", "model.layers", "does not say which layers to stack"),
        (
            "ratios: [0.5]\n    n_layers: 2\n    fill: A",
            "model.layers.ratios",
            "non-empty mapping of symbol -> fraction",
        ),
    ],
)
def test_layer_request_shapes(write: Write, layers: str, path: str, fragment: str) -> None:
    text = "model:\n  layers:\n    " + layers + "\n"
    text = text.replace("  layers:\n    {}", "  layers: {}")
    found = errors(write, text)
    assert fragment in found[path].message


def test_layer_types_realize_in_order(write: Write) -> None:
    text = spec_text("      A: {type: fake_seq}\n      B: {type: fake_channel}\n").replace(
        "pattern: 'AB'", "layer_types: [B, A, A, B]"
    )
    spec = load_spec(write("lt.yaml", text))
    assert spec.model.layers.pattern == "BAAB"
    assert spec.model.layers.requested.layer_types == ["B", "A", "A", "B"]
    assert [c.type for c in spec.model.layer_configs()] == [
        "fake_channel",
        "fake_seq",
        "fake_seq",
        "fake_channel",
    ]
