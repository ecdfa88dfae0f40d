"""``load_spec``: YAML -> merge -> overrides -> interpolation -> validation (DESIGN §3).

1. **YAML with positions.** Files are parsed with PyYAML's safe loader into plain
   data plus a provenance map (:mod:`mixstack.dsl.provenance`).
2. **Merge.** ``base:`` (a string or a list) names specs to start from: paths relative
   to the including file, or ``zoo:NAME``. Bases merge first, in order, then the
   including file on top; mappings merge deeply, lists and scalars are replaced.
   Cycles are refused with the chain. The three ways to ask for layers (``pattern``;
   ``layer_types``; ``n_layers`` + ``ratios`` + ``fill``) exclude each other: when a
   higher-priority source sets one, the others inherited from lower sources are
   dropped, so ``model.layers.pattern=MMMM`` works over a ratio-based base.
3. **Overrides.** ``key.path=value`` strings; the value is parsed as YAML and the path
   may index lists (``a.b.0.c`` or ``a.b[0].c``).
4. **Interpolation.** ``${model.d_model}``-style references to other values of the
   merged document (absolute references in OmegaConf's syntax; ``\\${`` escapes).
   Resolver calls such as ``${oc.env:HOME}`` are refused: an environment value must
   never end up in a pushed spec.
5. **Migration.** A document with an older ``schema_version`` is brought to the
   current one (:func:`mixstack.dsl.migrations.migrate`).
6. **Validation** (:mod:`mixstack.dsl.validate`): every problem of the document is
   collected and raised as one :class:`SpecError`.

Why not OmegaConf: merging, overrides and interpolation are done here on plain data,
each step moving the per-value provenance map along, and OmegaConf is not a
dependency. What it would do (deep merge, ``OmegaConf.update`` for list-indexed dotted
keys, ``${...}``) is a few dozen lines here, while it would take converting the data
to its node types and back at each step, and it differs where specs need it not to:
its nodes refuse YAML values such as dates (one located Pydantic error here), it
spells ``${flag}`` inside a string as ``True`` (YAML's ``true`` here), its errors name
no file position, and its resolver table is process-global with ``oc.env``
registered, so refusing resolvers would still need the scan done here, or clearing a
table that other code in the process (Hydra) relies on.
"""

from __future__ import annotations

import contextvars
import copy
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path as FilePath
from typing import Any

import yaml

from mixstack.dsl import annotations, hubref
from mixstack.dsl.errors import (
    IssueCollector,
    Path,
    SpecError,
    SpecIssue,
    did_you_mean,
    format_path,
)
from mixstack.dsl.migrations import migrate
from mixstack.dsl.provenance import Provenance, merge, read_yaml_file
from mixstack.dsl.spec import Spec
from mixstack.dsl.validate import LAYER_FORMS, form_conflict, layer_forms, validate_spec
from mixstack.dsl.validate.common import LAYERS_PATH

log = logging.getLogger(__name__)

ZOO_PREFIX = "zoo:"
DICT_ORIGIN = "<dict>"


# The Hub options of the load_spec call in progress and the hf:// sources it read
# (contextvars: `base:` resolution is deep in the recursion, and loads may nest).
_HUB_OPTIONS: contextvars.ContextVar[hubref.HubOptions | None] = contextvars.ContextVar(
    "mixstack_hub_options", default=None
)
_HUB_SOURCES: contextvars.ContextVar[list[dict[str, Any]] | None] = contextvars.ContextVar(
    "mixstack_hub_sources", default=None
)


