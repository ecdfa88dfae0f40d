"""Kernel backends: one signature per kernel, several implementations (DESIGN §5).

Every kernel registers a readable ``reference`` (tests only; never chosen by
``auto``), a ``torch`` fast path that runs everywhere, and optional accelerated
providers. A :class:`BackendPolicy` holds what the run asked for (``auto``, a
provider, or a per-kernel map) and resolves it lazily per (kernel, device, dtype):
the model is built on CPU and moved later. Resolutions are cached, logged once and
reported as run metadata. An explicitly requested backend that is unknown,
unavailable or inapplicable raises :class:`BackendError`: never a silent fallback.

Where backends come from: the kernel modules of this package (found by scanning it)
register mixstack's own providers, the fixed table :data:`AUTO_PRIORITY` plus
``reference``. Another distribution adds a provider through an entry point in the group
``mixstack.providers`` whose object (a module, or a callable called with no arguments)
calls :func:`register_backend` for existing kernels. ``auto`` never picks such a
provider; a run uses it only when ``run.backend`` names it (for every kernel or per
kernel). :func:`provider_origins` says where each provider came from.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import logging
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from mixstack.dsl.errors import BackendError, did_you_mean
from mixstack.dsl.registry import BUILTIN, Origin, entry_point_origin

log = logging.getLogger(__name__)

# `auto` tries providers in this fixed order (not by timing, so runs are
# reproducible). `reference` is for tests and never picked automatically.
AUTO_PRIORITY: tuple[str, ...] = (
    "triton",
    "mamba_ssm",
    "causal_conv1d",
    "flash_attn",
    "fla",
    "native",  # mixstack's compiled CPU kernels (kernels/native.py): needs a C compiler
    "torch",
)
BUILTIN_PROVIDERS: tuple[str, ...] = ("reference", *AUTO_PRIORITY)
# Entry-point group through which other distributions register providers.
PROVIDER_GROUP = "mixstack.providers"

Reason = str | None  # None: fine; a string: why not


@dataclass(frozen=True)
class KernelBackend:
    kernel: str
    provider: str
    fn: Callable[..., Any]
    available: Callable[[], Reason]
    applies: Callable[[torch.device, torch.dtype], Reason]
    install_hint: str = ""


@dataclass
class KernelSpec:
    """A kernel: its name and its backends by provider."""

    name: str
    backends: dict[str, KernelBackend] = field(default_factory=dict)


_kernels: dict[str, KernelSpec] = {}
_loaded = False
# provider -> the distribution (and version) of the entry point that registered it
_third_party: dict[str, Origin] = {}
# origin of the entry point being loaded; None while mixstack's own modules register
_loading_origin: Origin | None = None


def _always(*_: Any) -> Reason:
    return None


def register_kernel(name: str) -> KernelSpec:
    """Declare a kernel (idempotent; :func:`register_backend` declares its kernel too).
    The inputs every backend must match the reference on live with the tests
    (``tests/kernels/parity_cases.py``)."""
    spec = _kernels.get(name)
    if spec is None:
        spec = _kernels[name] = KernelSpec(name)
    return spec


def register_backend(
    kernel: str,
    provider: str,
    *,
    available: Callable[[], Reason] = _always,
    applies: Callable[[torch.device, torch.dtype], Reason] = _always,
    install_hint: str = "",
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering ``fn`` as ``provider``'s implementation of ``kernel``.

    mixstack's kernel modules register the providers of :data:`BUILTIN_PROVIDERS`; code
    loaded from a ``mixstack.providers`` entry point registers its own provider names,
    for kernels mixstack defines.
    """
    _check_provider_name(kernel, provider)

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        spec = register_kernel(kernel)
        spec.backends[provider] = KernelBackend(
            kernel, provider, fn, available, applies, install_hint
        )
        return fn

    return decorate


