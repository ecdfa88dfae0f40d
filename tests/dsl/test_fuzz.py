"""Property: whatever is done to a valid spec, load_spec returns a Spec or raises
SpecError, nothing else; and whatever loads survives a dump round trip."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixstack.dsl.errors import SpecError
from mixstack.dsl.loader import load_spec
from mixstack.dsl.provenance import iter_paths
from mixstack.dsl.spec import Spec

SEEDS: list[dict[str, Any]] = [
    yaml.safe_load("""
model:
  arch: causal_lm
  d_model: 64
  layers:
    pattern: "(*-)2 | *-"
    symbols:
      "*": {type: attention, n_heads: 4, n_kv_heads: 2, rope: {theta: 10000}}
      "-": {type: mlp, activation: swiglu}
    overrides:
      - {at: [0, "2:5:2"], set: {window: 16}}
run: {backend: auto}
"""),
    yaml.safe_load("""
model:
  arch: encoder
  d_model: 24
  special_tokens: [pad, mask]
  layers:
    n_layers: 8
    ratios: {"*": 0.25, "-": 0.5}
    fill: A
    symbols:
      A: {type: fake_stack, layers: [{type: fake_seq, width: 3}, {type: fake_channel}]}
      "*": {type: fake_wrap, inner: {type: fake_noncausal}}
      "-": {type: fake_seq, mode: beta}
train:
  task: {type: text, seq_len: 16, files: [a.txt, b.txt]}
  optimizer: {lr: 0.001}
  max_steps: 20
"""),
    yaml.safe_load("""
model:
  arch: classifier
  classifier: {n_classes: 4}
  d_model: 32
  special_tokens: [pad]
  layers:
    layer_types: [A, "-", A]
    symbols:
      A: {type: sequential, layers: [{type: attention, n_heads: 2}, {type: mlp, hidden: 8}]}
      "-": {type: mlp}
"""),
]

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.integers(-3, 70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(
        [
            "M-M*",
            "(*-)0",
            "${model.d_model}",
            "${oc.env:HOME}",
            "${x",
            "zoo:nope",
            "attention",
            "mlp",
            "fake_seq",
            "sequential",
            "0:2",
            "-1",
            "causal_lm",
            "|",
            "(",
            "swiglu",
            "*",
            "\\${a}",
            "a.b",
            "1e-5",
        ]
    ),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(
            st.one_of(st.text(max_size=6), st.integers(-2, 5), st.none()), inner, max_size=3
        ),
    ),
    max_leaves=8,
)


def _parent(data: Any, path: tuple) -> Any:
    node = data
    for part in path[:-1]:
        node = node[part]
    return node


def _mutate(data: dict[str, Any], draw: Any) -> None:
    paths = [p for p in iter_paths(data) if p]
    path = draw(st.sampled_from(paths))
    parent, key = _parent(data, path), path[-1]
    op = draw(st.sampled_from(["drop", "set", "rename", "add", "corrupt"]))
    if op == "drop":
        del parent[key]
    elif op == "set":
        parent[key] = draw(VALUES)
    elif op == "rename" and isinstance(parent, dict):
        new = draw(st.one_of(st.text(max_size=8), st.just(str(key)[:-1] + "x"), st.integers()))
        parent[new] = parent.pop(key)
    elif op == "add" and isinstance(parent, dict):
        parent[draw(st.text(max_size=8))] = draw(VALUES)
    elif op == "corrupt" and isinstance(parent[key], str):
        text = parent[key]
        at = draw(st.integers(0, len(text)))
        parent[key] = text[:at] + draw(st.text("()|.0123*-M$ {}:", max_size=3)) + text[at:]


def _check(result_or_error: Any) -> None:
    if isinstance(result_or_error, Spec):
        again = load_spec(yaml.safe_load(result_or_error.dump()))
        assert again.model == result_or_error.model
        assert again.spec_hash == result_or_error.spec_hash


def _load(source: Any, overrides: list[str] = ()) -> Any:  # type: ignore[assignment]
    try:
        return load_spec(source, overrides)
    except SpecError as exc:
        assert exc.issues and all(i.message for i in exc.issues)
        return exc


@given(st.data())
def test_mutated_dicts_raise_only_spec_error(data: st.DataObject) -> None:
    spec = copy.deepcopy(data.draw(st.sampled_from(SEEDS)))
    for _ in range(data.draw(st.integers(1, 4))):
        if not [p for p in iter_paths(spec) if p]:
            break
        _mutate(spec, data.draw)
    _check(_load(spec))


@given(st.data())
def test_random_overrides_raise_only_spec_error(data: st.DataObject) -> None:
    spec = data.draw(st.sampled_from(SEEDS))
    paths = [p for p in iter_paths(spec) if p]
    overrides = []
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        key = (
            ".".join(str(p) for p in path)
            if data.draw(st.booleans())
            else data.draw(st.text(".[]0a=", max_size=8))
        )
        value = data.draw(
            st.one_of(
                st.text(max_size=10),
                st.sampled_from(
                    ["[1, 2", "{a: 1}", "*-*-", "&x", "null", "-3", "1e309", "${model.d_model}"]
                ),
            )
        )
        overrides.append(f"{key}={value}" if data.draw(st.booleans()) else key + value)
    _check(_load(spec, overrides))


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_corrupted_yaml_text_raises_only_spec_error(tmp_path: Path, data: st.DataObject) -> None:
    text = yaml.safe_dump(data.draw(st.sampled_from(SEEDS)), sort_keys=False)
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(text)))
        cut = data.draw(st.integers(0, 4))
        text = (
            text[:at]
            + data.draw(st.text(" :-[]{}&*!|>'\"\n\tM#%@\x00", max_size=4))
            + text[at + cut :]
        )
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8")
    _check(_load(path))


@pytest.mark.parametrize("seed", range(len(SEEDS)))
def test_seeds_are_valid(seed: int) -> None:
    assert isinstance(load_spec(SEEDS[seed]), Spec)