def load_spec(
    source: str | os.PathLike[str] | Mapping[str, Any] | Spec,
    overrides: Iterable[str] = (),
    *,
    hub: hubref.HubOptions | None = None,
) -> Spec:
    """Load and validate a spec.

    ``source``: a YAML file path, ``"zoo:NAME"`` (a preset shipped in ``mixstack/zoo``),
    a mapping (origin ``<dict>``) or a :class:`Spec` (returned as is when there are no
    overrides). ``overrides``: ``"key.path=value"`` strings applied after merging.
    Raises :class:`SpecError` listing every problem found; nothing else for bad input.

    ``hf://org/name[@revision]`` (as the source or in ``base:``) reads that Hub model
    repository's ``spec.yaml`` at the commit its revision resolves to; ``hub`` gives the
    endpoint, token and cache for every such reference (:mod:`mixstack.dsl.hubref`).
    The returned spec remembers the authored ``model`` section and the Hub sources
    (:mod:`mixstack.dsl.annotations`).

    A ``Spec`` or a dumped spec is fully resolved: an override on it changes only the
    named value, and context defaults already filled in (``head_dim`` from ``d_model``)
    stay as they are. Override the source YAML to have them derived again.
    """
    override_list = [overrides] if isinstance(overrides, str) else list(overrides)
    if isinstance(source, Spec) and not override_list:
        return source
    options = hubref.default_options().merged(hub)
    options_token = _HUB_OPTIONS.set(options)
    sources: list[dict[str, Any]] = []
    sources_token = _HUB_SOURCES.set(sources)
    try:
        issues = IssueCollector()
        data, prov = _compose_source(source, issues)
        data, prov = apply_overrides(data, prov, override_list, issues)
        data, _ = migrate(interpolate(data, prov))
        authored = copy.deepcopy(data.get("model")) if isinstance(data, dict) else None
        spec = validate_spec(data, prov, issues)
    finally:
        _HUB_OPTIONS.reset(options_token)
        _HUB_SOURCES.reset(sources_token)
    if isinstance(source, Spec):
        sources = annotations.hub_sources(source) + sources
    annotations.attach(spec, hub_sources=sources)
    annotations.attach(spec.model, authored=authored, hub_sources=sources)
    log.debug("loaded spec %s (pattern %s)", spec.spec_hash[:12], spec.model.layers.pattern)
    return spec


def compose_spec(
    source: str | os.PathLike[str] | Mapping[str, Any] | Spec, overrides: Iterable[str] = ()
) -> tuple[dict[str, Any], Spec]:
    """``(authored document, spec)``: the document is what the user wrote with bases
    merged, overrides applied and references interpolated, before any default is
    filled in (``mixstack show``); the spec is what :func:`load_spec` returns for it."""
    override_list = [overrides] if isinstance(overrides, str) else list(overrides)
    if isinstance(source, Spec) and not override_list:
        return source.to_dict(), source
    issues = IssueCollector()
    data, prov = _compose_source(source, issues)
    data, prov = apply_overrides(data, prov, override_list, issues)
    data, _ = migrate(interpolate(data, prov))
    authored = copy.deepcopy(data)
    return authored, validate_spec(data, prov, issues)


# -- sources and `base:` composition ---------------------------------------------------


def zoo_dir() -> FilePath:
    """Directory of the shipped presets."""
    import mixstack.zoo

    return FilePath(mixstack.zoo.__file__).parent


def zoo_names() -> list[str]:
    return sorted(p.stem for p in zoo_dir().glob("*.yaml"))


def _zoo_path(name: str, via: str | None) -> FilePath:
    names = zoo_names()
    if name in names:
        return zoo_dir() / f"{name}.yaml"
    hint = did_you_mean(name, names)
    raise SpecError(
        SpecIssue(
            f"unknown zoo preset {name!r}",
            origin=via or f"{ZOO_PREFIX}{name}",
            value=f"{ZOO_PREFIX}{name}",
            has_value=True,
            allowed=", ".join(f"{ZOO_PREFIX}{n}" for n in names) or "(no presets installed)",
            suggestion=f"{ZOO_PREFIX}{hint}" if hint else None,
        )
    )


