"""Stage two of loading: merged plain data -> an immutable :class:`Spec`.

Every problem is collected as a :class:`SpecIssue` (origin from the provenance map,
full YAML path, the bad value, what is allowed, a "did you mean" for near misses)
and raised together as one :class:`SpecError`. Validation runs in layers:

1. the top level (``model``, ``train``, ``run``, ``schema_version``);
2. the model's own fields, with Pydantic, its errors translated to issues;
3. how the layers are asked for (``pattern`` | ``layer_types`` | ``n_layers`` +
   ``ratios`` + ``fill``), realized to a literal pattern;
4. symbol bindings, two-stage: read ``type``, look it up in the registry, validate
   with that config class (children of composites first, so their errors carry
   their own paths); then per-layer ``overrides`` (``at`` selectors and ``set``);
5. per realized layer, with the model context: ``resolve`` (fills context defaults;
   the resolved config is what the spec stores), ``check`` (cross-field rules) and
   the capability check (a ``causal_lm`` refuses non-causal layers, pointing at the
   binding's line). Stage 5 runs only when 2-4 found the inputs it needs valid, so
   an error is never reported as a consequence of another.

Overrides are merged on top of the *resolved* symbol configs, exactly as
:func:`mixstack.dsl.layers.realize_layer_configs` does when a spec is read back, so
the per-layer configs computed here are the ones ``ModelSpec.layer_configs()`` gives.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from mixstack.dsl import registry
from mixstack.dsl.base import Capabilities, LayerConfig
from mixstack.dsl.context import LayerContext
from mixstack.dsl.errors import (
    IssueCollector,
    Path,
    SpecError,
    SpecIssue,
    did_you_mean,
    format_path,
)
from mixstack.dsl.layers import deep_merge, select_indices
from mixstack.dsl.pattern import GRAMMAR_HELP, PatternError, realize_pattern, symbol_problem
from mixstack.dsl.provenance import Provenance
from mixstack.dsl.ratios import RatioError, allocate
from mixstack.dsl.spec import (
    LOGGER_TYPES,
    OPTIMIZER_TYPES,
    SCHEMA_VERSION,
    STAGE_MARK,
    AdamWConfig,
    CSVLoggerConfig,
    LayersRequest,
    LayersSpec,
    ModelSpec,
    OverrideSpec,
    RunSpec,
    Spec,
    TaskConfig,
    TrainSpec,
)

log = logging.getLogger(__name__)

TOP_KEYS = ("model", "train", "run", "base", "schema_version")
LAYERS_PATH: Path = ("model", "layers")
# The three exclusive ways to ask for layers, and the keys each uses.
LAYER_FORMS: dict[str, tuple[str, ...]] = {
    "pattern": ("pattern",),
    "layer_types": ("layer_types",),
    "ratios": ("n_layers", "ratios", "fill"),
}
LAYERS_KEYS = (
    "pattern",
    "layer_types",
    "n_layers",
    "ratios",
    "fill",
    "symbols",
    "overrides",
    "requested",
)
FORMS_HELP = "pattern: 'M-M*', or layer_types: [M, '-'], or n_layers + ratios + fill"
_NOT_GIVEN = object()


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


def _keys_text(keys: Any) -> str:
    return ", ".join(str(k) for k in keys)


# -- Pydantic errors -> issues -------------------------------------------------------------


def _annotation_args(ann: Any) -> tuple[Any, ...]:
    origin = get_origin(ann)
    if origin is Annotated:
        return (get_args(ann)[0],)
    if origin is Union or type(ann).__name__ == "UnionType":
        return tuple(a for a in get_args(ann) if a is not type(None))
    return ()


def _as_model(ann: Any) -> type[BaseModel] | None:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in _annotation_args(ann):
        found = _as_model(arg)
        if found is not None:
            return found
    return None


def _step_annotation(ann: Any, part: Any) -> Any:
    """Annotation of ``part`` inside a value annotated ``ann`` (None if unknown)."""
    model = _as_model(ann)
    if model is not None and isinstance(part, str) and part in model.model_fields:
        return model.model_fields[part].annotation
    origin = get_origin(ann)
    args = get_args(ann)
    if origin in (list, tuple, set, frozenset) and args:
        return args[0]
    if origin is dict and len(args) == 2:
        return args[1]
    for arg in _annotation_args(ann):
        found = _step_annotation(arg, part)
        if found is not None:
            return found
    return None


def _field_at(cls: type[BaseModel], rel: Path) -> FieldInfo | None:
    ann: Any = cls
    for part in rel[:-1]:
        ann = _step_annotation(ann, part)
        if ann is None:
            return None
    model = _as_model(ann)
    if model is None or not rel or not isinstance(rel[-1], str):
        return None
    return model.model_fields.get(rel[-1])


def _model_at(cls: type[BaseModel], rel: Path) -> type[BaseModel] | None:
    ann: Any = cls
    for part in rel:
        ann = _step_annotation(ann, part)
        if ann is None:
            return None
    return _as_model(ann)


def _data_path(loc: tuple[Any, ...], data: Any, err_type: str) -> Path:
    """Pydantic's ``loc`` -> the path inside ``data``, dropping union member tags
    (``('dt_rank', 'int')``) and dict-key markers that are not keys of the data."""
    path: list[Any] = []
    node = data
    for i, part in enumerate(loc):
        in_dict = isinstance(node, dict) and part in node
        in_list = isinstance(node, (list, tuple)) and isinstance(part, int)
        if in_dict or (in_list and 0 <= part < len(node)):
            node = node[part]
            path.append(part)
        elif (
            i == len(loc) - 1
            and err_type in ("missing", "extra_forbidden")
            and isinstance(node, dict)
        ):
            path.append(part)
    return tuple(path)


def _bounds(field: FieldInfo | None) -> str | None:
    if field is None:
        return None
    parts = []
    for meta in field.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            bound = getattr(meta, attr, None)
            if bound is not None:
                parts.append(f"{sign} {bound}")
    return " and ".join(parts) or None


_KIND_TEXT = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "string": "a string",
    "str": "a string",
    "dict": "a mapping",
    "model": "a mapping",
    "list": "a list",
    "tuple": "a list",
    "none": "null",
}


def _allowed(err: dict[str, Any], field: FieldInfo | None) -> tuple[str | None, str | None]:
    """(allowed text, suggestion) for one Pydantic error."""
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "literal_error":
        options = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        value = err.get("input")
        hint = did_you_mean(value, options) if isinstance(value, str) else None
        return "one of " + ", ".join(repr(o) for o in options), hint
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        return _bounds(field) or err["msg"].replace("Input should be ", ""), None
    if kind in ("too_short", "too_long"):
        return err["msg"].replace("List should have ", "").replace("Input should have ", ""), None
    head = kind.split("_", 1)[0]
    if head in _KIND_TEXT:
        text = _KIND_TEXT[head]
        return (f"{text} {_bounds(field)}" if _bounds(field) else text), None
    return None, None


def _plain_message(err: dict[str, Any]) -> str:
    msg = str(err["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    return msg


def pydantic_issues(
    exc: ValidationError,
    base: Path,
    data: Any,
    cls: type[BaseModel],
    origin_of: Callable[[Path], str | None],
) -> list[SpecIssue]:
    """Translate a Pydantic error into issues: one per YAML path, union members merged."""
    grouped: dict[Path, list[dict[str, Any]]] = {}
    for err in exc.errors(include_url=False):
        grouped.setdefault(_data_path(err["loc"], data, err["type"]), []).append(err)
    issues = []
    for rel, errs in grouped.items():
        issues.append(_issue_for(rel, errs, base, cls, origin_of))
    return issues


def _issue_for(
    rel: Path,
    errs: list[dict[str, Any]],
    base: Path,
    cls: type[BaseModel],
    origin_of: Callable[[Path], str | None],
) -> SpecIssue:
    path = (*base, *rel)
    origin = origin_of(path)
    kinds = [e["type"] for e in errs]
    key = rel[-1] if rel else None
    if "extra_forbidden" in kinds:
        model = _model_at(cls, rel[:-1])
        keys = list(model.model_fields) if model is not None else []
        return SpecIssue(
            f"unknown key {key!r}",
            path=path,
            origin=origin,
            allowed=f"valid keys: {_keys_text(keys)}" if keys else None,
            suggestion=did_you_mean(str(key), keys) if keys else None,
        )
    field = _field_at(cls, rel)
    if "missing" in kinds:
        desc = f" ({field.description})" if field is not None and field.description else ""
        return SpecIssue(f"missing required key {key!r}{desc}", path=path, origin=origin)
    if "invalid_key" in kinds:
        return SpecIssue(
            "mapping keys must be strings",
            path=path,
            origin=origin,
            value=errs[0].get("input"),
            has_value=True,
            allowed="string keys",
        )
    return _value_issue(path, origin, errs, field)


def _value_issue(
    path: Path, origin: str | None, errs: list[dict[str, Any]], field: FieldInfo | None
) -> SpecIssue:
    """A bad value: Pydantic's message(s), the value got, and what the field allows."""
    allowed, hints = [], []
    for err in errs:
        text, hint = _allowed(err, field)
        if text and text not in allowed:
            allowed.append(text)
        if hint:
            hints.append(hint)
    messages = list(dict.fromkeys(_plain_message(e) for e in errs))
    return SpecIssue(
        messages[0] if len(messages) == 1 else "invalid value: " + " or ".join(messages),
        path=path,
        origin=origin,
        value=errs[0].get("input"),
        has_value=True,
        allowed=" or ".join(allowed) or None,
        suggestion=hints[0] if hints else None,
    )


