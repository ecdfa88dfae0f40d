"""Interleaved timing, peak memory and machine facts for ``mixstack bench``.

Every contender of a comparison runs once per round, round after round (interleaved),
so a burst of load from other processes hits all of them alike; figures are medians
over rounds, and comparisons are ratios of medians measured in the same process.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from mixstack.benchmarks.ssm import CpuPeakMemory


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_call(fn: Callable[[], Any]) -> float:
    """Seconds for one call of ``fn``."""
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def interleave(
    fns: dict[str, Callable[[], Any]],
    reps: int,
    warmup: int = 1,
    slow_s: float | None = None,
    slow_reps: int = 1,
) -> dict[str, list[float]]:
    """``{name: [seconds per round]}``: ``warmup`` untimed calls each, then ``reps``
    rounds in which every function runs once, in the given order.

    A function whose last warm-up call took longer than ``slow_s`` seconds (transformers'
    sequential Mamba-1 scan at long L: minutes per call) is timed ``slow_reps`` times in
    all, its last warm-up call counting as the first (a first-call overhead is nothing
    next to such a call), and then only in the first ``slow_reps − 1`` rounds; its list
    is then shorter (the report shows the number of rounds behind every median)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for name, fn in fns.items():
        took = 0.0
        for _ in range(warmup):
            took = time_call(fn)
        if slow_s is not None and warmup > 0 and took > slow_s:
            times[name].append(took)
    slow = {name for name, ts in times.items() if ts}
    for _ in range(reps):
        for name, fn in fns.items():
            if name in slow and len(times[name]) >= slow_reps:
                continue
            times[name].append(time_call(fn))
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes allocated during one call above what was live before it (CUDA allocator
    peak on a GPU; on CPU the live tensor storage tracked op by op)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with CpuPeakMemory() as tracker:
        fn()
    return tracker.peak


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux, else ``platform``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(backends: dict[str, str] | None = None) -> dict[str, Any]:
    """What a figure depends on: CPU, threads, load, library versions, kernel backends."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "backends": dict(backends or {}),
    }
    try:
        info["load_average"] = list(os.getloadavg())
    except OSError:  # pragma: no cover - not on every platform
        info["load_average"] = None
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    return info