def _resolve_reference(ref: str, base_dir: FilePath, via: str | None) -> tuple[FilePath, str]:
    """A ``base:`` entry or top-level source -> (file path, display name)."""
    if ref.startswith(ZOO_PREFIX):
        path = _zoo_path(ref[len(ZOO_PREFIX) :].strip(), via)
        return path, str(path)
    if hubref.is_hub_ref(ref):
        return _hub_reference(ref, via)
    if "://" in ref:
        raise SpecError(
            SpecIssue(
                f"cannot load {ref!r}: this kind of remote spec is not supported",
                origin=via or ref,
                allowed="a path to a YAML file, zoo:NAME, or hf://ORG/NAME[@REVISION]",
            )
        )
    path = FilePath(ref).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    return path, os.path.normpath(str(path))


def _hub_reference(ref: str, via: str | None) -> tuple[FilePath, str]:
    """Download the ``spec.yaml`` of an ``hf://`` reference; origins name its commit."""

    def error(message: str) -> SpecError:
        return SpecError(
            SpecIssue(
                message,
                origin=via or ref,
                allowed="hf://ORG/NAME or hf://ORG/NAME@REVISION of a mixstack model repository",
            )
        )

    options = _HUB_OPTIONS.get() or hubref.default_options()
    path, display, record = hubref.fetch_spec(ref, options, error)
    sources = _HUB_SOURCES.get()
    if sources is not None and record not in sources:
        sources.append(record)
    return path, display


def _compose_source(source: Any, issues: IssueCollector) -> tuple[dict[str, Any], Provenance]:
    if isinstance(source, Spec):
        return _compose_data(
            source.to_dict(), Provenance.uniform(DICT_ORIGIN), FilePath.cwd(), (), issues
        )
    if isinstance(source, Mapping):
        data = _plain(source)
        return _compose_data(data, Provenance.uniform(DICT_ORIGIN), FilePath.cwd(), (), issues)
    if isinstance(source, (str, os.PathLike)):
        ref = os.fsdecode(source)
        path, display = _resolve_reference(ref, FilePath.cwd(), None)
        if not os.path.isabs(ref) and not ref.startswith(ZOO_PREFIX) and "://" not in ref:
            display = ref
        return _compose_file(path, display, (), issues, via=None)
    raise SpecError(
        SpecIssue(
            f"cannot load a spec from a {type(source).__name__}",
            value=source,
            has_value=True,
            allowed="a YAML path, 'zoo:NAME', a mapping or a Spec",
        )
    )


def _plain(value: Any) -> Any:
    """Python input as plain data: mappings -> dict, sequences -> list (copied), so any
    ``Mapping`` (an OmegaConf container too) or a tuple is checked like the YAML it
    stands for."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_plain(v) for v in value]
    return copy.deepcopy(value)


def _compose_file(
    path: FilePath,
    display: str,
    chain: tuple[FilePath, ...],
    issues: IssueCollector,
    via: str | None,
) -> tuple[dict[str, Any], Provenance]:
    key = FilePath(os.path.realpath(path))
    if key in chain:
        cycle = " -> ".join(str(p) for p in (*chain[chain.index(key) :], key))
        raise SpecError(
            SpecIssue(
                f"`base:` cycle: {cycle}",
                path=("base",),
                origin=via,
                allowed="a chain of bases that never comes back to a file already included",
            )
        )
    data, prov = read_yaml_file(path, display, via)
    if not isinstance(data, dict):
        what = "empty" if data is None else f"a {type(data).__name__}, not a mapping"
        raise SpecError(
            SpecIssue(
                f"the spec file is {what}",
                origin=prov.origin(()),
                allowed="a mapping with a `model:` section (and optional train, run, base)",
            )
        )
    _anchor_paths(data, path.parent)
    return _compose_data(data, prov, path.parent, (*chain, key), issues)


# Spec values that name files and are relative to the spec file that sets them (a base
# file's value to the base file), so a spec runs the same from any working directory.
FILE_VALUES: tuple[tuple[str, str], ...] = (("train", "init_from"),)


def _anchor_paths(data: dict[str, Any], base_dir: FilePath) -> None:
    """Make the relative :data:`FILE_VALUES` of one file's data absolute (in place)."""
    for section, key in FILE_VALUES:
        part = data.get(section)
        value = part.get(key) if isinstance(part, dict) else None
        if isinstance(value, str) and value and "://" not in value:
            path = FilePath(value).expanduser()
            if not path.is_absolute():
                part[key] = str((base_dir / path).resolve())