def _check_provider_name(kernel: str, provider: str) -> None:
    """Built-in names for mixstack's modules, new names for entry points (recorded)."""
    if _loading_origin is None:
        if provider not in BUILTIN_PROVIDERS:
            raise BackendError(
                f"provider {provider!r} for kernel {kernel!r} is not one of mixstack's "
                f"({', '.join(BUILTIN_PROVIDERS)}); other providers register from an "
                f"entry point in the group {PROVIDER_GROUP!r}"
            )
        return
    where = f"entry point of {_loading_origin}"
    if provider in BUILTIN_PROVIDERS:
        raise BackendError(f"{where}: provider name {provider!r} is reserved by mixstack")
    if _third_party.get(provider, _loading_origin) != _loading_origin:
        raise BackendError(
            f"{where}: provider {provider!r} is already registered by {_third_party[provider]}"
        )
    if kernel not in _kernels:
        hint = did_you_mean(kernel, _kernels)
        raise BackendError(
            f"{where}: provider {provider!r} registers unknown kernel {kernel!r}; kernels: "
            f"{', '.join(sorted(_kernels))}" + (f" (did you mean {hint!r}?)" if hint else "")
        )
    _third_party[provider] = _loading_origin


def _import_kernel_modules() -> None:
    """Import every module of this package: each registers its kernel's backends."""
    package = importlib.import_module("mixstack.kernels")
    for module in pkgutil.iter_modules(package.__path__, f"{package.__name__}."):
        importlib.import_module(module.name)


def _load_provider_entry_points() -> None:
    """Load every ``mixstack.providers`` entry point; a failure names the entry point."""
    global _loading_origin
    for entry_point in importlib.metadata.entry_points(group=PROVIDER_GROUP):
        _loading_origin = entry_point_origin(entry_point)
        try:
            loaded = entry_point.load()
            if callable(loaded):
                loaded()
        except BackendError:
            raise
        except Exception as error:
            raise BackendError(
                f"provider entry point {entry_point.name!r} = {entry_point.value!r} of "
                f"{_loading_origin} (group {PROVIDER_GROUP!r}) failed to load: "
                f"{type(error).__name__}: {error}"
            ) from error
        finally:
            _loading_origin = None


def ensure_loaded() -> None:
    """Import mixstack's kernel modules, then the third-party providers (once)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    try:
        _import_kernel_modules()
        _load_provider_entry_points()
    except BaseException:
        _loaded = False  # the next use reports the problem again
        raise


def providers() -> tuple[str, ...]:
    """Every provider name a policy may request: mixstack's, then third-party ones."""
    ensure_loaded()
    return (*BUILTIN_PROVIDERS, *sorted(_third_party))


def provider_origins() -> dict[str, Origin]:
    """``{provider: origin}``: built-in, or the distribution and version of the entry
    point that registered it (the same :class:`~mixstack.dsl.registry.Origin` layers,
    tasks and metrics carry)."""
    return {p: _third_party.get(p, BUILTIN) for p in providers()}


def kernels() -> dict[str, KernelSpec]:
    ensure_loaded()
    return dict(_kernels)


def get_kernel(name: str) -> KernelSpec:
    ensure_loaded()
    if name not in _kernels:
        hint = did_you_mean(name, _kernels)
        raise BackendError(
            f"unknown kernel {name!r}; kernels: {', '.join(sorted(_kernels))}"
            + (f" (did you mean {hint!r}?)" if hint else "")
        )
    return _kernels[name]


def _why_not(backend: KernelBackend, device: torch.device, dtype: torch.dtype) -> Reason:
    reason = backend.available()
    if reason is not None:
        return reason + (f"; {backend.install_hint}" if backend.install_hint else "")
    return backend.applies(device, dtype)


def available_backends(kernel: str, device: torch.device, dtype: torch.dtype) -> list[str]:
    """Providers of ``kernel`` usable on (device, dtype), reference included."""
    spec = get_kernel(kernel)
    return [p for p, b in spec.backends.items() if _why_not(b, device, dtype) is None]


