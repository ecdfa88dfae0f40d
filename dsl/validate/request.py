"""How the layers are asked for: ``pattern`` | ``layer_types`` | ``n_layers`` +
``ratios`` + ``fill`` (exclusive), realized to a literal pattern."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mixstack.dsl.errors import Path, SpecIssue, format_path
from mixstack.dsl.pattern import GRAMMAR_HELP, PatternError, realize_pattern, symbol_problem
from mixstack.dsl.ratios import RatioError, allocate
from mixstack.dsl.spec import LayersRequest
from mixstack.dsl.validate.common import LAYERS_PATH, Checker

# The three exclusive ways to ask for layers, and the keys each uses.
LAYER_FORMS: dict[str, tuple[str, ...]] = {
    "pattern": ("pattern",),
    "layer_types": ("layer_types",),
    "ratios": ("n_layers", "ratios", "fill"),
}
FORMS_HELP = "pattern: 'M-M*', or layer_types: [M, '-'], or n_layers + ratios + fill"


def layer_forms(layers: dict[Any, Any]) -> list[str]:
    """The layer forms whose keys appear in ``layers``, in key order."""
    out: list[str] = []
    for key in layers:
        for form, keys in LAYER_FORMS.items():
            if key in keys and form not in out:
                out.append(form)
    return out


def form_conflict(
    layers: dict[Any, Any], origin_of: Callable[[Path], str | None], path: Path = LAYERS_PATH
) -> SpecIssue | None:
    """The issue for one source asking for layers in two ways, else None."""
    forms = layer_forms(layers)
    if len(forms) < 2:
        return None
    second = next(k for k in layers if k in LAYER_FORMS[forms[1]])
    return SpecIssue(
        f"{format_path(path)} sets both {forms[0]} and {forms[1]}; they are exclusive",
        path=(*path, second),
        origin=origin_of((*path, second)),
        allowed=f"one of: {FORMS_HELP}",
    )


def is_symbol(ck: Checker, item: Any, path: Path, what: str, allowed: str) -> bool:
    """Whether ``item`` can be a layer symbol; if not, an issue ``"{what}: why"``."""
    problem = symbol_problem(item) if isinstance(item, str) else "not a string"
    if problem is not None:
        ck.add(f"{what}: {problem}", path, value=item, allowed=allowed)
    return problem is None


@dataclass
class Request:
    """How the layers were asked for, realized."""

    pattern: str
    requested: LayersRequest
    path: Path  # where pattern-level errors point


def layer_request(ck: Checker, layers: dict[Any, Any], path: Path) -> Request | None:
    """The realized pattern of whichever one form ``layers`` uses."""
    conflict = form_conflict(layers, ck.origin, path)
    forms = layer_forms(layers)
    if conflict is not None:
        ck.issues.extend([conflict])
        return None
    if not forms:
        ck.add(
            f"{format_path(path)} does not say which layers to stack",
            path,
            allowed=FORMS_HELP,
        )
        return None
    if forms[0] != "ratios" and layers.get("allow_missing") is not None:
        ck.add(
            f"allow_missing applies to the ratio form, not to {forms[0]}",
            (*path, "allow_missing"),
            value=layers["allow_missing"],
            allowed="remove it, or ask for layers with n_layers + ratios + fill",
        )
        return None
    if forms[0] == "pattern":
        return request_pattern(ck, layers["pattern"], (*path, "pattern"))
    if forms[0] == "layer_types":
        return request_layer_types(ck, layers["layer_types"], (*path, "layer_types"))
    return request_ratios(ck, layers, path)


def request_pattern(ck: Checker, text: Any, path: Path) -> Request | None:
    """The pattern form: a grammar string like ``'(M-)4 | *-'``."""
    if not isinstance(text, str):
        ck.add("pattern must be a string", path, value=text, allowed=GRAMMAR_HELP)
        return None
    try:
        realized = realize_pattern(text)
    except PatternError as exc:
        ck.add(
            f"invalid pattern: {exc.message} at column {exc.column} of {text!r}",
            path,
            value=text,
            allowed=GRAMMAR_HELP,
        )
        return None
    return Request(realized, LayersRequest(pattern=text), path)


def request_layer_types(ck: Checker, items: Any, path: Path) -> Request | None:
    """The layer_types form: one symbol per layer."""
    if not isinstance(items, list) or not items:
        ck.add(
            "layer_types must be a non-empty list of symbols",
            path,
            value=items,
            allowed="a list like [M, '-', M, '*'], one symbol character per layer",
        )
        return None
    allowed = "one symbol character (not a digit, space or ()|.[]${}:/)"
    what = "layer_types entry is not a symbol"
    # a list, not a generator: every entry is checked and reported
    if not all([is_symbol(ck, s, (*path, i), what, allowed) for i, s in enumerate(items)]):
        return None
    return Request("".join(items), LayersRequest(layer_types=list(items)), path)


def request_ratios(ck: Checker, layers: dict[Any, Any], path: Path) -> Request | None:
    """The ratio form: ``n_layers`` allocated by ``ratios``, the rest ``fill``."""
    missing = [k for k in LAYER_FORMS["ratios"] if layers.get(k) is None]
    if missing:
        ck.add(
            f"ratio form needs {', '.join(missing)}",
            path,
            allowed="n_layers: 56, ratios: {'*': 0.08, '-': 0.5}, fill: M",
        )
        return None
    n_layers, ratios, fill = layers["n_layers"], layers["ratios"], layers["fill"]
    if not isinstance(ratios, dict) or not ratios:
        ck.add(
            "ratios must be a non-empty mapping of symbol -> fraction",
            (*path, "ratios"),
            value=ratios,
            allowed="{'*': 0.08, '-': 0.5}",
        )
        return None
    try:
        realized = allocate(n_layers, list(ratios.items()), fill)
    except RatioError as exc:
        where = {"n_layers": ("n_layers",), "fill": ("fill",), "ratios": ("ratios",)}
        rel = where.get(exc.key, ("ratios", exc.key))
        value = layers[rel[0]] if len(rel) == 1 else ratios.get(exc.key)
        ck.add(exc.message, (*path, *rel), value=value, allowed=exc.allowed)
        return None
    allow_missing = layers.get("allow_missing")
    if allow_missing is not None and not isinstance(allow_missing, bool):
        ck.add(
            "allow_missing must be true or false",
            (*path, "allow_missing"),
            value=allow_missing,
            allowed="true or false",
        )
        return None
    if not allow_missing and not missing_types_ok(ck, layers, realized, path):
        return None
    requested = LayersRequest(
        n_layers=n_layers, ratios=dict(ratios), fill=fill, allow_missing=allow_missing or None
    )
    return Request(realized, requested, (*path, "ratios"))


def missing_types(ratios: dict[Any, Any], realized: str) -> list[tuple[str, float]]:
    """``(symbol, ratio)`` for each ratio > 0 that realized no layer at all."""
    return [
        (s, r)
        for s, r in ratios.items()
        if isinstance(r, (int, float)) and r > 0 and s not in realized
    ]


def missing_types_ok(ck: Checker, layers: dict[Any, Any], realized: str, path: Path) -> bool:
    """A requested type that rounds to zero layers is refused (a model silently without
    its sequence mixer is worse than an error), naming the type and its realized count."""
    symbols = layers.get("symbols") if isinstance(layers.get("symbols"), dict) else {}
    ok = True
    for symbol, ratio in missing_types(layers["ratios"], realized):
        binding = symbols.get(symbol)
        kind = binding.get("type") if isinstance(binding, dict) else None
        named = f"{symbol!r} (type {kind})" if isinstance(kind, str) else repr(symbol)
        ck.add(
            f"ratio {ratio!r} of {named} rounds to 0 of {layers['n_layers']} layers: the model "
            f"would have no {named} layer (realized count 0)",
            (*path, "ratios", symbol),
            value=ratio,
            allowed="a larger n_layers or ratio, or `allow_missing: true` under layers to "
            "accept it (shown as a warning by `mixstack info`)",
        )
        ok = False
    return ok


def check_requested(ck: Checker, layers: dict[Any, Any], request: Request) -> Request | None:
    """A dumped spec carries ``requested`` (how its pattern was asked for): keep it,
    after checking it still realizes to the pattern."""
    raw = layers.get("requested")
    if raw is None:
        return request
    path = (*LAYERS_PATH, "requested")
    given = ck.pydantic(LayersRequest, raw, path)
    if given is None:
        return None
    inner = layer_request(ck, given.model_dump(exclude_none=True), path)
    if inner is None:
        return None
    if inner.pattern != request.pattern:
        ck.add(
            "layers.requested does not realize to layers.pattern",
            path,
            value=inner.pattern,
            allowed=f"a request giving {request.pattern!r} "
            "(or drop `requested`: dump() writes it as provenance)",
        )
        return None
    return Request(request.pattern, given, request.path)