def _base_entries(data: dict[str, Any], prov: Provenance) -> list[tuple[str, str | None]]:
    """The ``base:`` entries as ``(reference, origin)``; refuses other shapes."""
    raw = data.pop("base", None)
    if raw is None:
        return []
    items: list[tuple[Any, Path]] | None = None
    if isinstance(raw, str):
        items = [(raw, ("base",))]
    elif isinstance(raw, list):
        items = [(ref, ("base", i)) for i, ref in enumerate(raw)]
    if items is None or not all(isinstance(ref, str) and ref.strip() for ref, _ in items):
        raise SpecError(
            SpecIssue(
                "`base:` must be a path or a list of paths",
                path=("base",),
                origin=prov.origin(("base",)),
                value=raw,
                has_value=True,
                allowed="'other.yaml', 'zoo:NAME', or a list of those",
            )
        )
    return [(ref.strip(), prov.origin(p)) for ref, p in items]


def _compose_data(
    data: dict[str, Any],
    prov: Provenance,
    base_dir: FilePath,
    chain: tuple[FilePath, ...],
    issues: IssueCollector,
) -> tuple[dict[str, Any], Provenance]:
    """Merge the bases of ``data`` (in order) and ``data`` itself on top."""
    _check_single_form(data, prov, issues)
    bases = _base_entries(data, prov)
    prov.drop(("base",))
    merged: dict[str, Any] = {}
    merged_prov = Provenance()
    for ref, origin in bases:
        path, display = _resolve_reference(ref, base_dir, origin)
        base_data, base_prov = _compose_file(path, display, chain, issues, via=origin)
        merged, merged_prov = merge_sources(merged, merged_prov, base_data, base_prov)
    if not bases:
        return data, prov
    return merge_sources(merged, merged_prov, data, prov)


def _layers_of(data: Any) -> dict[str, Any] | None:
    model = data.get("model") if isinstance(data, dict) else None
    layers = model.get("layers") if isinstance(model, dict) else None
    return layers if isinstance(layers, dict) else None


def _check_single_form(data: dict[str, Any], prov: Provenance, issues: IssueCollector) -> None:
    layers = _layers_of(data)
    if layers is not None:
        issue = form_conflict(layers, prov.origin)
        if issue is not None:
            issues.extend([issue])


def _drop_other_forms(data: dict[str, Any], prov: Provenance, forms: list[str]) -> None:
    """A higher-priority source picked ``forms``: forget the others in ``data``."""
    layers = _layers_of(data)
    if layers is None or not forms:
        return
    for form, keys in LAYER_FORMS.items():
        if form in forms:
            continue
        for key in keys:
            if key in layers:
                del layers[key]
                prov.drop((*LAYERS_PATH, key))
    if "requested" in layers:  # provenance of a dumped spec no longer applies
        del layers["requested"]
        prov.drop((*LAYERS_PATH, "requested"))


def merge_sources(
    lower: dict[str, Any], lower_prov: Provenance, upper: dict[str, Any], upper_prov: Provenance
) -> tuple[dict[str, Any], Provenance]:
    """Merge ``upper`` over ``lower``, applying the layer-form rule first."""
    upper_layers = _layers_of(upper)
    forms = layer_forms(upper_layers) if upper_layers is not None else []
    if forms:
        lower = copy.deepcopy(lower)
        lower_prov = lower_prov.copy()
        _drop_other_forms(lower, lower_prov, forms)
    return merge(lower, lower_prov, upper, upper_prov)


# -- overrides ---------------------------------------------------------------------------

_SEGMENT = re.compile(r"([^.\[\]]*)((?:\[-?\d+\])*)")


@dataclass(frozen=True)
class Override:
    """One parsed ``key.path=value`` override."""

    origin: str
    path: tuple[str | int, ...]
    value: Any


