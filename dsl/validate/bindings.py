"""Symbol bindings, two-stage: read ``type``, look it up in the registry, validate with
that config class (children of composites first, so their errors carry their own
paths). Symbols the pattern uses but does not bind take the registry's defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mixstack.dsl import registry
from mixstack.dsl.base import LayerConfig
from mixstack.dsl.errors import Path, did_you_mean, keys_text
from mixstack.dsl.spec import STAGE_MARK
from mixstack.dsl.validate.common import LAYERS_PATH, NOT_GIVEN, Checker
from mixstack.dsl.validate.request import Request, is_symbol


@dataclass
class Binding:
    """A symbol's validated (not yet resolved) config and where its errors point."""

    symbol: str
    config: LayerConfig | None
    path: Path


def symbol_bindings(
    ck: Checker, layers: dict[Any, Any], request: Request | None
) -> dict[str, Binding] | None:
    """The bindings of the symbols the pattern uses (None if one is invalid or
    missing); every binding given is validated, used or not."""
    path = (*LAYERS_PATH, "symbols")
    message = "symbols must be a mapping of symbol -> layer config"
    example = "{M: {type: mamba2}, '*': {type: attention}}"
    symbols = ck.optional(layers, "symbols", dict, message, example, path)
    if symbols is None:
        return None
    out: dict[str, Binding] = {}
    allowed = "one character that is not a digit, space or ()|.[]${}:/"
    for symbol, binding in symbols.items():
        if not is_symbol(ck, symbol, (*path, symbol), "invalid symbol key", allowed):
            continue
        out[symbol] = Binding(symbol, layer_config(ck, binding, (*path, symbol)), (*path, symbol))
    if request is None:
        return out
    default_bindings(ck, out, request, path)
    used = [s for s in dict.fromkeys(request.pattern) if s != STAGE_MARK]
    if any(s not in out or out[s].config is None for s in used):
        return None
    return {s: out[s] for s in used}


def default_bindings(ck: Checker, out: dict[str, Binding], request: Request, path: Path) -> None:
    """Bind the registry's default config to each used symbol left unbound."""
    defaults = registry.default_bindings()
    for symbol in dict.fromkeys(request.pattern):
        if symbol == STAGE_MARK or symbol in out:
            continue
        if symbol not in defaults:
            ck.add(
                f"symbol {symbol!r} is used by the layers but not bound",
                request.path,
                allowed=f"bind it under model.layers.symbols "
                f"(bound: {keys_text(out) or 'none'}; defaults: "
                f"{keys_text(defaults) or 'none'})",
            )
            continue
        where = (*path, symbol)
        ck.prov.entries.setdefault(where, ck.origin(request.path))
        default = defaults[symbol]
        if not registry.has(default.get("type", "")):
            ck.add(
                f"symbol {symbol!r} is not bound and its default type "
                f"{default.get('type')!r} is not registered",
                request.path,
                allowed=f"bind it under model.layers.symbols; registered types: "
                f"{keys_text(registry.names())}",
            )
            continue
        out[symbol] = Binding(symbol, layer_config(ck, default, where), where)


def layer_config(ck: Checker, data: Any, path: Path) -> LayerConfig | None:
    """Two-stage validation of one layer config: ``type`` -> registry -> its class."""
    if isinstance(data, LayerConfig):
        return data
    if not isinstance(data, dict):
        ck.add(
            "a layer config must be a mapping with a `type`",
            path,
            value=data,
            allowed="{type: NAME, ...}; registered types: " + keys_text(registry.names()),
        )
        return None
    kind = data.get("type", NOT_GIVEN)
    names = registry.names()
    if kind is NOT_GIVEN or not isinstance(kind, str) or not registry.has(kind):
        got = "missing `type`" if kind is NOT_GIVEN else f"unknown layer type {kind!r}"
        ck.add(
            got,
            (*path, "type") if kind is not NOT_GIVEN else path,
            **({} if kind is NOT_GIVEN else {"value": kind}),
            allowed=f"registered types: {keys_text(names)}",
            suggestion=did_you_mean(kind, names) if isinstance(kind, str) else None,
        )
        return None
    cls = registry.get(kind).config_cls
    values = child_configs(ck, cls, data, path)
    if values is None:
        return None
    return ck.pydantic(cls, values, path)


def child_configs(
    ck: Checker, cls: type[LayerConfig], data: dict[Any, Any], path: Path
) -> dict[Any, Any] | None:
    """Validate nested layer configs first, so their errors carry their own paths."""
    values = dict(data)
    ok = True
    for name in cls.child_fields:
        child = values.get(name)
        if isinstance(child, list):
            configs = [layer_config(ck, c, (*path, name, i)) for i, c in enumerate(child)]
            ok = ok and all(c is not None for c in configs)
            values[name] = configs
        elif isinstance(child, dict):
            config = layer_config(ck, child, (*path, name))
            ok = ok and config is not None
            values[name] = config
    return values if ok else None
