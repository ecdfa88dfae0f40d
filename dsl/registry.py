"""The layer registry: ``type`` name -> (config class, module class).

Mixers register with a decorator at import (``@register(MyConfig)`` on the module
class). The registry is filled lazily on first access: built-in layers, then
third-party ones from the entry-point group ``mixstack.mixers``; plugin files given
with ``--plugin`` are loaded on request. After that it is read-only in practice.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from mixstack.dsl.base import LayerConfig
from mixstack.dsl.errors import MixstackError, did_you_mean

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "mixstack.mixers"
# Imported on first registry access; dsl/ itself names no mixer.
_BUILTIN_MODULES = ("mixstack.mixers", "mixstack.blocks.composite", "mixstack.archs.defaults")


class RegistryError(MixstackError, KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


@dataclass(frozen=True)
class LayerEntry:
    name: str
    config_cls: type[LayerConfig]
    module_cls: type
    source: str

    @property
    def kind(self) -> str:
        return self.config_cls.kind


_entries: dict[str, LayerEntry] = {}
_default_bindings: dict[str, dict[str, Any]] = {}
_loaded = False
_loading = False

M = TypeVar("M")


def _type_name(config_cls: type[LayerConfig]) -> str:
    field = config_cls.model_fields.get("type")
    if field is None or not isinstance(field.default, str):
        raise TypeError(
            f"{config_cls.__name__} must declare `type: Literal['name'] = 'name'` to be registered"
        )
    return field.default


def register(config_cls: type[LayerConfig]) -> Callable[[type[M]], type[M]]:
    """Class decorator: ``@register(MyConfig)`` above ``class MyMixer(Mixer)``."""

    def decorate(module_cls: type[M]) -> type[M]:
        name = _type_name(config_cls)
        existing = _entries.get(name)
        source = f"{module_cls.__module__}.{module_cls.__qualname__}"
        if existing is not None and existing.source != source:
            raise RegistryError(
                f"layer type {name!r} is already registered by {existing.source}; "
                f"{source} cannot register it again"
            )
        _entries[name] = LayerEntry(name, config_cls, module_cls, source)
        module_cls.config_cls = config_cls  # type: ignore[attr-defined]
        return module_cls

    return decorate


def set_default_bindings(bindings: dict[str, dict[str, Any]]) -> None:
    """Called by ``mixstack.archs.defaults``: the bindings of symbols a spec leaves unbound."""
    _default_bindings.clear()
    _default_bindings.update(bindings)


def ensure_loaded() -> None:
    """Import built-in layers and entry-point plugins once."""
    global _loaded, _loading
    if _loaded or _loading:
        return
    _loading = True
    try:
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                ep.load()
            except Exception as exc:  # a broken plugin must say which one
                raise RegistryError(
                    f"could not load mixstack plugin {ep.name!r} ({ep.value}) from entry-point "
                    f"group {ENTRY_POINT_GROUP!r}: {type(exc).__name__}: {exc}"
                ) from exc
        _loaded = True
    finally:
        _loading = False


def load_plugin_file(path: str | Path) -> None:
    """Import a Python file that registers layers (``mixstack --plugin FILE.py``)."""
    path = Path(path)
    if not path.is_file():
        raise RegistryError(f"plugin file {str(path)!r} does not exist")
    ensure_loaded()
    name = f"mixstack_plugin_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise RegistryError(f"plugin file {str(path)!r} is not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise RegistryError(
            f"plugin file {str(path)!r} failed to import: {type(exc).__name__}: {exc}"
        ) from exc


def names() -> list[str]:
    ensure_loaded()
    return sorted(_entries)


def entries() -> list[LayerEntry]:
    ensure_loaded()
    return [_entries[n] for n in sorted(_entries)]


def get(name: str) -> LayerEntry:
    ensure_loaded()
    entry = _entries.get(name)
    if entry is None:
        hint = did_you_mean(name, _entries)
        msg = f"unknown layer type {name!r}; registered: {', '.join(sorted(_entries))}"
        if hint:
            msg += f" (did you mean {hint!r}?)"
        raise RegistryError(msg)
    return entry


def has(name: str) -> bool:
    ensure_loaded()
    return name in _entries


def default_bindings() -> dict[str, dict[str, Any]]:
    ensure_loaded()
    return {k: dict(v) for k, v in _default_bindings.items()}
