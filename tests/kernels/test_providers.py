"""Third-party kernel providers: entry points in ``mixstack.providers``, never picked by
``auto``, used when a policy names them, with their origin listed."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from mixstack.dsl import registry
from mixstack.dsl.errors import BackendError
from mixstack.dsl.registry import BUILTIN
from mixstack.kernels import backends as kb
from mixstack.kernels import ssd
from tests.kernels.parity_cases import ssd_scan_cases

CPU = torch.device("cpu")


@dataclass(frozen=True)
class FakeDistribution:
    name: str
    version: str


@dataclass(frozen=True)
class FakeEntryPoint:
    """What backends.py reads from an ``importlib.metadata.EntryPoint``."""

    name: str
    value: str
    target: Callable[[], Any]
    dist: FakeDistribution = FakeDistribution("acme-kernels", "1.2.3")

    def load(self) -> Callable[[], Any]:
        return self.target


@pytest.fixture
def install(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """``install(*entry_points)``: a fresh registry (mixstack's backends, no third-party
    providers) that loads these entry points on first use."""
    kb.ensure_loaded()
    kernels = {name: kb.KernelSpec(name, dict(spec.backends)) for name, spec in kb._kernels.items()}
    monkeypatch.setattr(kb, "_kernels", kernels)
    monkeypatch.setattr(kb, "_third_party", {})
    monkeypatch.setattr(kb, "_loaded", False)

    def entry_points(*, group: str) -> list[FakeEntryPoint]:
        return list(installed) if group == kb.PROVIDER_GROUP else []

    installed: list[FakeEntryPoint] = []
    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    return lambda *eps: installed.extend(eps)


calls: list[str] = []


def acme_ssd_scan(*args: Any, **kwargs: Any) -> Any:
    calls.append("acme_ssd")
    return ssd.ssd_scan_chunked(*args, **kwargs)


def register_acme() -> None:
    kb.register_backend("ssd_scan", "acme_ssd")(acme_ssd_scan)


ACME = FakeEntryPoint("acme", "acme_kernels:register", register_acme)


def test_entry_point_provider_is_used_only_when_named(install) -> None:
    install(ACME)
    assert kb.BackendPolicy("auto").resolve("ssd_scan", CPU, torch.float32).provider in {
        "native",
        "torch",
    }
    case = ssd_scan_cases()[0]
    calls.clear()
    for request in ("acme_ssd", {"ssd_scan": "acme_ssd"}):
        policy = kb.BackendPolicy(request)
        got = ssd.ssd_scan(**case, backends=policy)
        torch.testing.assert_close(got, ssd.ssd_scan_chunked(**case))
        assert policy.resolved() == {"ssd_scan@cpu/float32": "acme_ssd"}
    assert calls == ["acme_ssd", "acme_ssd"]
    with pytest.raises(BackendError, match="kernel 'attention' has no 'acme_ssd' backend"):
        kb.BackendPolicy("acme_ssd").resolve("attention", CPU, torch.float32)


def test_provider_origins_name_the_distribution(install) -> None:
    install(ACME)
    origins = kb.provider_origins()
    assert str(origins["acme_ssd"]) == "acme-kernels 1.2.3"
    assert origins["torch"] == origins["reference"] == BUILTIN
    assert "acme_ssd" not in kb.AUTO_PRIORITY


def test_run_json_plugins_list_the_provider_distribution(install) -> None:
    """What training/rundir.py records under run.json's ``plugins``."""
    install(ACME)
    plugins = registry.plugin_origins(kb.provider_origins().values())
    acme = {"kind": "entry_point", "distribution": "acme-kernels", "version": "1.2.3"}
    assert acme in plugins
    assert all(p["kind"] != "builtin" for p in plugins)


def test_unknown_provider_suggests_the_third_party_name(install) -> None:
    install(ACME)
    with pytest.raises(BackendError, match=r"unknown backend 'acme_sdd'.*did you mean 'acme_ssd'"):
        kb.BackendPolicy({"ssd_scan": "acme_sdd"})


def test_broken_entry_point_is_named(install) -> None:
    def broken() -> None:
        raise ImportError("No module named 'acme_cuda'")

    install(FakeEntryPoint("acme-broken", "acme_kernels:broken", broken))
    with pytest.raises(BackendError) as info:
        kb.BackendPolicy("torch")
    message = str(info.value)
    for part in ("'acme-broken'", "acme_kernels:broken", "acme-kernels 1.2.3", "acme_cuda"):
        assert part in message


@pytest.mark.parametrize(
    ("kernel", "provider", "message"),
    [
        ("ssd_scan", "triton", "provider name 'triton' is reserved by mixstack"),
        ("ssd_scna", "acme_ssd", "unknown kernel 'ssd_scna'.*did you mean 'ssd_scan'"),
    ],
)
def test_entry_point_registrations_are_checked(install, kernel, provider, message) -> None:
    def register() -> None:
        kb.register_backend(kernel, provider)(acme_ssd_scan)

    install(FakeEntryPoint("acme", "acme_kernels:register", register))
    with pytest.raises(BackendError, match=message):
        kb.kernels()


def test_third_party_name_outside_an_entry_point_is_refused(install) -> None:
    with pytest.raises(BackendError, match=r"entry point in the group 'mixstack\.providers'"):
        kb.register_backend("ssd_scan", "acme_ssd")
