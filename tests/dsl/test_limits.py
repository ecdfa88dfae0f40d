"""Numbers a spec must not smuggle in (issue: nothing silently wrong): non-finite floats,
sizes beyond the documented limits, YAML booleans read as integers, ratios that round a
requested type to zero layers, and interpolation chains deep enough to overflow the
stack. Each refusal is one located SpecError naming the field."""

from __future__ import annotations

import pytest

from mixstack.dsl.base import MAX_D_MODEL, MAX_LAYER_SIZE, MAX_SEQ_LEN, MAX_VOCAB
from mixstack.dsl.errors import SpecError, format_path
from mixstack.dsl.loader import MAX_INTERPOLATION_DEPTH, load_spec

BASE = {
    "model": {
        "d_model": 32,
        "vocab_size": 16,
        "max_seq_len": 64,
        "layers": {
            "pattern": "M*-",
            "symbols": {
                "M": {"type": "mamba2", "headdim": 16, "d_state": 8},
                "*": {"type": "attention", "n_heads": 2, "softmax_scale": 0.25},
                "-": {"type": "mlp"},
            },
        },
    },
    "train": {
        "task": {"type": "mqar", "vocab_size": 16, "seq_len": 32, "n_pairs": 4},
        "optimizer": {"lr": 1e-3},
        "max_steps": 10,
    },
}


def refused(overrides: list[str]) -> SpecError:
    with pytest.raises(SpecError) as info:
        load_spec(BASE, overrides)
    return info.value


@pytest.mark.parametrize(
    "override, path",
    [
        ("train.optimizer.lr=.inf", "train.optimizer.lr"),
        ("train.optimizer.lr=-.inf", "train.optimizer.lr"),
        ("train.optimizer.lr=1e400", "train.optimizer.lr"),
        ("model.init.std=.inf", "model.init.std"),
        ("model.norm.eps=.nan", "model.norm.eps"),
        ("model.layers.symbols.*.softmax_scale=.inf", "model.layers.symbols.*.softmax_scale"),
        ("model.layers.symbols.M.A_init_range=[1, .inf]", "model.layers.symbols.M.A_init_range[1]"),
        ("model.layers.symbols.M.dt_limit=[.nan, null]", "model.layers.symbols.M.dt_limit[0]"),
    ],
)
def test_non_finite_floats_are_refused_where_they_are(override: str, path: str) -> None:
    err = refused([override])
    assert len(err.issues) == 1, str(err)
    assert format_path(err.issues[0].path) == path
    assert path in str(err) and "finite number" in str(err)
    assert f"<override {override}>" in str(err)


def test_dt_limit_keeps_the_references_spelling_of_no_upper_bound() -> None:
    """``[0, .inf]`` is how mamba_ssm writes "unbounded": read as null, not refused."""
    spec = load_spec(BASE, ["model.layers.symbols.M.dt_limit=[0.001, .inf]"])
    assert spec.model.layers.symbols["M"].dt_limit == (0.001, None)


@pytest.mark.parametrize(
    "field, limit",
    [
        ("d_model", MAX_D_MODEL),
        ("vocab_size", MAX_VOCAB),
        ("max_seq_len", MAX_SEQ_LEN),
        ("pad_vocab_multiple", MAX_D_MODEL),
    ],
)
def test_model_sizes_are_bounded(field: str, limit: int) -> None:
    err = refused([f"model.{field}={limit + 1}"])
    assert f"model.{field}" in str(err) and f"<= {limit}" in str(err)
    err = refused([f"model.{field}={10**400}"])  # no overflow anywhere on the way
    assert f"model.{field}" in str(err)


@pytest.mark.parametrize(
    "override, path",
    [
        ("model.layers.symbols.-.hidden=99999999999", "model.layers.symbols.-.hidden"),
        ("model.layers.symbols.M.d_state=2000000", "model.layers.symbols.M.d_state"),
        ("model.layers.symbols.*.n_heads=4194304", "model.layers.symbols.*.n_heads"),
    ],
)
def test_every_layer_size_is_bounded(override: str, path: str) -> None:
    err = refused([override])
    text = str(err)
    assert path in text and "above the limit for layer sizes" in text
    assert f"<= {MAX_LAYER_SIZE:,}" in text


