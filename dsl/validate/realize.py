"""Per realized layer, with the model context: ``resolve`` (fills context defaults; the
resolved config is what the spec stores), overrides merged by the one merge path of
:func:`mixstack.dsl.layers.merge_layer_overrides`, ``check`` (cross-field rules) and
the capability check (a ``causal_lm`` refuses non-causal layers, pointing at the
binding's line)."""

from __future__ import annotations

from pydantic import BaseModel

from mixstack.dsl import registry
from mixstack.dsl.base import MAX_LAYER_SIZE, Capabilities, LayerConfig
from mixstack.dsl.context import LayerContext
from mixstack.dsl.errors import Path
from mixstack.dsl.layers import merge_layer_overrides
from mixstack.dsl.spec import STAGE_MARK, LayersSpec, ModelSpec, OverrideSpec
from mixstack.dsl.validate.bindings import Binding, layer_config
from mixstack.dsl.validate.common import LAYERS_PATH, Checker
from mixstack.dsl.validate.request import Request


def realize_model(
    ck: Checker,
    scalars: ModelSpec,
    request: Request,
    bindings: dict[str, Binding],
    overrides: list[tuple[OverrideSpec, list[int]]],
) -> ModelSpec | None:
    """The validated model: each symbol resolved with the context of its first layer
    (what the spec stores), every layer's config computed and checked."""
    order = [c for c in request.pattern if c != STAGE_MARK]
    resolved: dict[str, LayerConfig] = {}
    for i, symbol in enumerate(order):
        if symbol not in resolved:
            b = bindings[symbol]
            cfg = resolve_config(ck, b.config, scalars.context(i), b.path)
            if cfg is None:
                return None
            resolved[symbol] = cfg
    configs = layer_configs(ck, scalars, order, resolved, bindings, overrides)
    if configs is None:
        return None
    layers = ck.pydantic(
        LayersSpec,
        {
            "pattern": request.pattern,
            "symbols": resolved,
            "overrides": [o for o, _ in overrides],
            "requested": request.requested,
        },
        LAYERS_PATH,
    )
    fields = {k: getattr(scalars, k) for k in ModelSpec.model_fields if k != "layers"}
    model = ck.pydantic(ModelSpec, {**fields, "layers": layers}, ("model",))
    if model is not None:
        object.__setattr__(model, "_layer_configs", tuple(configs))
    return model


def resolve_config(
    ck: Checker, cfg: LayerConfig | None, ctx: LayerContext, path: Path
) -> LayerConfig | None:
    """``cfg.resolve(ctx)`` (context defaults filled), refusing a hook that returns
    another type; None if ``cfg`` is None or resolving failed."""
    if cfg is None:
        return None
    out = ck.hook(cfg.resolve, ctx, path, f"resolving {cfg.type}")
    if out is not None and not isinstance(out, type(cfg)):
        ck.add(
            f"{type(cfg).__name__}.resolve returned {type(out).__name__}, not a config "
            "of the same type (a bug in that layer type)",
            path,
        )
        return None
    return out


def layer_configs(
    ck: Checker,
    scalars: ModelSpec,
    order: list[str],
    resolved: dict[str, LayerConfig],
    bindings: dict[str, Binding],
    overrides: list[tuple[OverrideSpec, list[int]]],
) -> list[LayerConfig] | None:
    """Each realized layer's config through the one merge path of
    :func:`~mixstack.dsl.layers.merge_layer_overrides` (also used when a spec is read
    back): a layer an override touches is validated once, at that override's ``set``;
    every layer is checked with its own context."""
    merged = merge_layer_overrides(resolved, order, [(o.set, idx) for o, idx in overrides])
    for clash in merged.clashes:
        ck.add(
            f"an override cannot change a layer's type (layer {clash.layer} is {clash.old!r})",
            (*_override_set_path(clash.override), "type"),
            value=clash.new,
            allowed="the same type; bind another symbol for another type",
        )
    configs: list[LayerConfig] = []
    noncausal: dict[tuple[Path, str, str], list[int]] = {}
    for i, (symbol, data) in enumerate(zip(order, merged.dicts, strict=True)):
        ctx, k = scalars.context(i), merged.last[i]
        where = bindings[symbol].path if k is None else _override_set_path(k)
        unresolved = resolved[symbol] if data is None else layer_config(ck, data, where)
        cfg = resolve_config(ck, unresolved, ctx, where)
        if cfg is None:
            continue
        configs.append(cfg)
        check_config(ck, cfg, ctx, where)
        if ctx.causal_arch:
            for path, culprit in noncausal_parts(ck, cfg, ctx, where):
                noncausal.setdefault((path, symbol, culprit.type), []).append(i)
    for (path, symbol, kind), indices in noncausal.items():
        causal_issue(ck, path, symbol, kind, indices)
    ok = len(configs) == len(order) and not merged.clashes
    return configs if ok else None


