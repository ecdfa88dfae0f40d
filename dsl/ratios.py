"""Ratios -> literal pattern: Megatron-LM's hybrid layer allocation, generalised.

Megatron-LM (``megatron/core/ssm/mamba_hybrid_layer_allocation.py``) turns
``--hybrid-attention-ratio`` and ``--hybrid-mlp-ratio`` into a layer pattern over
Mamba layers (docs/math.md#hybrid-layouts):

1. ``n_attn = round(N * r_attn)`` attention layers are spread evenly over the stack,
   with Mamba runs at both ends: walking the layers with a running ``x`` that starts
   at ``step = (N - n_attn) / (n_attn + 1)``, a layer becomes attention when
   ``x < 0.5`` (then ``x += step``), otherwise ``x -= 1``.
2. ``n_mlp = round(N * r_mlp)`` MLP layers replace remaining Mamba slots only, with
   the same walk over those slots and ``step = (n_mamba_left - n_mlp) / n_mlp``.

``round`` is Python's (half to even: ``round(2.5) == 2``), as in Megatron.

**Generalisation.** mixstack takes ``{n_layers, ratios: {symbol: r, ...}, fill}``
and applies the ratios *in the order they are listed*: the first ratio uses rule 1
(even spread over all layers, fill at both ends); every later ratio uses rule 2 over
the fill slots that are still left. With ``ratios: {"*": r_attn, "-": r_mlp}`` and
``fill: M`` this is exactly Megatron's allocation, character for character (the
8B Mamba-2-Hybrid's pattern is reproduced by the tests). A ratio whose count
rounds to 0 places nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

from mixstack.dsl.pattern import MAX_LAYERS, symbol_problem

# Decimal fractions that sum to 1 on paper may sum to 1 + 2e-16 in floating point
# (0.1 + 0.2 + 0.7); such a sum is accepted, the rounded counts are checked anyway.
_SUM_TOLERANCE = 1e-9


class RatioError(ValueError):
    """Ratios that cannot be allocated. ``key`` names the field at fault: ``"n_layers"``,
    ``"fill"``, ``"ratios"`` or a ratio's symbol."""

    def __init__(self, message: str, key: str, allowed: str | None = None):
        super().__init__(message)
        self.message = message
        self.key = key
        self.allowed = allowed


def _spread_evenly(types: list[str], fill: str, symbol: str, count: int) -> None:
    """Megatron's attention rule: ``count`` symbols spread over all layers (all fill)."""
    step = (len(types) - count) / (count + 1)
    x = step
    for i in range(len(types)):
        if x < 0.5:
            types[i] = symbol
            x += step
        else:
            x -= 1


def _replace_fill(types: list[str], fill: str, symbol: str, count: int) -> None:
    """Megatron's MLP rule: ``count`` of the remaining fill slots become ``symbol``."""
    n_fill = sum(1 for t in types if t == fill)
    step = (n_fill - count) / count
    x = step
    for i, current in enumerate(types):
        if current != fill:
            continue
        if x < 0.5:
            types[i] = symbol
            x += step
        else:
            x -= 1


def check_ratio_request(n_layers: int, ratios: Sequence[tuple[str, float]], fill: str) -> None:
    """Raise :class:`RatioError` for a request that is malformed on its face."""
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise RatioError(f"n_layers must be an integer >= 1, got {n_layers!r}", "n_layers")
    if n_layers > MAX_LAYERS:
        raise RatioError(f"n_layers {n_layers} exceeds the limit of {MAX_LAYERS}", "n_layers")
    problem = symbol_problem(fill)
    if problem is not None:
        raise RatioError(f"fill: {problem}", "fill", "one symbol character, e.g. M")
    for symbol, ratio in ratios:
        problem = symbol_problem(symbol)
        if problem is not None:
            raise RatioError(f"ratio key: {problem}", symbol, "one symbol character per ratio")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
            raise RatioError(
                f"ratio of {symbol!r} must be a number in [0, 1], got {ratio!r}",
                symbol,
                "a number in [0, 1]",
            )
        if symbol == fill:
            raise RatioError(
                f"the fill symbol {fill!r} cannot also have a ratio",
                symbol,
                "ratios for symbols other than the fill",
            )
    total = sum(float(r) for _, r in ratios)
    if total > 1 + _SUM_TOLERANCE:
        raise RatioError(f"ratios sum to {total:.6g}, more than 1", "ratios", "a sum <= 1")


def allocate(n_layers: int, ratios: Sequence[tuple[str, float]], fill: str) -> str:
    """The literal pattern for ``n_layers`` layers with the given ``(symbol, ratio)`` pairs
    (in order) over ``fill``. Raises :class:`RatioError` when the request is malformed or
    the rounded counts do not fit."""
    check_ratio_request(n_layers, ratios, fill)
    types = [fill] * n_layers
    first = True
    for symbol, ratio in ratios:
        count = round(n_layers * ratio)
        left = sum(1 for t in types if t == fill)
        if count > left:
            raise RatioError(
                f"ratio {ratio!r} of {symbol!r} asks for round({n_layers} * {ratio!r}) = {count} "
                f"layers but only {left} {fill!r} layers are left after the earlier ratios",
                symbol,
                f"ratios whose rounded counts sum to at most n_layers = {n_layers}",
            )
        if count > 0:
            place = _spread_evenly if first else _replace_fill
            place(types, fill, symbol, count)
        first = False
    return "".join(types)