def test_a_plugin_layer_is_bounded_too(scoped_registry) -> None:
    from typing import Literal

    from torch import nn

    from mixstack.dsl.base import LayerConfig

    class WideConfig(LayerConfig):
        type: Literal["wide_test"] = "wide_test"
        kind = "channel"
        widths: tuple[int, ...] = (1, 2)

    scoped_registry.register(WideConfig)(type("Wide", (nn.Module,), {}))
    layers = {"pattern": "W", "symbols": {"W": {"type": "wide_test", "widths": [1, 2**21]}}}
    with pytest.raises(SpecError) as info:
        load_spec({"model": {**BASE["model"], "layers": layers}})
    assert "model.layers.symbols.W.widths[1]" in str(info.value)
    assert "above the limit for layer sizes" in str(info.value)


@pytest.mark.parametrize(
    "override, path",
    [
        ("model.d_model=true", "model.d_model"),
        ("train.batch_size=true", "train.batch_size"),
        ("model.layers.symbols.M.headdim=true", "model.layers.symbols.M.headdim"),
    ],
)
def test_a_yaml_boolean_is_not_an_integer(override: str, path: str) -> None:
    err = refused([override])
    text = str(err)
    assert path in text and "expected an integer, got" in text


RATIOS = {
    "model": {
        "d_model": 32,
        "layers": {
            "n_layers": 2,
            "ratios": {"*": 0.1, "M": 0.1},
            "fill": "-",
            "symbols": {
                "*": {"type": "attention", "n_heads": 2},
                "M": {"type": "mamba2", "headdim": 16},
                "-": {"type": "mlp"},
            },
        },
    }
}


def test_a_ratio_rounding_to_zero_layers_is_refused_naming_the_type() -> None:
    with pytest.raises(SpecError) as info:
        load_spec(RATIOS)
    text = str(info.value)
    assert len(info.value.issues) == 2
    assert "model.layers.ratios.*" in text and "'*' (type attention)" in text
    assert "'M' (type mamba2)" in text and "realized count 0" in text
    assert "allow_missing: true" in text


def test_allow_missing_accepts_it_outside_the_hash() -> None:
    spec = load_spec(RATIOS, ["model.layers.allow_missing=true"])
    assert spec.model.layers.pattern == "--"
    assert spec.model.layers.requested.allow_missing is True
    plain = load_spec(
        {
            "model": {
                **RATIOS["model"],
                "layers": {"pattern": "--", "symbols": {"-": {"type": "mlp"}}},
            }
        }
    )
    assert spec.spec_hash == plain.spec_hash  # provenance, like `requested`


def test_allow_missing_with_a_pattern_is_an_error() -> None:
    with pytest.raises(SpecError, match="allow_missing applies to the ratio form"):
        load_spec(BASE, ["model.layers.allow_missing=true"])


def _chain(n: int) -> dict:
    chain = {"v0": 32, **{f"v{i}": f"${{train.chain.v{i - 1}}}" for i in range(1, n)}}
    return {
        "model": {**BASE["model"], "d_model": f"${{train.chain.v{n - 1}}}"},
        "train": {"chain": chain},
    }


def test_a_deep_interpolation_chain_is_a_located_error_not_a_recursion_error() -> None:
    with pytest.raises(SpecError) as info:
        load_spec(_chain(300))
    text = str(info.value)
    assert f"deeper than {MAX_INTERPOLATION_DEPTH} references" in text
    assert "model.d_model" in text


def test_a_chain_within_the_limit_resolves() -> None:
    with pytest.raises(SpecError) as info:  # resolves, then `chain` is an unknown train key
        load_spec(_chain(MAX_INTERPOLATION_DEPTH - 2))
    assert "unknown key 'chain'" in str(info.value)
    assert "interpolation" not in str(info.value)


def test_divisors_by_pairs_and_at_once_for_absurd_widths() -> None:
    from mixstack.dsl.errors import divisors

    for n in range(1, 200):
        assert divisors(n) == [d for d in range(1, n + 1) if n % d == 0], n
    assert divisors(36) == [1, 2, 3, 4, 6, 9, 12, 18, 36]
    huge = divisors(2**70)  # a spec's width from a property test: counting to n hung
    assert huge[:3] == [1, 2, 4] and huge[-1] == 2**70 and 2**35 not in huge
    assert huge == sorted(huge) and all(2**70 % d == 0 for d in huge)
