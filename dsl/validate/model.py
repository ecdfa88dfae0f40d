"""The model section: its own fields (Pydantic), then the layers (request, bindings,
overrides) and, when all of those are valid, the realized stack."""

from __future__ import annotations

from typing import Any

from mixstack.dsl.spec import LayersSpec, ModelSpec
from mixstack.dsl.validate.bindings import symbol_bindings
from mixstack.dsl.validate.common import LAYERS_PATH, Checker
from mixstack.dsl.validate.overrides import layer_overrides
from mixstack.dsl.validate.realize import realize_model
from mixstack.dsl.validate.request import FORMS_HELP, Request, check_requested, layer_request

LAYERS_KEYS = (
    "pattern",
    "layer_types",
    "n_layers",
    "ratios",
    "fill",
    "allow_missing",
    "symbols",
    "overrides",
    "requested",
)


def model_section(ck: Checker, data: Any) -> ModelSpec | None:
    """The model section; the layers are realized only when the request, the model's
    own fields, the bindings and the overrides are all valid."""
    if not isinstance(data, dict):
        ck.add(
            "model must be a mapping",
            ("model",),
            value=data,
            allowed="a mapping with at least `layers:`",
        )
        return None
    layers = layers_mapping(ck, data)
    request = layer_request(ck, layers, LAYERS_PATH) if layers is not None else None
    if layers is not None and request is not None:
        request = check_requested(ck, layers, request)
    scalars = model_fields(ck, data, request)
    bindings = symbol_bindings(ck, layers, request) if layers is not None else None
    overrides = layer_overrides(ck, layers, request) if layers is not None else None
    if request is None or scalars is None or bindings is None or overrides is None:
        return None
    return realize_model(ck, scalars, request, bindings, overrides)


def layers_mapping(ck: Checker, model: dict[Any, Any]) -> dict[Any, Any] | None:
    """``model.layers`` if it is a mapping (its unknown keys reported), else None."""
    layers = model.get("layers")
    if isinstance(layers, dict):
        ck.unknown_keys(layers, LAYERS_KEYS, LAYERS_PATH)
        return layers
    if layers is None:
        ck.add(
            "missing required key 'layers'",
            LAYERS_PATH,
            allowed=f"a mapping with {FORMS_HELP}, plus optional symbols and overrides",
        )
    else:
        ck.add(
            "layers must be a mapping",
            LAYERS_PATH,
            value=layers,
            allowed=f"a mapping with {FORMS_HELP}",
        )
    return None


def model_fields(ck: Checker, data: dict[Any, Any], request: Request | None) -> ModelSpec | None:
    """Validate the model's own fields; the layers are a placeholder with the realized
    pattern, so ``context(i)`` of the result is already right."""
    placeholder = LayersSpec(pattern=request.pattern if request else "", symbols={})
    fields = {k: v for k, v in data.items() if k != "layers"}
    classifier_rule(ck, fields)
    return ck.pydantic(ModelSpec, {**fields, "layers": placeholder}, ("model",))


def classifier_rule(ck: Checker, fields: dict[Any, Any]) -> None:
    """A ``classifier:`` head goes with arch classifier, and only with it."""
    arch = fields.get("arch", ModelSpec.model_fields["arch"].default)
    has_head = fields.get("classifier") is not None
    if arch == "classifier" and not has_head:
        ck.add(
            "arch classifier needs a `classifier:` head",
            ("model", "classifier"),
            allowed="classifier: {n_classes: N} (N >= 2)",
            at=("model", "arch"),
        )
    elif arch != "classifier" and has_head and isinstance(arch, str):
        ck.add(
            f"`classifier:` is only used by arch classifier, not {arch}",
            ("model", "classifier"),
            allowed="remove it, or set arch: classifier",
        )