def _override_error(origin: str, message: str, allowed: str | None = None) -> SpecError:
    return SpecError(SpecIssue(message, origin=origin, allowed=allowed))


def _parse_key(key: str, origin: str) -> tuple[str | int, ...]:
    """``a.b[0].c`` -> ("a", "b", 0, "c"); digit segments (``a.0``) stay strings and
    index lists when applied."""
    parts: list[str | int] = []
    for segment in key.split("."):
        match = _SEGMENT.fullmatch(segment)
        if match is None or not match.group(1):
            raise _override_error(
                origin,
                f"malformed key path {key!r}: empty or invalid part {segment!r}",
                "dotted keys like model.d_model or model.layers.overrides[0].set.window",
            )
        parts.append(match.group(1))
        parts.extend(int(i) for i in re.findall(r"\[(-?\d+)\]", match.group(2)))
    return tuple(parts)


def parse_override(text: Any) -> Override:
    """Parse ``"key.path=value"``; the value is YAML (``128`` is an int, ``[1, 2]`` a list)."""
    if not isinstance(text, str):
        raise SpecError(
            SpecIssue(
                f"an override must be a string, got {type(text).__name__}",
                origin="<override>",
                value=text,
                has_value=True,
                allowed="'key.path=value'",
            )
        )
    origin = f"<override {text}>"
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise _override_error(
            origin,
            f"override {text!r} is not of the form key.path=value",
            "'model.d_model=128', 'model.layers.pattern=M-M*'",
        )
    return Override(origin, _parse_key(key, origin), _parse_value(raw, key, origin))


# Characters YAML reserves at the start of a plain scalar (alias, anchor, tag, directive,
# block scalars...). A pattern may start with one (`*-*-`), so such a value that is not
# valid YAML is read as the plain string it obviously is.
_YAML_INDICATORS = frozenset("*&!%@`|>")


