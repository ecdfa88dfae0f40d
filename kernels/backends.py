"""Kernel backends: one signature per kernel, several implementations (DESIGN §5).

Every kernel registers a readable ``reference`` (tests only; never chosen by
``auto``), a ``torch`` fast path that runs everywhere, and optional accelerated
providers. A :class:`BackendPolicy` holds what the run asked for (``auto``, a
provider, or a per-kernel map) and resolves it lazily per (kernel, device, dtype):
the model is built on CPU and moved later. Resolutions are cached, logged once and
reported as run metadata. An explicitly requested backend that is unknown,
unavailable or inapplicable raises :class:`BackendError`: never a silent fallback.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from mixstack.dsl.errors import BackendError, did_you_mean

log = logging.getLogger(__name__)

# `auto` tries providers in this fixed order (not by timing, so runs are
# reproducible). `reference` is for tests and never picked automatically.
AUTO_PRIORITY: tuple[str, ...] = (
    "triton",
    "mamba_ssm",
    "causal_conv1d",
    "flash_attn",
    "fla",
    "torch",
)
PROVIDERS: tuple[str, ...] = ("reference", *AUTO_PRIORITY)

# Kernel modules imported on first use of the registry.
_KERNEL_MODULES = (
    "mixstack.kernels.attention",
    "mixstack.kernels.ssd",
    "mixstack.kernels.selective_scan",
    "mixstack.kernels.causal_conv1d",
    "mixstack.kernels.fftconv",
)

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
    """Decorator registering ``fn`` as ``provider``'s implementation of ``kernel``."""
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; known: {', '.join(PROVIDERS)}")

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        spec = register_kernel(kernel)
        spec.backends[provider] = KernelBackend(
            kernel, provider, fn, available, applies, install_hint
        )
        return fn

    return decorate


def ensure_loaded() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in _KERNEL_MODULES:
            importlib.import_module(module)


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
        for value in ["auto", *values]:
            if value != "auto" and value not in PROVIDERS:
                hint = did_you_mean(value, PROVIDERS)
                raise BackendError(
                    f"unknown backend {value!r}; allowed: auto, {', '.join(PROVIDERS)}"
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


def implementation(
    kernel: str, like: torch.Tensor, backends: BackendPolicy | None
) -> Callable[..., Any]:
    """The function ``backends`` (``None``: the shared ``auto`` policy) picks for ``kernel``
    on the device and dtype of ``like``, the kernel's first tensor argument (cached)."""
    policy = _default_policy() if backends is None else backends
    return policy.resolve(kernel, like.device, like.dtype).fn
