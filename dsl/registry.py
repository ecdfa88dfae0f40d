"""The registries: layer types, task types and validation metrics, each entry with its origin.

One registration path (DESIGN §8). A mixer registers with ``@register(MyConfig)`` on its
module class, a task with ``@register_task(MyTaskConfig, metrics=...)`` on its task
class, a metric with :func:`register_metric`. The registries fill lazily on first
access, in this order:

1. built-ins: every module of the packages in :data:`BUILTIN_PACKAGES` (found by
   scanning, so adding a mixer or a task is adding one file), then the few modules in
   :data:`BUILTIN_MODULES` that register from elsewhere;
2. third-party packages: the entry-point groups ``mixstack.mixers`` and
   ``mixstack.tasks`` (loading an entry point imports its module, whose decorators call
   the same ``register``);
3. plugin files: the absolute paths in ``$MIXSTACK_PLUGINS`` (``os.pathsep``-separated;
   ``mixstack --plugin FILE`` sets it, so child processes load the same files).

Each entry records where it came from (:class:`Origin`): built-in, an entry point's
distribution and version, or a plugin file's path and sha256. :func:`scoped` gives
tests a registry they may add to and that is restored afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import logging
import os
import pkgutil
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Generic, Literal, Protocol, TypeVar

from pydantic import BaseModel

from mixstack.dsl.base import LayerConfig
from mixstack.dsl.errors import MixstackError, did_you_mean

log = logging.getLogger(__name__)

ENTRY_POINT_GROUPS = ("mixstack.mixers", "mixstack.tasks")
PLUGINS_ENV = "MIXSTACK_PLUGINS"
# Scanned: every module in them is imported (dsl/ itself names no mixer or task).
BUILTIN_PACKAGES = ("mixstack.mixers", "mixstack.tasks")
# Registering modules outside those packages: the composite layers (blocks/, they wrap
# other layers), the default symbol bindings, and the built-in metrics (loss, accuracy,
# ppl), which live with the metric code in training/ (no lightning at import).
BUILTIN_MODULES = (
    "mixstack.blocks.composite",
    "mixstack.archs.defaults",
    "mixstack.training.metrics",
)


class RegistryError(MixstackError, KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


@dataclass(frozen=True)
class Origin:
    """Where a registration came from: ``builtin``, ``entry_point`` (distribution and
    version), ``plugin`` (file path and sha256) or ``code`` (registered by a module
    imported some other way, e.g. a test; ``path`` is the module name)."""

    kind: Literal["builtin", "entry_point", "plugin", "code"]
    distribution: str | None = None
    version: str | None = None
    path: str | None = None
    sha256: str | None = None

    def to_dict(self) -> dict[str, str]:
        return {k: v for k, v in vars(self).items() if v is not None}

    def __str__(self) -> str:
        if self.kind == "entry_point":  # a version only when it has a distribution
            return " ".join(part for part in (self.distribution, self.version) if part)
        if self.kind == "plugin":
            return f"{self.path} (sha256 {str(self.sha256)[:12]})"
        if self.kind == "code":
            return f"module {self.path}"
        return "built-in"


BUILTIN = Origin("builtin")


@dataclass(frozen=True)
class LayerEntry:
    name: str
    config_cls: type[LayerConfig]
    module_cls: type
    source: str
    origin: Origin = BUILTIN

    @property
    def kind(self) -> str:
        return self.config_cls.kind


@dataclass(frozen=True)
class MetricDef:
    """A validation metric, logged as ``val/<name>``.

    ``factory(n_out)`` returns a fresh torchmetrics ``Metric`` (``n_out``: the width of the
    model output, vocabulary or classes); ``prepare(logits, labels)`` turns a batch into
    that metric's ``update`` arguments (default: ``(logits.float(), labels)``). ``archs``:
    the model archs it applies to (None: all). ``higher_is_better`` is what
    ``train.early_stop``, the best value in ``run.json`` and grids read.
    ``sample_keys``: further keys of the task's samples (batched) that ``prepare`` needs,
    passed after ``labels`` in this order (e.g. a task's per-position target distribution).
    """

    name: str
    higher_is_better: bool
    description: str
    factory: Callable[[int], Any]
    prepare: Callable[..., tuple[Any, ...]] | None = None
    archs: tuple[str, ...] | None = None
    sample_keys: tuple[str, ...] = ()

    @property
    def mode(self) -> Literal["max", "min"]:
        return "max" if self.higher_is_better else "min"


@dataclass(frozen=True)
class MetricEntry:
    metric: MetricDef
    task: str | None  # the task that defines it; None: computed for every task
    source: str  # "every task" or "task NAME": one definition per name
    origin: Origin = BUILTIN

    @property
    def name(self) -> str:
        return self.metric.name


@dataclass(frozen=True)
class TaskEntry:
    name: str
    config_cls: type[BaseModel]
    task_cls: type
    source: str
    metrics: tuple[str, ...] = ()
    origin: Origin = BUILTIN


class _Entry(Protocol):
    @property
    def source(self) -> str: ...


E = TypeVar("E", bound=_Entry)
M = TypeVar("M")


@dataclass
class Registry(Generic[E]):
    """Name -> entry, for one kind of thing (``what``: "layer type", "task type", "metric")."""

    what: str
    entries: dict[str, E] = field(default_factory=dict)

    def add(self, name: str, entry: E) -> None:
        """Register ``entry``; the same name from another source is refused (a module
        imported twice registers again from the same source, which is fine)."""
        existing = self.entries.get(name)
        if existing is not None and existing.source != entry.source:
            raise RegistryError(
                f"{self.what} {name!r} is already registered by {existing.source}; "
                f"{entry.source} cannot register it again"
            )
        self.entries[name] = entry

    def get(self, name: str) -> E:
        ensure_loaded()
        entry = self.entries.get(name)
        if entry is None:
            hint = did_you_mean(name, self.entries)
            msg = f"unknown {self.what} {name!r}; registered: {', '.join(sorted(self.entries))}"
            if hint:
                msg += f" (did you mean {hint!r}?)"
            raise RegistryError(msg)
        return entry

    def names(self) -> list[str]:
        ensure_loaded()
        return sorted(self.entries)

    def all(self) -> list[E]:
        ensure_loaded()
        return [self.entries[n] for n in sorted(self.entries)]


layers: Registry[LayerEntry] = Registry("layer type")
tasks: Registry[TaskEntry] = Registry("task type")
metrics: Registry[MetricEntry] = Registry("metric")
_default_bindings: dict[str, dict[str, Any]] = {}
_loaded = False
_loading = False
_origin: Origin | None = None  # the origin of what registers right now (set while loading)
_plugin_files: dict[str, Origin] = {}  # absolute path -> origin, in load order


def _type_name(config_cls: type[BaseModel]) -> str:
    field_ = config_cls.model_fields.get("type")
    if field_ is None or not isinstance(field_.default, str):
        raise TypeError(
            f"{config_cls.__name__} must declare `type: Literal['name'] = 'name'` to be registered"
        )
    return field_.default


def _origin_of(module: str) -> Origin:
    """The origin of a registration made by ``module``: that of the plugin or entry point
    being loaded; built-in for mixstack's own modules (also when imported directly,
    before the registry loaded them); else the module's name."""
    if _origin is not None:
        return _origin
    if module in BUILTIN_MODULES or module.rpartition(".")[0] in BUILTIN_PACKAGES:
        return BUILTIN
    return Origin("code", path=module)