def _parse_value(raw: str, key: str, origin: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        text = raw.strip()
        if text and text[0] in _YAML_INDICATORS:
            return text
        problem = getattr(exc, "problem", None) or str(exc)
        raise _override_error(
            origin, f"the value of override {key!r} is not valid YAML: {problem}"
        ) from None


def _index(container: list[Any], part: str | int, done: Path, origin: str) -> int:
    index = int(part) if isinstance(part, str) and part.isdigit() else part
    if not isinstance(index, int):
        raise _override_error(
            origin,
            f"{format_path(done)} is a list; {part!r} is not an index",
            f"an integer index below {len(container)}",
        )
    if not -len(container) <= index < len(container):
        raise _override_error(
            origin,
            f"index {index} is out of range for {format_path(done)} ({len(container)} items)",
            f"an index 0..{len(container) - 1}" if container else "none: the list is empty",
        )
    return index % len(container)


def _step(container: Any, part: str | int, done: Path, origin: str) -> Any:
    """The key/index under which ``part`` lives in ``container`` (checked)."""
    if isinstance(container, list):
        return _index(container, part, done, origin)
    if isinstance(container, dict):
        if isinstance(part, int):
            raise _override_error(
                origin,
                f"{format_path(done)} is a mapping, not a list; [{part}] cannot index it",
                f"one of its keys: {', '.join(map(str, container)) or 'none'}",
            )
        if part not in container and part.isdigit() and int(part) in container:
            return int(part)
        return part
    kind = "null" if container is None else type(container).__name__
    raise _override_error(
        origin,
        f"cannot set {part!r} inside {format_path(done)}: it is {kind}, not a mapping or list",
    )


def apply_override(data: dict[str, Any], prov: Provenance, override: Override) -> None:
    """Write ``override.value`` at its path, creating mappings on the way. A failing
    override leaves ``data`` as it was (no half-created mappings)."""
    trial = copy.deepcopy(data)
    _write_path(trial, prov, override)
    data.clear()
    data.update(trial)


def _write_path(data: dict[str, Any], prov: Provenance, override: Override) -> None:
    _refuse_unbound_symbol(data, override)
    node: Any = data
    done: Path = ()
    path = override.path
    for n, part in enumerate(path[:-1]):
        key = _step(node, part, done, override.origin)
        if isinstance(node, dict) and (key not in node or node[key] is None):
            # A section the file does not spell out: an index below it addresses the
            # default list (`A_init_range[1]=8` on Mamba-2's default (1, 16)); whatever
            # the override creates is its own, so errors in it point at the override.
            node[key] = _created_container(data, (*done, key), path[n + 1], override)
            prov.mark_value((*done, key), node[key], override.origin)
        node = node[key]
        done = (*done, key)
    key = _step(node, path[-1], done, override.origin)
    node[key] = copy.deepcopy(override.value)
    prov.mark_value((*done, key), override.value, override.origin)


def _created_container(
    data: dict[str, Any], path: Path, next_part: str | int, override: Override
) -> dict[str, Any] | list[Any]:
    """The container an override creates at ``path``: a mapping, or for a list index
    below it, a copy of the field's default list."""
    is_index = isinstance(next_part, int) or next_part.isdigit()  # a.0.b == a[0].b
    default = field_default(data, path) if is_index else None
    if isinstance(default, (list, tuple)):
        return list(default)
    if not isinstance(next_part, int):
        return {}
    raise _override_error(
        override.origin,
        f"{format_path(path)} is not set in the spec and has no default list, so "
        f"[{next_part}] cannot index it",
        f"the whole value: {format_path(path)}=[...]",
    )


_NO_DEFAULT = object()


def field_default(data: dict[str, Any], path: Path) -> Any:
    """The default of the spec field at ``path`` (a layer field looked up in the class
    registered for its binding's ``type``), or a sentinel when there is none."""
    from pydantic import BaseModel

    from mixstack.dsl import registry
    from mixstack.dsl.spec import ModelSpec, RunSpec, TrainSpec

    roots: dict[str, type[BaseModel]] = {"model": ModelSpec, "train": TrainSpec, "run": RunSpec}
    cls: Any = roots.get(str(path[0])) if path else None
    rest = path[1:]
    symbols = (*LAYERS_PATH, "symbols")
    if path[: len(symbols)] == symbols and len(path) > len(symbols) + 1:
        binding = data.get("model", {}).get("layers", {}).get("symbols", {}).get(path[3])
        kind = binding.get("type") if isinstance(binding, dict) else None
        known = isinstance(kind, str) and kind in registry.layers.names()
        cls = registry.layers.get(kind).config_cls if known else None
        rest = path[len(symbols) + 1 :]
    value: Any = _NO_DEFAULT
    for part in rest:
        fields = cls.model_fields if isinstance(cls, type) and issubclass(cls, BaseModel) else {}
        if part not in fields or fields[part].is_required():
            return _NO_DEFAULT
        value = fields[part].get_default(call_default_factory=True)
        cls = type(value)
    return value


def _refuse_unbound_symbol(data: dict[str, Any], override: Override) -> None:
    """``model.layers.symbols.x.n_heads=4`` with no symbol ``x`` would create a binding
    without a type; say which symbols are bound instead."""
    symbols_path = (*LAYERS_PATH, "symbols")
    path = override.path
    if path[: len(symbols_path)] != symbols_path or len(path) <= len(symbols_path) + 1:
        return
    symbols = data.get("model", {}).get("layers", {}).get("symbols")
    symbol = path[len(symbols_path)]
    if isinstance(symbols, dict) and symbol not in symbols:
        bound = ", ".join(repr(s) for s in symbols) or "none"
        raise _override_error(
            override.origin,
            f"symbol {symbol!r} is not bound in model.layers.symbols (bound: {bound}), so "
            f"{format_path(path)} has nothing to change",
            f"a bound symbol, or a new binding: {format_path(path[:4])}={{type: NAME, ...}}",
        )


def _forms_in_override(override: Override) -> list[str]:
    """Layer forms an override sets: ``model.layers.pattern=...`` names one; an override
    of ``model.layers`` (or an ancestor) with a mapping names those it contains."""
    path, n = override.path, len(LAYERS_PATH)
    if path[:n] == LAYERS_PATH and len(path) > n:
        return layer_forms({path[n]: None})
    if LAYERS_PATH[: len(path)] != path:
        return []
    sub = override.value
    for part in LAYERS_PATH[len(path) :]:
        sub = sub.get(part) if isinstance(sub, dict) else None
    return layer_forms(sub) if isinstance(sub, dict) else []


def _override_forms(overrides: list[Override]) -> list[tuple[str, Override]]:
    """Distinct layer forms the overrides set, each with the first override setting it."""
    found: dict[str, Override] = {}
    for override in overrides:
        for form in _forms_in_override(override):
            found.setdefault(form, override)
    return list(found.items())


def apply_overrides(
    data: dict[str, Any], prov: Provenance, overrides: list[Any], issues: IssueCollector
) -> tuple[dict[str, Any], Provenance]:
    """Apply command-line overrides in order; malformed ones become issues."""
    if not overrides:
        return data, prov
    parsed: list[Override] = []
    for text in overrides:
        try:
            parsed.append(parse_override(text))
        except SpecError as exc:
            issues.extend(exc.issues)
    forms = _override_forms(parsed)
    if len(forms) > 1:
        issues.add(
            f"overrides set both {forms[0][0]} and {forms[1][0]} of model.layers; use one",
            path=LAYERS_PATH,
            origin=forms[1][1].origin,
            allowed="pattern, or layer_types, or n_layers + ratios + fill",
        )
    _drop_other_forms(data, prov, [f for f, _ in forms])
    for ov in parsed:
        try:
            apply_override(data, prov, ov)
        except SpecError as exc:
            issues.extend(exc.issues)
    return data, prov


# -- interpolation -----------------------------------------------------------------------

# A chain resolves recursively (a few frames per link); the cap turns a pathological
# chain into a located error long before Python's recursion limit.
MAX_INTERPOLATION_DEPTH = 100
_REFERENCE = re.compile(r"[A-Za-z0-9_\-]+(\[\d+\])*(\.[A-Za-z0-9_\-]+(\[\d+\])*)*")
_RESOLVER = re.compile(r"\s*([A-Za-z_][\w.\-]*)\s*:")


class _Interpolator:
    """Resolves ``${a.b[0]}`` references against the whole document."""

    def __init__(self, root: dict[str, Any], prov: Provenance):
        self.root = root
        self.prov = prov
        self.active: list[Path] = []
        self.done: dict[Path, Any] = {}

    def error(
        self, path: Path, message: str, allowed: str | None = None, value: Any = None
    ) -> SpecError:
        return SpecError(
            SpecIssue(
                message,
                path=path,
                origin=self.prov.origin(path),
                value=value,
                has_value=value is not None,
                allowed=allowed,
            )
        )

    def walk(self, value: Any, path: Path) -> Any:
        if isinstance(value, dict):
            return {k: self.walk(v, (*path, k)) for k, v in value.items()}
        if isinstance(value, list):
            return [self.walk(v, (*path, i)) for i, v in enumerate(value)]
        if isinstance(value, str) and "${" in value:
            return self.string(value, path)
        return value

    def string(self, text: str, path: Path) -> Any:
        if path in self.done:
            return self.done[path]
        if path in self.active:
            chain = " -> ".join(
                format_path(p) for p in (*self.active[self.active.index(path) :], path)
            )
            raise self.error(path, f"interpolation cycle: {chain}")
        if len(self.active) >= MAX_INTERPOLATION_DEPTH:
            chain = " -> ".join(format_path(p) for p in (*self.active[:3], path))
            raise self.error(
                self.active[0],
                f"interpolation chain deeper than {MAX_INTERPOLATION_DEPTH} references "
                f"({chain} ...): references of references this deep are a generated or "
                "broken spec",
                f"at most {MAX_INTERPOLATION_DEPTH} references resolved through each other",
            )
        self.active.append(path)
        try:
            result = self._render(text, path)
        finally:
            self.active.pop()
        self.done[path] = result
        return result

    def _render(self, text: str, path: Path) -> Any:
        pieces: list[Any] = []
        i = 0
        while i < len(text):
            if text.startswith("\\${", i):
                pieces.append("${")
                i += 3
            elif text.startswith("${", i):
                end = text.find("}", i)
                if end < 0:
                    raise self.error(
                        path,
                        "unterminated interpolation: '${' without '}'",
                        "${model.d_model}-style references",
                        text,
                    )
                pieces.append(self.reference(text[i + 2 : end], path, text))
                i = end + 1
            else:
                nxt = [j for j in (text.find("${", i), text.find("\\${", i)) if j >= 0]
                stop = min(nxt) if nxt else len(text)
                pieces.append(text[i:stop])
                i = stop
        if len(pieces) == 1 and not isinstance(pieces[0], str):
            return pieces[0]
        return self._join(pieces, path, text)

    def _join(self, pieces: list[Any], path: Path, text: str) -> str:
        for piece in pieces:
            if isinstance(piece, (dict, list)):
                raise self.error(
                    path,
                    "a mapping or list cannot be interpolated inside a longer string",
                    "a reference that is the whole value",
                    text,
                )
        return "".join(p if isinstance(p, str) else _scalar_text(p) for p in pieces)

    def reference(self, inner: str, path: Path, text: str) -> Any:
        resolver = _RESOLVER.match(inner)
        if resolver is not None or "${" in inner:
            name = resolver.group(1) if resolver else "nested"
            raise self.error(
                path,
                f"resolver call ${{{name}:...}} is not allowed in a spec (an environment "
                "or computed value must never end up in a saved or pushed spec)",
                "plain references like ${model.d_model}",
                text,
            )
        key = inner.strip()
        if not _REFERENCE.fullmatch(key):
            raise self.error(
                path,
                f"malformed interpolation ${{{inner}}}",
                "an absolute dotted key like ${model.d_model} or ${a.b[0]}",
                text,
            )
        target = self._lookup(_parse_reference(key), path, key)
        return self.walk(target[1], target[0])

    def _lookup(self, parts: list[str | int], path: Path, key: str) -> tuple[Path, Any]:
        node: Any = self.root
        done: Path = ()
        for part in parts:
            found, child = _child_key(node, part)
            if not found:
                raise self.error(
                    path,
                    f"interpolation ${{{key}}} refers to a missing key "
                    f"({format_path((*done, part))} does not exist)",
                    "a key that exists in the merged spec",
                )
            done, node = (*done, child), node[child]
        return done, node


def _child_key(node: Any, part: str | int) -> tuple[bool, Any]:
    """``(found, key)`` of ``part`` in a mapping or list; a digit string also names an
    int key or a list index (``${a.0}`` == ``${a[0]}``)."""
    if isinstance(node, dict):
        if part in node:
            return True, part
        if isinstance(part, str) and part.isdigit() and int(part) in node:
            return True, int(part)
        return False, None
    is_index = isinstance(part, int) or (isinstance(part, str) and part.isdigit())
    if isinstance(node, list) and is_index and int(part) < len(node):
        return True, int(part)
    return False, None


def _parse_reference(key: str) -> list[str | int]:
    parts: list[str | int] = []
    for segment in key.split("."):
        name, _, rest = segment.partition("[")
        parts.append(name)
        parts.extend(int(i) for i in re.findall(r"\d+", "[" + rest if rest else ""))
    return parts


def _scalar_text(value: Any) -> str:
    """How a non-string scalar reads inside a string (YAML spelling: true, null, 1e-05)."""
    if value is None or isinstance(value, bool):
        return yaml.safe_dump(value).split("\n", 1)[0]
    return str(value)


def interpolate(data: dict[str, Any], prov: Provenance) -> dict[str, Any]:
    """Resolve every ``${...}`` reference; raises :class:`SpecError` on the first failure
    (a value that cannot be resolved leaves later checks meaningless)."""
    return _Interpolator(data, prov).walk(data, ())
