"""Ratio allocation: Megatron-LM's exact hybrid allocator and its generalisation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mixstack.dsl.ratios import RatioError, allocate

# The 8B Mamba-2-Hybrid (docs/math.md#hybrid-layouts): allocate(56, 0.08, 0.5), character
# for character the pattern in Megatron-LM examples/mamba/run_text_gen_server_8b.sh.
HYBRID_8B = "M-M-M--M-M*-M-M-M-M--M*-M-M-M-M-M*--M-M-M-M-M*-M--M-M-M-"


def megatron_reference(total: int, attn_ratio: float, mlp_ratio: float) -> str:
    """The pseudocode of docs/math.md#hybrid-layouts, transcribed literally (two ratios,
    symbols M / * / -)."""
    n_attn = round(total * attn_ratio)
    n_mamba = total - n_attn
    step = n_mamba / (n_attn + 1)
    types = ["M"] * total
    x = step
    for layer in range(total):
        if x < 0.5:
            types[layer] = "*"
            x += step
        else:
            x -= 1
    n_mlp = round(total * mlp_ratio)
    if n_mlp > 0:
        n_mamba -= n_mlp
        r = n_mamba / n_mlp
        x = r
        for layer in range(total):
            if types[layer] == "M":
                if x < 0.5:
                    types[layer] = "-"
                    x += r
                else:
                    x -= 1
    return "".join(types)


def test_hybrid_8b_acceptance() -> None:
    pattern = allocate(56, [("*", 0.08), ("-", 0.5)], "M")
    assert pattern == HYBRID_8B
    assert (pattern.count("M"), pattern.count("*"), pattern.count("-")) == (24, 4, 28)
    assert [i for i, c in enumerate(pattern) if c == "*"] == [10, 22, 33, 45]


def test_reference_reproduces_the_8b_pattern() -> None:
    assert megatron_reference(56, 0.08, 0.5) == HYBRID_8B


GRID = [
    (total, attn, mlp)
    for total in (1, 2, 3, 7, 12, 24, 48, 56, 64, 97)
    for attn in (0.0, 0.08, 0.1, 0.125, 0.25, 0.5)
    for mlp in (0.0, 0.2, 0.5)
    if round(total * attn) + round(total * mlp) <= total  # the rest: test_counts_that_do_not_fit
]


@pytest.mark.parametrize(("total", "attn", "mlp"), GRID)
def test_matches_megatron_on_a_grid(total: int, attn: float, mlp: float) -> None:
    assert allocate(total, [("*", attn), ("-", mlp)], "M") == megatron_reference(total, attn, mlp)


def test_python_round_half_to_even() -> None:
    # 10 * 0.25 = 2.5 -> round to 2 (half to even), not 3; 10 * 0.35 = 3.5 -> 4.
    assert allocate(10, [("*", 0.25)], "M").count("*") == 2
    assert allocate(10, [("*", 0.35)], "M").count("*") == 4
    assert allocate(10, [("*", 0.25)], "M") == megatron_reference(10, 0.25, 0.0) == "MMM*MM*MMM"
    # 6 * 0.25 = 1.5 -> 2 (even), 14 * 0.25 = 3.5 -> 4 (even)
    assert allocate(6, [("*", 0.25)], "M").count("*") == 2
    assert allocate(14, [("*", 0.25)], "M").count("*") == 4


def test_first_ratio_is_spread_with_fill_at_both_ends() -> None:
    assert allocate(7, [("*", 2 / 7)], "M") == "MM*M*MM"
    assert allocate(5, [("*", 1.0)], "M") == "*****"


def test_later_ratios_replace_only_remaining_fill_right_justified() -> None:
    # 3 ratios: attention spread first, then "-" and "E" over the fill slots left.
    pattern = allocate(20, [("*", 0.1), ("-", 0.4), ("E", 0.2)], "M")
    assert (pattern.count("*"), pattern.count("-"), pattern.count("E"), pattern.count("M")) == (
        2,
        8,
        4,
        6,
    )
    assert pattern == "M-ME-M*-E-M-M*E-M-E-"
    without_e = allocate(20, [("*", 0.1), ("-", 0.4)], "M")
    # the third ratio only turns remaining M into E, leaving the others in place
    assert all(a == b or (a == "M" and b == "E") for a, b in zip(without_e, pattern, strict=True))


def test_zero_ratio_places_nothing() -> None:
    assert allocate(8, [("*", 0.0), ("-", 0.5)], "M") == megatron_reference(8, 0.0, 0.5)
    assert allocate(4, [("*", 0.01)], "M") == "MMMM"


@pytest.mark.parametrize(
    ("n", "ratios", "fill", "key", "fragment"),
    [
        (0, [("*", 0.1)], "M", "n_layers", "integer >= 1"),
        (True, [("*", 0.1)], "M", "n_layers", "integer >= 1"),
        (2.0, [("*", 0.1)], "M", "n_layers", "integer >= 1"),
        (10**6, [("*", 0.1)], "M", "n_layers", "exceeds the limit"),
        (8, [("*", 1.5)], "M", "*", r"number in \[0, 1\]"),
        (8, [("*", -0.1)], "M", "*", r"number in \[0, 1\]"),
        (8, [("*", float("nan"))], "M", "*", r"number in \[0, 1\]"),
        (8, [("*", "0.5")], "M", "*", r"number in \[0, 1\]"),
        (8, [("*", 0.6), ("-", 0.6)], "M", "ratios", "sum to 1.2, more than 1"),
        (8, [("M", 0.5)], "M", "M", "cannot also have a ratio"),
        (8, [("12", 0.5)], "M", "12", "exactly one character"),
        (8, [("(", 0.5)], "M", "(", "reserved"),
        (8, [("*", 0.5)], "MM", "fill", "exactly one character"),
        (8, [("*", 0.5)], "1", "fill", "digit"),
        (3, [("*", 0.5), ("-", 0.5)], "M", "-", "only 1 'M' layers are left"),
    ],
)
def test_errors(n: object, ratios: list, fill: str, key: str, fragment: str) -> None:
    with pytest.raises(RatioError, match=fragment) as info:
        allocate(n, ratios, fill)  # type: ignore[arg-type]
    assert info.value.key == key


def test_counts_that_do_not_fit() -> None:
    # sum 1.0 but both round up: round(3 * 0.5) = 2 twice > 3 layers.
    with pytest.raises(RatioError, match=r"round\(3 \* 0.5\) = 2"):
        allocate(3, [("*", 0.5), ("-", 0.5)], "M")


@given(
    st.integers(1, 300),
    st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=4),
)
def test_counts_equal_rounded_ratios(total: int, raw: list[float]) -> None:
    scale = max(1.0, sum(raw))
    ratios = [(sym, r / scale) for sym, r in zip("*-EN", raw, strict=False)]
    counts = [round(total * r) for _, r in ratios]
    if sum(counts) > total:
        with pytest.raises(RatioError, match="left after the earlier ratios"):
            allocate(total, ratios, "M")
        return
    pattern = allocate(total, ratios, "M")
    assert len(pattern) == total
    for (sym, _), count in zip(ratios, counts, strict=True):
        assert pattern.count(sym) == count
    assert pattern.count("M") == total - sum(counts)
    if len(ratios) == 2:
        assert pattern == megatron_reference(total, ratios[0][1], ratios[1][1])