def register(config_cls: type[LayerConfig]) -> Callable[[type[M]], type[M]]:
    """Class decorator: ``@register(MyConfig)`` above ``class MyMixer(Mixer)``."""

    def decorate(module_cls: type[M]) -> type[M]:
        name = _type_name(config_cls)
        source = f"{module_cls.__module__}.{module_cls.__qualname__}"
        layers.add(
            name,
            LayerEntry(name, config_cls, module_cls, source, _origin_of(module_cls.__module__)),
        )
        module_cls.config_cls = config_cls  # type: ignore[attr-defined]
        return module_cls

    return decorate


def register_metric(metric: MetricDef, *, task: str | None = None) -> MetricDef:
    """Register a validation metric (``task``: the task defining it; None: every task)."""
    source = f"task {task}" if task else "every task"
    origin = _origin_of(metric.factory.__module__)
    metrics.add(metric.name, MetricEntry(metric, task, source, origin))
    return metric


def register_task(
    config_cls: type[BaseModel], *, metrics: Iterable[MetricDef] = ()
) -> Callable[[type[M]], type[M]]:
    """Class decorator: ``@register_task(MyTaskConfig, metrics=[...])`` above the task
    class (a :class:`mixstack.tasks.base.Task` built as ``cls(cfg, seed, model)``).
    ``metrics``: extra validation metrics of this task, beside loss / accuracy / ppl."""
    extra = tuple(metrics)

    def decorate(task_cls: type[M]) -> type[M]:
        name = _type_name(config_cls)
        source = f"{task_cls.__module__}.{task_cls.__qualname__}"
        names_ = tuple(m.name for m in extra)
        entry = TaskEntry(
            name, config_cls, task_cls, source, names_, _origin_of(task_cls.__module__)
        )
        tasks.add(name, entry)
        for metric in extra:
            register_metric(metric, task=name)
        task_cls.config_cls = config_cls  # type: ignore[attr-defined]
        return task_cls

    return decorate


