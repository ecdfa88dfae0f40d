"""JSON schema of a spec *file*, for editor completion (``mixstack schema``).

The schema describes what a person writes, not the validated :class:`Spec`: the
layers may be asked for as ``pattern``, ``layer_types`` or ``n_layers`` + ``ratios``
+ ``fill``, ``base:`` may name other files, and every layer binding is a union over
every registered config class, discriminated on ``type`` (plugins registered before
the call are included); so is ``train.task``, over every registered task. Composite
children (``layers: [...]`` inside ``sequential`` / ``parallel``) use the layer union.
Cross-field rules (exclusive forms, ``check`` hooks, capabilities) are beyond JSON
schema; ``mixstack validate`` reports them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, create_model

from mixstack.dsl import registry
from mixstack.dsl.base import LayerConfig
from mixstack.dsl.spec import (
    SCHEMA_VERSION,
    LayersRequest,
    ModelSpec,
    OverrideSpec,
    RunSpec,
    TaskConfig,
    TrainSpec,
)

_FILE_CONFIG = ConfigDict(extra="forbid")


def _tagged_union(classes: list[Any], base: Any) -> Any:
    """The classes as one union discriminated on ``type`` (``base`` when there are none)."""
    if not classes:
        return base
    if len(classes) == 1:
        return classes[0]
    return Annotated[Union[tuple(classes)], Field(discriminator="type")]  # noqa: UP007


def _layer_union() -> Any:
    return _tagged_union([entry.config_cls for entry in registry.entries()], LayerConfig)


def _train_file_model() -> type[BaseModel]:
    """The train section, its task a union over every registered task config."""
    task = _tagged_union([entry.config_cls for entry in registry.tasks.all()], TaskConfig)
    fields: dict[str, Any] = {
        name: (info.annotation, info) for name, info in TrainSpec.model_fields.items()
    }
    fields["task"] = (task, Field(..., description="what to learn: {type: TASK, ...}"))
    return create_model("TrainFile", __config__=_FILE_CONFIG, __doc__=TrainSpec.__doc__, **fields)


def _layers_file_model(layer: Any) -> type[BaseModel]:
    return create_model(
        "LayersFile",
        __config__=_FILE_CONFIG,
        __doc__="How the stack is asked for: exactly one of pattern, layer_types, or "
        "n_layers + ratios + fill; plus symbol bindings and per-layer overrides.",
        pattern=(str | None, Field(None, description="literal pattern, e.g. '(M-M*)2 | N-'")),
        layer_types=(list[str] | None, Field(None, description="one symbol per layer")),
        n_layers=(int | None, Field(None, ge=1, description="layers, with ratios and fill")),
        ratios=(
            dict[str, float] | None,
            Field(None, description="symbol -> fraction, allocated in order (Megatron)"),
        ),
        fill=(str | None, Field(None, description="symbol of the layers left over")),
        symbols=(dict[str, layer] | None, Field(None, description="symbol -> layer config")),
        overrides=(list[OverrideSpec] | None, Field(None, description="per-layer changes")),
        requested=(LayersRequest | None, Field(None, description="written by dump()")),
    )


def _model_file_model(layers: type[BaseModel]) -> type[BaseModel]:
    fields: dict[str, Any] = {
        name: (info.annotation, info)
        for name, info in ModelSpec.model_fields.items()
        if name != "layers"
    }
    fields["layers"] = (layers, Field(..., description="the stack of residual sub-layers"))
    return create_model("ModelFile", __config__=_FILE_CONFIG, __doc__=ModelSpec.__doc__, **fields)


def spec_file_model() -> type[BaseModel]:
    """A Pydantic model of a spec file, built from the registry as it is now."""
    layers = _layers_file_model(_layer_union())
    return create_model(
        "SpecFile",
        __config__=_FILE_CONFIG,
        __doc__="A mixstack spec file: model (the architecture) plus optional train and run.",
        base=(
            str | list[str] | None,
            Field(None, description="specs to start from: relative paths or zoo:NAME"),
        ),
        schema_version=(
            Literal[SCHEMA_VERSION] | None,  # type: ignore[valid-type]
            Field(None, description="written by dump()"),
        ),
        model=(_model_file_model(layers), Field(...)),
        train=(_train_file_model() | None, Field(None, description="what a run does")),
        run=(RunSpec | None, Field(None, description="how a run executes")),
    )


def _point_children_at_union(schema: dict[str, Any], union_ref: dict[str, Any]) -> None:
    """Composite configs annotate children as the ``LayerConfig`` base; make them the
    discriminated union of every registered type instead."""
    defs = schema.get("$defs", {})
    if "LayerConfig" in defs:
        defs["LayerConfig"] = union_ref


def spec_json_schema() -> dict[str, Any]:
    """JSON schema (draft 2020-12) of a spec file."""
    model = spec_file_model()
    schema = TypeAdapter(model).json_schema(mode="validation")
    union_schema = TypeAdapter(_layer_union()).json_schema(
        mode="validation", ref_template="#/$defs/{model}"
    )
    union_schema.pop("$defs", None)
    _point_children_at_union(schema, union_schema)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "mixstack spec"
    return schema