# -- the validator -----------------------------------------------------------------------


@dataclass
class _Binding:
    """A symbol's validated (not yet resolved) config and where its errors point."""

    symbol: str
    config: LayerConfig | None
    path: Path


@dataclass
class _Request:
    """How the layers were asked for, realized."""

    pattern: str
    requested: LayersRequest
    path: Path  # where pattern-level errors point


class _Validator:
    def __init__(self, prov: Provenance, issues: IssueCollector):
        self.prov = prov
        self.issues = issues

    # -- helpers -----------------------------------------------------------------------
    def origin(self, path: Path) -> str | None:
        return self.prov.origin(path)

    def add(
        self,
        message: str,
        path: Path,
        value: Any = _NOT_GIVEN,
        allowed: str | None = None,
        suggestion: str | None = None,
        at: Path | None = None,
    ) -> None:
        """Record an issue at ``path``; its origin is that of ``at`` when given (a missing
        key is best reported on the line of the value that requires it)."""
        self.issues.extend(
            [
                SpecIssue(
                    message,
                    path=tuple(path),
                    origin=self.origin(path if at is None else at),
                    value=None if value is _NOT_GIVEN else value,
                    has_value=value is not _NOT_GIVEN,
                    allowed=allowed,
                    suggestion=suggestion,
                )
            ]
        )

    def unknown_keys(self, data: dict[Any, Any], valid: tuple[str, ...], path: Path) -> None:
        for key in data:
            if key not in valid:
                self.add(
                    f"unknown key {key!r}",
                    (*path, key),
                    allowed=f"valid keys: {_keys_text(valid)}",
                    suggestion=did_you_mean(str(key), valid),
                )

    def pydantic(self, cls: type[BaseModel], data: Any, path: Path) -> Any:
        """``cls.model_validate(data)``, or None with its errors recorded."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            self.issues.extend(pydantic_issues(exc, path, data, cls, self.origin))
        except (TypeError, ValueError, KeyError, ArithmeticError) as exc:
            self.add(f"{cls.__name__} rejected the value: {type(exc).__name__}: {exc}", path)
        return None

    def hook(
        self, fn: Callable[[LayerContext], Any], ctx: LayerContext, path: Path, what: str
    ) -> Any:
        """Call a config hook; a crash on user values becomes an issue, not a traceback."""
        try:
            return fn(ctx)
        except SpecError as exc:  # issues relative to the layer: anchor them here
            for issue in exc.issues:
                self.add(
                    issue.message,
                    (*path, *issue.path),
                    allowed=issue.allowed,
                    suggestion=issue.suggestion,
                    **({"value": issue.value} if issue.has_value else {}),
                )
            return None
        except Exception as exc:  # a hook failing on user input must still name the line
            log.debug("%s failed at %s", what, format_path(path), exc_info=True)
            self.add(f"{what} failed: {type(exc).__name__}: {exc}", path)
            return None

    # -- top level ---------------------------------------------------------------------
    def spec(self, data: dict[Any, Any]) -> Spec | None:
        self.unknown_keys(data, TOP_KEYS, ())
        if "schema_version" in data:
            version = data["schema_version"]
            if type(version) is not int or version != SCHEMA_VERSION:
                self.add(
                    "unsupported schema_version",
                    ("schema_version",),
                    value=version,
                    allowed=f"{SCHEMA_VERSION} (written by this mixstack)",
                )
        train = self.train(data.get("train"))
        run = self.run(data.get("run"))
        if "model" not in data:
            self.add(
                "missing required section `model`",
                ("model",),
                allowed="a `model:` mapping with at least `layers:`",
            )
            return None
        model = self.model(data["model"])
        if model is not None and train is not None:
            train = self.train_against(train, model)
        if model is not None and run is not None:
            self.run_against(run, model)
        if model is None or run is None or self.issues:
            return None
        return self.assemble(Spec, {"model": model, "train": train, "run": run}, ())

    def assemble(self, cls: type[BaseModel], fields: dict[str, Any], path: Path) -> Any:
        """Build a validated model from already-validated parts."""
        return self.pydantic(cls, fields, path)

    def tagged(
        self, data: Any, path: Path, classes: dict[str, type[BaseModel]], default: str | None
    ) -> Any:
        """Two-stage validation of a ``type``-tagged config: the tag first (unknown ones
        listed, with a near-miss suggestion), then that class's fields."""
        kinds = _keys_text(classes)
        if data is None and default is not None:
            return classes[default]()
        if not isinstance(data, dict):
            self.add(
                f"{format_path(path)} must be a mapping with a `type`",
                path,
                value=data,
                allowed=f"{{type: NAME, ...}} with NAME one of {kinds}",
            )
            return None
        kind = data.get("type", default)
        if kind is None:
            self.add("missing `type`", path, allowed=f"one of {kinds}")
            return None
        if not isinstance(kind, str) or kind not in classes:
            self.add(
                f"unknown {path[-1]} type {kind!r}",
                (*path, "type"),
                value=kind,
                allowed=f"one of {kinds}",
                suggestion=did_you_mean(kind, classes) if isinstance(kind, str) else None,
            )
            return None
        return self.pydantic(classes[kind], data, path)

    # -- train and run ---------------------------------------------------------------------
    def train(self, data: Any) -> TrainSpec | None:
        """The train section's own fields (its checks against the model come later)."""
        path = ("train",)
        if data is None:
            return None
        if not isinstance(data, dict):
            self.add("train must be a mapping", path, value=data, allowed="a mapping")
            return None
        task = None
        task_types = registry.task_configs()  # the registered tasks (mixstack/tasks/, plugins)
        if "task" in data:
            task = self.tagged(data["task"], (*path, "task"), task_types, None)
        else:
            self.add(
                "missing required key 'task'",
                (*path, "task"),
                allowed=f"task: {{type: NAME, ...}} with NAME one of {_keys_text(task_types)}",
                at=path,
            )
        optimizer = self.tagged(
            data.get("optimizer"), (*path, "optimizer"), OPTIMIZER_TYPES, "adamw"
        )
        length = data.get("max_steps") is not None or data.get("max_epochs") is not None
        if not length:
            self.add(
                "train needs max_steps or max_epochs (how long to train)",
                (*path, "max_steps"),
                allowed="max_steps: N (optimizer steps) or max_epochs: N",
                at=path,
            )
        # Failed parts get a stand-in so the other fields are still checked.
        fields = {
            **data,
            "task": task or TaskConfig(type="?"),
            "optimizer": optimizer or AdamWConfig(),
        }
        train = self.pydantic(TrainSpec, fields if length else {**fields, "max_steps": 1}, path)
        return train if task is not None and optimizer is not None and length else None

    def train_against(self, train: TrainSpec, model: ModelSpec) -> TrainSpec | None:
        """Fill model-dependent defaults and check the task against the model."""
        resolved = train.resolve(model)
        problems = resolved.check(model)
        for rel, message, allowed in problems:
            self.add(message, ("train", *rel), allowed=allowed)
        return None if problems else resolved

    def run(self, data: Any) -> RunSpec | None:
        path = ("run",)
        if data is None:
            return RunSpec()
        if not isinstance(data, dict):
            self.add("run must be a mapping", path, value=data, allowed="a mapping")
            return None
        backend = data.get("backend", "auto")
        if not (
            isinstance(backend, str)
            or (
                isinstance(backend, dict)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in backend.items())
            )
        ):
            self.add(
                "invalid backend",
                (*path, "backend"),
                value=backend,
                allowed="auto, a provider name, or a {kernel: provider} mapping of strings",
            )
            return None
        logger = self.tagged(data.get("logger"), (*path, "logger"), LOGGER_TYPES, "csv")
        run = self.pydantic(RunSpec, {**data, "logger": logger or CSVLoggerConfig()}, path)
        return run if logger is not None else None

    def run_against(self, run: RunSpec, model: ModelSpec) -> None:
        """Activation-checkpointing selectors must name layers of the model."""
        selectors = run.activation_checkpointing
        if isinstance(selectors, list):
            self.selectors(selectors, ("run", "activation_checkpointing"), model.n_layers)

    # -- the model ---------------------------------------------------------------------
    def model(self, data: Any) -> ModelSpec | None:
        if not isinstance(data, dict):
            self.add(
                "model must be a mapping",
                ("model",),
                value=data,
                allowed="a mapping with at least `layers:`",
            )
            return None
        layers = self.layers_mapping(data)
        request = self.request(layers, LAYERS_PATH) if layers is not None else None
        if layers is not None and request is not None:
            request = self.check_requested(layers, request)
        scalars = self.model_fields(data, request)
        bindings = self.bindings(layers, request) if layers is not None else None
        overrides = self.overrides(layers, request) if layers is not None else None
        if request is None or scalars is None or bindings is None or overrides is None:
            return None
        return self.realize(scalars, request, bindings, overrides)

    def layers_mapping(self, model: dict[Any, Any]) -> dict[Any, Any] | None:
        """``model.layers`` if it is a mapping (its unknown keys reported), else None."""
        layers = model.get("layers")
        if isinstance(layers, dict):
            self.unknown_keys(layers, LAYERS_KEYS, LAYERS_PATH)
            return layers
        if layers is None:
            self.add(
                "missing required key 'layers'",
                LAYERS_PATH,
                allowed=f"a mapping with {FORMS_HELP}, plus optional symbols and overrides",
            )
        else:
            self.add(
                "layers must be a mapping",
                LAYERS_PATH,
                value=layers,
                allowed=f"a mapping with {FORMS_HELP}",
            )
        return None

    def model_fields(self, data: dict[Any, Any], request: _Request | None) -> ModelSpec | None:
        """Validate the model's own fields; the layers are a placeholder with the realized
        pattern, so ``context(i)`` of the result is already right."""
        placeholder = LayersSpec(pattern=request.pattern if request else "", symbols={})
        fields = {k: v for k, v in data.items() if k != "layers"}
        self.classifier_rule(fields)
        return self.pydantic(ModelSpec, {**fields, "layers": placeholder}, ("model",))

    def classifier_rule(self, fields: dict[Any, Any]) -> None:
        arch = fields.get("arch", ModelSpec.model_fields["arch"].default)
        has_head = fields.get("classifier") is not None
        if arch == "classifier" and not has_head:
            self.add(
                "arch classifier needs a `classifier:` head",
                ("model", "classifier"),
                allowed="classifier: {n_classes: N} (N >= 2)",
                at=("model", "arch"),
            )
        elif arch != "classifier" and has_head and isinstance(arch, str):
            self.add(
                f"`classifier:` is only used by arch classifier, not {arch}",
                ("model", "classifier"),
                allowed="remove it, or set arch: classifier",
            )

    # -- layers: how they are asked for --------------------------------------------------
    def request(self, layers: dict[Any, Any], path: Path) -> _Request | None:
        conflict = form_conflict(layers, self.origin, path)
        forms = layer_forms(layers)
        if conflict is not None:
            self.issues.extend([conflict])
            return None
        if not forms:
            self.add(
                f"{format_path(path)} does not say which layers to stack",
                path,
                allowed=FORMS_HELP,
            )
            return None
        if forms[0] == "pattern":
            return self.request_pattern(layers["pattern"], (*path, "pattern"))
        if forms[0] == "layer_types":
            return self.request_layer_types(layers["layer_types"], (*path, "layer_types"))
        return self.request_ratios(layers, path)

    def request_pattern(self, text: Any, path: Path) -> _Request | None:
        if not isinstance(text, str):
            self.add("pattern must be a string", path, value=text, allowed=GRAMMAR_HELP)
            return None
        try:
            realized = realize_pattern(text)
        except PatternError as exc:
            self.add(
                f"invalid pattern: {exc.message} at column {exc.column} of {text!r}",
                path,
                value=text,
                allowed=GRAMMAR_HELP,
            )
            return None
        return _Request(realized, LayersRequest(pattern=text), path)

    def request_layer_types(self, items: Any, path: Path) -> _Request | None:
        if not isinstance(items, list) or not items:
            self.add(
                "layer_types must be a non-empty list of symbols",
                path,
                value=items,
                allowed="a list like [M, '-', M, '*'], one symbol character per layer",
            )
            return None
        ok = True
        for i, item in enumerate(items):
            problem = symbol_problem(item) if isinstance(item, str) else "not a string"
            if problem is not None:
                self.add(
                    f"layer_types entry is not a symbol: {problem}",
                    (*path, i),
                    value=item,
                    allowed="one symbol character (not a digit, space or ()|.[]${}:/)",
                )
                ok = False
        if not ok:
            return None
        return _Request("".join(items), LayersRequest(layer_types=list(items)), path)

    def request_ratios(self, layers: dict[Any, Any], path: Path) -> _Request | None:
        missing = [k for k in LAYER_FORMS["ratios"] if layers.get(k) is None]
        if missing:
            self.add(
                f"ratio form needs {', '.join(missing)}",
                path,
                allowed="n_layers: 56, ratios: {'*': 0.08, '-': 0.5}, fill: M",
            )
            return None
        n_layers, ratios, fill = layers["n_layers"], layers["ratios"], layers["fill"]
        if not isinstance(ratios, dict) or not ratios:
            self.add(
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
            self.add(exc.message, (*path, *rel), value=value, allowed=exc.allowed)
            return None
        requested = LayersRequest(n_layers=n_layers, ratios=dict(ratios), fill=fill)
        return _Request(realized, requested, (*path, "ratios"))

    def check_requested(self, layers: dict[Any, Any], request: _Request) -> _Request | None:
        """A dumped spec carries ``requested`` (how its pattern was asked for): keep it,
        after checking it still realizes to the pattern."""
        raw = layers.get("requested")
        if raw is None:
            return request
        path = (*LAYERS_PATH, "requested")
        given = self.pydantic(LayersRequest, raw, path)
        if given is None:
            return None
        inner = self.request(given.model_dump(exclude_none=True), path)
        if inner is None:
            return None
        if inner.pattern != request.pattern:
            self.add(
                "layers.requested does not realize to layers.pattern",
                path,
                value=inner.pattern,
                allowed=f"a request giving {request.pattern!r} "
                "(or drop `requested`: dump() writes it as provenance)",
            )
            return None
        return _Request(request.pattern, given, request.path)

    # -- layers: bindings ----------------------------------------------------------------
    def bindings(
        self, layers: dict[Any, Any], request: _Request | None
    ) -> dict[str, _Binding] | None:
        path = (*LAYERS_PATH, "symbols")
        symbols = layers.get("symbols")
        symbols = {} if symbols is None else symbols
        if not isinstance(symbols, dict):
            self.add(
                "symbols must be a mapping of symbol -> layer config",
                path,
                value=symbols,
                allowed="{M: {type: mamba2}, '*': {type: attention}}",
            )
            return None
        out: dict[str, _Binding] = {}
        for symbol, binding in symbols.items():
            problem = symbol_problem(symbol) if isinstance(symbol, str) else "not a string"
            if problem is not None:
                self.add(
                    f"invalid symbol key: {problem}",
                    (*path, symbol),
                    value=symbol,
                    allowed="one character that is not a digit, space or ()|.[]${}:/",
                )
                continue
            out[symbol] = _Binding(symbol, self.layer(binding, (*path, symbol)), (*path, symbol))
        if request is None:
            return out
        self.default_bindings(out, request, path)
        used = [s for s in dict.fromkeys(request.pattern) if s != STAGE_MARK]
        if any(s not in out or out[s].config is None for s in used):
            return None
        return {s: out[s] for s in used}

    def default_bindings(self, out: dict[str, _Binding], request: _Request, path: Path) -> None:
        defaults = registry.default_bindings()
        for symbol in dict.fromkeys(request.pattern):
            if symbol == STAGE_MARK or symbol in out:
                continue
            if symbol not in defaults:
                self.add(
                    f"symbol {symbol!r} is used by the layers but not bound",
                    request.path,
                    allowed=f"bind it under model.layers.symbols "
                    f"(bound: {_keys_text(out) or 'none'}; defaults: "
                    f"{_keys_text(defaults) or 'none'})",
                )
                continue
            where = (*path, symbol)
            self.prov.entries.setdefault(where, self.origin(request.path))
            default = defaults[symbol]
            if not registry.has(default.get("type", "")):
                self.add(
                    f"symbol {symbol!r} is not bound and its default type "
                    f"{default.get('type')!r} is not registered",
                    request.path,
                    allowed=f"bind it under model.layers.symbols; registered types: "
                    f"{_keys_text(registry.names())}",
                )
                continue
            out[symbol] = _Binding(symbol, self.layer(default, where), where)

    def layer(self, data: Any, path: Path) -> LayerConfig | None:
        """Two-stage validation of one layer config: ``type`` -> registry -> its class."""
        if isinstance(data, LayerConfig):
            return data
        if not isinstance(data, dict):
            self.add(
                "a layer config must be a mapping with a `type`",
                path,
                value=data,
                allowed="{type: NAME, ...}; registered types: " + _keys_text(registry.names()),
            )
            return None
        kind = data.get("type", _NOT_GIVEN)
        names = registry.names()
        if kind is _NOT_GIVEN or not isinstance(kind, str) or not registry.has(kind):
            got = "missing `type`" if kind is _NOT_GIVEN else f"unknown layer type {kind!r}"
            self.add(
                got,
                (*path, "type") if kind is not _NOT_GIVEN else path,
                **({} if kind is _NOT_GIVEN else {"value": kind}),
                allowed=f"registered types: {_keys_text(names)}",
                suggestion=did_you_mean(kind, names) if isinstance(kind, str) else None,
            )
            return None
        cls = registry.get(kind).config_cls
        values = self.children(cls, data, path)
        if values is None:
            return None
        return self.pydantic(cls, values, path)

    def children(
        self, cls: type[LayerConfig], data: dict[Any, Any], path: Path
    ) -> dict[Any, Any] | None:
        """Validate nested layer configs first, so their errors carry their own paths."""
        values = dict(data)
        ok = True
        for name in cls.child_fields:
            child = values.get(name)
            if isinstance(child, list):
                configs = [self.layer(c, (*path, name, i)) for i, c in enumerate(child)]
                ok = ok and all(c is not None for c in configs)
                values[name] = configs
            elif isinstance(child, dict):
                config = self.layer(child, (*path, name))
                ok = ok and config is not None
                values[name] = config
        return values if ok else None

    # -- layers: per-layer overrides ------------------------------------------------------
    def overrides(
        self, layers: dict[Any, Any], request: _Request | None
    ) -> list[tuple[OverrideSpec, list[int]]] | None:
        path = (*LAYERS_PATH, "overrides")
        items = layers.get("overrides")
        if items is None:
            return []
        if not isinstance(items, list):
            self.add(
                "overrides must be a list",
                path,
                value=items,
                allowed="[{at: [3], set: {window: 128}}, ...]",
            )
            return None
        n = sum(1 for c in request.pattern if c != STAGE_MARK) if request else None
        out = [self.override(item, (*path, k), n) for k, item in enumerate(items)]
        return None if any(o is None for o in out) else out  # type: ignore[return-value]

    def override(
        self, item: Any, path: Path, n: int | None
    ) -> tuple[OverrideSpec, list[int]] | None:
        if not isinstance(item, dict):
            self.add(
                "an override must be a mapping with `at` and `set`",
                path,
                value=item,
                allowed="{at: [3, '8:16:2'], set: {window: 128}}",
            )
            return None
        self.unknown_keys(item, ("at", "set"), path)
        at, changes = item.get("at"), item.get("set")
        ok = set(item) <= {"at", "set"}
        if not isinstance(at, list) or not at:
            self.add(
                "`at` must be a non-empty list of layer selectors",
                (*path, "at"),
                value=at,
                allowed="ints (negative allowed) or 'a:b:c' slices, like [3, -1]",
            )
            ok = False
        if not isinstance(changes, dict) or not all(isinstance(k, str) for k in changes):
            self.add(
                "`set` must be a mapping of field -> value",
                (*path, "set"),
                value=changes,
                allowed="{window: 128}",
            )
            ok = False
        indices = self.selectors(at, (*path, "at"), n) if ok else None
        if indices is None:
            return None
        spec = self.pydantic(OverrideSpec, {"at": at, "set": changes}, path)
        return (spec, indices) if spec is not None else None

    def selectors(self, at: list[Any], path: Path, n: int | None) -> list[int] | None:
        """Sorted layer indices named by ``at`` (none checked while ``n`` is unknown)."""
        indices: set[int] = set()
        ok = True
        for j, selector in enumerate(at):
            if isinstance(selector, bool) or not isinstance(selector, (int, str)):
                self.add(
                    "invalid layer selector",
                    (*path, j),
                    value=selector,
                    allowed="an int (negative allowed) or an 'a:b:c' slice",
                )
                ok = False
            elif n is not None:
                try:
                    indices.update(select_indices(selector, n))
                except ValueError as exc:
                    self.add(
                        str(exc),
                        (*path, j),
                        value=selector,
                        allowed=f"indices {-n}..{n - 1} or 'a:b:c' slices",
                    )
                    ok = False
        return sorted(indices) if ok else None

    # -- per realized layer: resolve, check, capabilities -----------------------------------
    def realize(
        self,
        scalars: ModelSpec,
        request: _Request,
        bindings: dict[str, _Binding],
        overrides: list[tuple[OverrideSpec, list[int]]],
    ) -> ModelSpec | None:
        order = [c for c in request.pattern if c != STAGE_MARK]
        resolved: dict[str, LayerConfig] = {}
        for i, symbol in enumerate(order):
            if symbol not in resolved:
                b = bindings[symbol]
                cfg = self.resolved(b.config, scalars.context(i), b.path)
                if cfg is None:
                    return None
                resolved[symbol] = cfg
        dicts = [resolved[s].model_dump(mode="json") for s in order]
        where = [bindings[s].path for s in order]
        merged = self.merge_overrides(dicts, where, overrides)
        configs = self.layer_configs(scalars, order, dicts, where)
        if configs is None or not merged:
            return None
        layers = self.assemble(
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
        model = self.assemble(ModelSpec, {**fields, "layers": layers}, ("model",))
        if model is not None:
            object.__setattr__(model, "_layer_configs", tuple(configs))
        return model

    def resolved(
        self, cfg: LayerConfig | None, ctx: LayerContext, path: Path
    ) -> LayerConfig | None:
        if cfg is None:
            return None
        out = self.hook(cfg.resolve, ctx, path, f"resolving {cfg.type}")
        if out is not None and not isinstance(out, type(cfg)):
            self.add(
                f"{type(cfg).__name__}.resolve returned {type(out).__name__}, not a config "
                "of the same type (a bug in that layer type)",
                path,
            )
            return None
        return out

    def merge_overrides(
        self,
        dicts: list[dict[str, Any]],
        where: list[Path],
        overrides: list[tuple[OverrideSpec, list[int]]],
    ) -> bool:
        ok = True
        for k, (override, indices) in enumerate(overrides):
            set_path = (*LAYERS_PATH, "overrides", k, "set")
            for i in indices:
                new_type = override.set.get("type", dicts[i]["type"])
                if new_type != dicts[i]["type"]:
                    self.add(
                        f"an override cannot change a layer's type (layer {i} is "
                        f"{dicts[i]['type']!r})",
                        (*set_path, "type"),
                        value=new_type,
                        allowed="the same type; bind another symbol for another type",
                    )
                    ok = False
                    break  # one report per override; the layers keep their own config
                dicts[i] = deep_merge(dicts[i], override.set)
                where[i] = set_path
        return ok

    def layer_configs(
        self, scalars: ModelSpec, order: list[str], dicts: list[dict[str, Any]], where: list[Path]
    ) -> list[LayerConfig] | None:
        configs: list[LayerConfig] = []
        noncausal: dict[tuple[Path, str, str], list[int]] = {}
        for i, data in enumerate(dicts):
            ctx = scalars.context(i)
            cfg = self.resolved(self.layer(data, where[i]), ctx, where[i])
            if cfg is None:
                continue
            configs.append(cfg)
            self.check(cfg, ctx, where[i])
            if ctx.causal_arch:
                for path, culprit in self.noncausal(cfg, ctx, where[i]):
                    noncausal.setdefault((path, order[i], culprit.type), []).append(i)
        for (path, symbol, kind), indices in noncausal.items():
            self.causal_issue(path, symbol, kind, indices)
        return configs if len(configs) == len(dicts) else None

    def check(self, cfg: LayerConfig, ctx: LayerContext, path: Path) -> None:
        results = self.hook(cfg.check, ctx, path, f"checking {cfg.type}")
        for item in results or []:
            if not (isinstance(item, tuple) and len(item) == 2):
                self.add(
                    f"{type(cfg).__name__}.check returned {item!r}, not (path, message) "
                    "(a bug in that layer type)",
                    path,
                )
                continue
            rel, message = item
            rel = (rel,) if isinstance(rel, (str, int)) else tuple(rel)
            self.add(str(message), (*path, *rel))
        for rel, child in _children(cfg):
            self.check(child, ctx, (*path, *rel))

    def noncausal(
        self, cfg: LayerConfig, ctx: LayerContext, path: Path
    ) -> list[tuple[Path, LayerConfig]]:
        """The innermost non-causal configs inside ``cfg`` (itself if no child is)."""
        caps = self.hook(cfg.capabilities, ctx, path, f"capabilities of {cfg.type}")
        if not isinstance(caps, Capabilities) or caps.causal:
            return []
        found: list[tuple[Path, LayerConfig]] = []
        for rel, child in _children(cfg):
            found.extend(self.noncausal(child, ctx, (*path, *rel)))
        return found or [(path, cfg)]

    def causal_issue(self, path: Path, symbol: str, kind: str, indices: list[int]) -> None:
        """Point at the ``causal`` key when the layer type has one (its value is the
        culprit), else at the binding."""
        shown = ", ".join(map(str, indices[:12])) + (", ..." if len(indices) > 12 else "")
        has_flag = "causal" in registry.get(kind).config_cls.model_fields
        fix = (
            "set causal: true, or use arch: encoder"
            if has_flag
            else "a causal layer type, or arch: encoder"
        )
        self.add(
            f"arch causal_lm needs causal layers; {symbol!r} (type {kind}) at layers "
            f"[{shown}] is not causal",
            (*path, "causal") if has_flag else path,
            allowed=fix,
        )


def _children(cfg: LayerConfig) -> list[tuple[Path, LayerConfig]]:
    out: list[tuple[Path, LayerConfig]] = []
    for name in type(cfg).child_fields:
        value = getattr(cfg, name, None)
        if isinstance(value, (list, tuple)):
            out.extend(((name, i), c) for i, c in enumerate(value) if isinstance(c, LayerConfig))
        elif isinstance(value, LayerConfig):
            out.append(((name,), value))
    return out


_POSITION = re.compile(r"^(.*):(\d+):(\d+)$")


def _ordered(issues: list[SpecIssue]) -> list[SpecIssue]:
    """Duplicates dropped; issues with a file position sorted by file (in order of first
    appearance), line and column; the others (overrides, ``<dict>``) after them."""
    unique = list(dict.fromkeys(issues))
    files: dict[str, int] = {}
    keyed = []
    for n, issue in enumerate(unique):
        match = _POSITION.match(issue.origin or "")
        if match is None:
            keyed.append(((1, 0, 0, 0, n), issue))
            continue
        rank = files.setdefault(match.group(1), len(files))
        keyed.append(((0, rank, int(match.group(2)), int(match.group(3)), n), issue))
    return [issue for _, issue in sorted(keyed, key=lambda pair: pair[0])]


def validate_spec(data: dict[Any, Any], prov: Provenance, issues: IssueCollector) -> Spec:
    """Validate merged, interpolated plain data; raises one :class:`SpecError` with every
    issue (``issues`` may already hold problems found while merging)."""
    validator = _Validator(prov, issues)
    spec = validator.spec(data)
    if issues.issues or spec is None:
        raise SpecError(_ordered(issues.issues) or [SpecIssue("spec could not be validated")])
    return spec