def set_default_bindings(bindings: dict[str, dict[str, Any]]) -> None:
    """Called by ``mixstack.archs.defaults``: the bindings of symbols a spec leaves unbound."""
    _default_bindings.clear()
    _default_bindings.update(bindings)


@contextlib.contextmanager
def _registering_as(origin: Origin) -> Iterator[None]:
    global _origin
    previous, _origin = _origin, origin
    try:
        yield
    finally:
        _origin = previous


def builtin_modules() -> list[str]:
    """The built-in registering modules: every module of :data:`BUILTIN_PACKAGES`, then
    :data:`BUILTIN_MODULES`."""
    found = []
    for package in BUILTIN_PACKAGES:
        paths = importlib.import_module(package).__path__
        found += [f"{package}.{m.name}" for m in pkgutil.iter_modules(paths) if not m.ispkg]
    return found + list(BUILTIN_MODULES)


def entry_point_origin(ep: metadata.EntryPoint) -> Origin:
    """The origin of what entry point ``ep`` registers: its distribution and version (the
    entry point's target when it belongs to no distribution). Kernel providers too."""
    dist = ep.dist
    return Origin(
        "entry_point",
        distribution=dist.name if dist else ep.value,
        version=dist.version if dist else None,
    )


def _load_entry_points() -> None:
    for group in ENTRY_POINT_GROUPS:
        for ep in metadata.entry_points(group=group):
            origin = entry_point_origin(ep)
            try:
                with _registering_as(origin):
                    ep.load()
            except Exception as exc:  # a broken plugin must say which one
                raise RegistryError(
                    f"could not load mixstack plugin {ep.name!r} ({ep.value}) from entry-point "
                    f"group {group!r}: {type(exc).__name__}: {exc}"
                ) from exc


def ensure_loaded() -> None:
    """Import built-ins, entry-point plugins and ``$MIXSTACK_PLUGINS`` files once."""
    global _loaded, _loading
    if _loaded or _loading:
        return
    _loading = True
    try:
        with _registering_as(BUILTIN):
            for module in builtin_modules():
                importlib.import_module(module)
        _load_entry_points()
        for path in _listed_plugins():
            if not Path(path).is_file():
                raise RegistryError(
                    f"plugin file {path!r} (listed in ${PLUGINS_ENV}, set by `mixstack --plugin` "
                    "in a parent process) does not exist"
                )
            _import_plugin(Path(path))
        _loaded = True
    finally:
        _loading = False


def _listed_plugins() -> list[str]:
    return [p for p in os.environ.get(PLUGINS_ENV, "").split(os.pathsep) if p]