class BackendPolicy:
    """What a run asked for, and what it resolved to.

    ``request``: ``"auto"``, a provider name, or ``{kernel: provider}`` (kernels not
    named use ``auto``). Shared by every layer of a model.
    """

    def __init__(self, request: str | Mapping[str, str] = "auto"):
        self.request: str | dict[str, str] = request if isinstance(request, str) else dict(request)
        self._validate_request()
        self._cache: dict[tuple[str, str, torch.dtype], KernelBackend] = {}

    @classmethod
    def default(cls) -> BackendPolicy:
        return cls("auto")

    def _validate_request(self) -> None:
        values = [self.request] if isinstance(self.request, str) else list(self.request.values())
        for value in values:
            if value != "auto" and value not in providers():
                hint = did_you_mean(value, providers())
                raise BackendError(
                    f"unknown backend {value!r}; allowed: auto, {', '.join(providers())}"
                    + (f" (did you mean {hint!r}?)" if hint else "")
                )
        if isinstance(self.request, dict):
            for kernel in self.request:
                get_kernel(kernel)

    def requested(self, kernel: str) -> str:
        if isinstance(self.request, str):
            return self.request
        return self.request.get(kernel, "auto")

    def resolve(self, kernel: str, device: torch.device, dtype: torch.dtype) -> KernelBackend:
        key = (kernel, str(device), dtype)
        backend = self._cache.get(key)
        if backend is None:
            backend = self._resolve_uncached(kernel, torch.device(device), dtype)
            self._cache[key] = backend
            log.info("kernel %s on %s/%s: backend %s", kernel, device, dtype, backend.provider)
        return backend

    def _resolve_uncached(
        self, kernel: str, device: torch.device, dtype: torch.dtype
    ) -> KernelBackend:
        spec = get_kernel(kernel)
        wanted = self.requested(kernel)
        if wanted != "auto":
            backend = spec.backends.get(wanted)
            if backend is None:
                raise BackendError(
                    f"kernel {kernel!r} has no {wanted!r} backend; "
                    f"it has: {', '.join(spec.backends)}"
                )
            reason = _why_not(backend, device, dtype)
            if reason is not None:
                raise BackendError(
                    f"backend {wanted!r} for kernel {kernel!r} cannot run on "
                    f"{device.type}/{dtype}: {reason}"
                )
            return backend
        skipped = []
        for provider in AUTO_PRIORITY:
            backend = spec.backends.get(provider)
            if backend is None:
                continue
            reason = _why_not(backend, device, dtype)
            if reason is None:
                return backend
            skipped.append(f"{provider}: {reason}")
        raise BackendError(
            f"no backend of kernel {kernel!r} runs on {device.type}/{dtype}; " + "; ".join(skipped)
        )

    def resolved(self) -> dict[str, str]:
        """``{"kernel@device/dtype": provider}``, for run metadata."""
        return {
            f"{k}@{dev}/{str(dt).removeprefix('torch.')}": b.provider
            for (k, dev, dt), b in self._cache.items()
        }


@functools.cache
def _default_policy() -> BackendPolicy:
    """The ``auto`` policy of calls that pass no policy, shared so its cache persists."""
    return BackendPolicy.default()


def dispatch(kernel: str, arguments: dict[str, Any]) -> Any:
    """Call ``kernel`` the way a dispatcher was called: ``arguments`` is the dispatcher's
    ``locals()`` taken first thing, its parameters in order, the kernel's (passed to the
    backend by name) and ``backends``. The backend comes from the policy (``None``: a
    shared ``auto`` policy) for the device and dtype of the first tensor argument."""
    kwargs = dict(arguments)
    backends: BackendPolicy | None = kwargs.pop("backends")
    policy = _default_policy() if backends is None else backends
    first = next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
    return policy.resolve(kernel, first.device, first.dtype).fn(**kwargs)
