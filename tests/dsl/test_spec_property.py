"""Property: for generated specs, valid ones and mutated ones (extreme, non-finite,
boolean and wrongly typed numbers put where sizes go), ``load_spec`` returns a Spec or
raises a SpecError whose every issue is located (a path into the spec and an origin);
nothing else escapes. 200 examples in the CI profile, 1,000 in the ``slow`` test."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixstack.dsl import registry
from mixstack.dsl.errors import SpecError
from mixstack.dsl.loader import load_spec
from mixstack.dsl.provenance import iter_paths
from mixstack.dsl.spec import Spec


def _examples() -> list[tuple[str, dict[str, Any], int, str]]:
    """(type, config data, d_model, arch) of every built-in layer example."""
    out = []
    for name in registry.names():
        entry = registry.get(name)
        if entry.origin.kind != "builtin":
            continue
        for ex in entry.config_cls.examples():
            data = ex.config.model_dump(mode="json")
            data["type"] = name
            out.append((name, data, ex.d_model, ex.arch))
    return out


EXAMPLES = _examples()
NASTY_NUMBERS = st.one_of(
    st.sampled_from([0, -1, 1, 2**16, 2**16 + 1, 2**20 + 1, 2**24 + 1, 10**400, True, False]),
    st.sampled_from([float("inf"), float("-inf"), float("nan"), 1e308, -0.0, 1e-320]),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["12", "1e400", "", "${model.d_model}", [], {}, None]),
)


@st.composite
def specs(draw: st.DrawFn) -> dict[str, Any]:
    """A spec from one to three examples of one arch (valid as drawn), then mutated."""
    first = draw(st.sampled_from(EXAMPLES))
    same = [e for e in EXAMPLES if e[2] == first[2] and e[3] == first[3]]
    chosen = [first, *draw(st.lists(st.sampled_from(same), max_size=2))]
    symbols = {sym: copy.deepcopy(ex[1]) for sym, ex in zip("ABC", chosen, strict=False)}
    pattern = "".join(draw(st.lists(st.sampled_from(sorted(symbols)), min_size=1, max_size=6)))
    spec: dict[str, Any] = {
        "model": {
            "arch": first[3],
            "d_model": first[2],
            "vocab_size": 16,
            "max_seq_len": 64,
            "layers": {"pattern": pattern, "symbols": symbols},
        }
    }
    if first[3] == "classifier":
        spec["model"]["classifier"] = {"n_classes": 3}
    for _ in range(draw(st.integers(0, 3))):
        paths = [p for p in iter_paths(spec) if p and p[-1] != "type"]
        path = draw(st.sampled_from(paths))
        node = spec
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = draw(NASTY_NUMBERS)
    return spec


def _check(spec: dict[str, Any]) -> None:
    try:
        result = load_spec(spec)
    except SpecError as exc:
        assert exc.issues
        for issue in exc.issues:
            assert issue.message, exc
            assert issue.path, f"an issue without a path: {issue}"
            assert issue.origin == "<dict>", f"an issue without an origin: {issue}"
        return
    assert isinstance(result, Spec)
    assert load_spec(result.to_dict()).spec_hash == result.spec_hash


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(specs())
def test_generated_specs_load_or_fail_located(spec: dict[str, Any]) -> None:
    _check(spec)


@pytest.mark.slow(budget_s=90)
@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
@given(specs())
def test_generated_specs_load_or_fail_located_1000(spec: dict[str, Any]) -> None:
    _check(spec)


def test_the_generator_yields_valid_specs_too() -> None:
    """Unmutated draws are valid: the property covers both sides."""
    valid = 0
    for _name, data, d_model, arch in EXAMPLES:
        spec = {
            "model": {
                "arch": arch,
                "d_model": d_model,
                "vocab_size": 16,
                "max_seq_len": 64,
                "layers": {"pattern": "A", "symbols": {"A": data}},
                **({"classifier": {"n_classes": 3}} if arch == "classifier" else {}),
            }
        }
        valid += isinstance(load_spec(spec), Spec)
    assert valid == len(EXAMPLES) > 20