def _import_plugin(path: Path) -> None:
    """Import an existing plugin file once (callers check that it exists: their messages
    differ), recording its origin."""
    path = path.resolve()
    if str(path) in _plugin_files:
        return
    name = f"mixstack_plugin_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise RegistryError(f"plugin file {str(path)!r} is not an importable Python file")
    origin = Origin("plugin", path=str(path), sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        with _registering_as(origin):
            spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise RegistryError(
            f"plugin file {str(path)!r} failed to import: {type(exc).__name__}: {exc}"
        ) from exc
    _plugin_files[str(path)] = origin


def load_plugin_file(path: str | Path) -> None:
    """Import a Python file that registers layers, tasks or metrics (``mixstack --plugin
    FILE.py``), and add it to ``$MIXSTACK_PLUGINS`` so child processes load it too."""
    path = Path(path)
    if not path.is_file():
        raise RegistryError(f"plugin file {str(path)!r} does not exist")
    ensure_loaded()
    _import_plugin(path)
    listed = _listed_plugins()
    if str(path.resolve()) not in listed:
        os.environ[PLUGINS_ENV] = os.pathsep.join([*listed, str(path.resolve())])


def plugin_origins(others: Iterable[Origin] = ()) -> list[dict[str, str]]:
    """The origin of every plugin registration: entry-point distributions and plugin
    files (what ``run.json`` records under ``plugins``). ``others``: origins of
    registrations kept outside dsl/ (the kernel providers; dsl/ imports no kernels)."""
    ensure_loaded()
    registered = [e.origin for r in (layers, tasks, metrics) for e in r.entries.values()]
    # plugin files count even when they registered nothing
    candidates = [*registered, *_plugin_files.values(), *others]
    seen: dict[str, dict[str, str]] = {}
    for origin in candidates:
        if origin.kind in ("entry_point", "plugin"):
            seen.setdefault(str(origin), origin.to_dict())
    return list(seen.values())


@contextlib.contextmanager
def scoped() -> Iterator[None]:
    """A scope for tests: registrations made inside it (layers, tasks, metrics, default
    bindings, plugin files and ``$MIXSTACK_PLUGINS``) are undone on exit; the registries
    are loaded on entry."""
    ensure_loaded()
    saved = [dict(r.entries) for r in (layers, tasks, metrics)]
    bindings, plugins = dict(_default_bindings), dict(_plugin_files)
    plugins_env = os.environ.get(PLUGINS_ENV)
    try:
        yield
    finally:
        if plugins_env is None:
            os.environ.pop(PLUGINS_ENV, None)
        else:
            os.environ[PLUGINS_ENV] = plugins_env
        for registry_, entries_ in zip((layers, tasks, metrics), saved, strict=True):
            registry_.entries.clear()
            registry_.entries.update(entries_)
        set_default_bindings(bindings)
        _plugin_files.clear()
        _plugin_files.update(plugins)


# -- layers (the names every caller uses) ------------------------------------------------
def names() -> list[str]:
    return layers.names()


def entries() -> list[LayerEntry]:
    return layers.all()


def get(name: str) -> LayerEntry:
    return layers.get(name)


def has(name: str) -> bool:
    ensure_loaded()
    return name in layers.entries


def default_bindings() -> dict[str, dict[str, Any]]:
    ensure_loaded()
    return {k: dict(v) for k, v in _default_bindings.items()}


# -- tasks and metrics -------------------------------------------------------------------
def task_configs() -> dict[str, type[BaseModel]]:
    """Task ``type`` -> its config class (what ``train.task`` is validated with)."""
    return {entry.name: entry.config_cls for entry in tasks.all()}


def task_metrics(task: str, arch: str | None = None) -> list[MetricDef]:
    """The validation metrics of a run of ``task`` on ``arch``: the general ones (loss,
    accuracy, ppl where it applies) then the task's own."""
    return [
        entry.metric
        for entry in metrics.all()
        if entry.task in (None, task) and (arch is None or arch in (entry.metric.archs or (arch,)))
    ]


def metric_direction(name: str) -> Literal["max", "min"]:
    """``"max"`` when a larger value of metric ``name`` (``"accuracy"`` or
    ``"val/accuracy"``) is better, else ``"min"``."""
    return metrics.get(name.removeprefix("val/")).metric.mode