def oversized_fields(value: object, rel: Path = ()) -> list[tuple[Path, int]]:
    """``(relative path, value)`` of every integer above :data:`MAX_LAYER_SIZE` in a
    config's own fields (nested option models and lists included, child layers not)."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [(rel, value)] if value > MAX_LAYER_SIZE else []
    if isinstance(value, (list, tuple)):
        return [hit for i, v in enumerate(value) for hit in oversized_fields(v, (*rel, i))]
    if isinstance(value, BaseModel):
        skip = type(value).child_fields if isinstance(value, LayerConfig) else ()
        return [
            hit
            for name in type(value).model_fields
            if name not in skip
            for hit in oversized_fields(getattr(value, name), (*rel, name))
        ]
    return []


def check_config(ck: Checker, cfg: LayerConfig, ctx: LayerContext, path: Path) -> None:
    """Run ``cfg.check`` (and its children's) and record what it finds; sizes above the
    documented limit are refused here for every layer type, plugins included."""
    for rel, value in oversized_fields(cfg):
        ck.add(
            f"{rel[-1]} = {value} is above the limit for layer sizes",
            (*path, *rel),
            value=value,
            allowed=f"<= {MAX_LAYER_SIZE:,} (docs/architecture.md#limits)",
        )
    results = ck.hook(cfg.check, ctx, path, f"checking {cfg.type}")
    for item in results or []:
        if not (isinstance(item, tuple) and len(item) == 2):
            ck.add(
                f"{type(cfg).__name__}.check returned {item!r}, not (path, message) "
                "(a bug in that layer type)",
                path,
            )
            continue
        rel, message = item
        rel = (rel,) if isinstance(rel, (str, int)) else tuple(rel)
        ck.add(str(message), (*path, *rel))
    for rel, child in _children(cfg):
        check_config(ck, child, ctx, (*path, *rel))


def noncausal_parts(
    ck: Checker, cfg: LayerConfig, ctx: LayerContext, path: Path
) -> list[tuple[Path, LayerConfig]]:
    """The innermost non-causal configs inside ``cfg`` (itself if no child is)."""
    caps = ck.hook(cfg.capabilities, ctx, path, f"capabilities of {cfg.type}")
    if not isinstance(caps, Capabilities) or caps.causal:
        return []
    found: list[tuple[Path, LayerConfig]] = []
    for rel, child in _children(cfg):
        found.extend(noncausal_parts(ck, child, ctx, (*path, *rel)))
    return found or [(path, cfg)]


def causal_issue(ck: Checker, path: Path, symbol: str, kind: str, indices: list[int]) -> None:
    """Point at the ``causal`` key when the layer type has one (its value is the
    culprit), else at the binding."""
    shown = ", ".join(map(str, indices[:12])) + (", ..." if len(indices) > 12 else "")
    has_flag = "causal" in registry.get(kind).config_cls.model_fields
    fix = (
        "set causal: true, or use arch: encoder"
        if has_flag
        else "a causal layer type, or arch: encoder"
    )
    ck.add(
        f"arch causal_lm needs causal layers; {symbol!r} (type {kind}) at layers "
        f"[{shown}] is not causal",
        (*path, "causal") if has_flag else path,
        allowed=fix,
    )


def _override_set_path(k: int) -> Path:
    return (*LAYERS_PATH, "overrides", k, "set")


def _children(cfg: LayerConfig) -> list[tuple[Path, LayerConfig]]:
    out: list[tuple[Path, LayerConfig]] = []
    for name in type(cfg).child_fields:
        value = getattr(cfg, name, None)
        if isinstance(value, (list, tuple)):
            out.extend(((name, i), c) for i, c in enumerate(value) if isinstance(c, LayerConfig))
        elif isinstance(value, LayerConfig):
            out.append(((name,), value))
    return out
