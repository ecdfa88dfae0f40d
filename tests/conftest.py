"""Shared test set-up: hypothesis profiles, default dtype reset, shared input makers."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from types import ModuleType

import pytest
import torch
from hypothesis import HealthCheck, settings

# The repository root is the package: importing it here, before any test module, makes
# pytest find it as `mixstack` (a test file that imports nothing of it, such as
# test_packaging.py alone, would otherwise fail to import the root __init__.py).
import mixstack  # noqa: F401
from mixstack.dsl import registry

settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=30)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def _share_cores_between_xdist_workers() -> None:
    """Under `pytest -n N` each worker (and the subprocesses its tests start) gets an equal
    share of the cores: N workers each running torch on every core oversubscribe the CPU
    and run slower than one process would."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1:
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


_share_cores_between_xdist_workers()


@pytest.fixture(autouse=True)
def _reset_torch_defaults():
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


def _random_packing(length: int, seed: int, bsz: int = 2) -> torch.Tensor:
    """(B, L) document ids: random document lengths (1 to L/3 + 1), increasing ids per row,
    padding runs (−1) at random places (start, between and inside documents, end)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(bsz):
        row: list[int] = []
        doc = 10 * b
        while len(row) < length:
            n = int(torch.randint(1, length // 3 + 2, (1,), generator=g))
            if torch.rand(1, generator=g).item() < 0.25:
                row += [-1] * min(n, 4)
            else:
                row += [doc] * n
                doc += 1
        rows.append(row[:length])
    return torch.tensor(rows)


@pytest.fixture
def random_packing() -> Callable[..., torch.Tensor]:
    """``random_packing(length, seed, bsz=2)``: packed ``seq_idx`` for scan tests."""
    return _random_packing


@pytest.fixture
def scoped_registry() -> Iterator[ModuleType]:
    """The registry module, inside :func:`registry.scoped`: what a test registers (layers,
    tasks, metrics, plugin files) is gone after it."""
    with registry.scoped():
        yield registry


# -- CI policy: no silent skips, slow tests state their budget ------------------------------
# Under CI=true the optional extras are installed (`make test` installs
# .[dev,interop,data,eval,cluster]), so a skipped test means a broken install or a broken
# skip condition: it fails, except for tests marked `gpu` (CI machines have no GPU).
# Every `slow` test states its budget, `@pytest.mark.slow(budget_s=60)`: seconds on 2 CPU
# cores, at most SLOW_BUDGET_MAX_S. Budgets are not asserted (no timed tests); CI prints
# the slow tests that ran over theirs next to `--durations`.

SLOW_BUDGET_MAX_S = 90.0
STRICT_SKIPS = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
CI_SKIP_HINT = (
    "under CI=true only tests marked gpu may skip; install the extras "
    "(pip install -e '.[dev,interop,data,eval,cluster]', as `make test` does) or fix the "
    "skip condition"
)


def _skip_reason(longrepr: object) -> str:
    """The message of a skip report (pytest stores (file, line, reason) for skips)."""
    return longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


_over_budget: list[str] = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> pytest.TestReport:
    report = yield
    budget = _slow_budget(item)
    if call.when == "call" and isinstance(budget, (int, float)) and report.duration > budget:
        _over_budget.append(f"{item.nodeid}: {report.duration:.1f} s, budget {budget:g} s")
    allowed = item.get_closest_marker("gpu") is not None or hasattr(report, "wasxfail")
    if STRICT_SKIPS and report.skipped and not allowed:
        report.outcome = "failed"
        report.longrepr = f"skipped ({_skip_reason(report.longrepr)}): {CI_SKIP_HINT}"
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> pytest.CollectReport:
    """A whole module skipped at import (``pytest.importorskip`` at module level)."""
    report = yield
    if STRICT_SKIPS and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"module skipped ({_skip_reason(report.longrepr)}): {CI_SKIP_HINT}"
    return report


def _slow_budget(item: pytest.Item) -> object:
    """What a ``slow`` test states as ``budget_s`` (None: not slow, or nothing stated)."""
    marker = item.get_closest_marker("slow")
    return None if marker is None else marker.kwargs.get("budget_s")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A slow test without a valid budget fails before it runs."""
    budget = _slow_budget(item)
    valid = isinstance(budget, (int, float)) and 0 < budget <= SLOW_BUDGET_MAX_S
    if item.get_closest_marker("slow") is not None and not valid:
        pytest.fail(
            f"{item.nodeid}: a slow test states its budget in seconds on 2 CPU cores, "
            f"0 < budget_s <= {SLOW_BUDGET_MAX_S:g}, e.g. @pytest.mark.slow(budget_s=60); "
            f"got budget_s={budget!r}",
            pytrace=False,
        )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _over_budget:
        terminalreporter.write_sep("=", "slow tests over their budget (not a failure)")
        for line in _over_budget:
            terminalreporter.write_line(line)
