"""Ablation grids: a grid spec (:mod:`.grid`), its points checked before anything runs
(:mod:`.planner`), resumable runs over worker processes or submitit (:mod:`.runner`), and
tables and plots (:mod:`.reporting`). Importing this package imports none of torch's
training stack, pandas or matplotlib."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from mixstack.ablate.grid import Grid, load_grid

if TYPE_CHECKING:
    import pandas as pd

    from mixstack.ablate.planner import Plan
    from mixstack.ablate.runner import GridSummary

__all__ = ["Grid", "load_grid", "plan", "report", "run", "status"]


def plan(grid: Grid | str | os.PathLike[str] | dict[str, Any]) -> Plan:
    """Expand and check every point of a grid (see :func:`mixstack.ablate.planner.plan`)."""
    from mixstack.ablate.planner import plan as _plan

    return _plan(grid if isinstance(grid, (Grid, dict)) else os.fspath(grid))


def run(grid: Grid | str | os.PathLike[str], out: str | os.PathLike[str], **kw: Any) -> GridSummary:
    """Run a grid into ``out`` (see :func:`mixstack.ablate.runner.run_grid`)."""
    from mixstack.ablate.runner import run_grid

    return run_grid(grid, out, **kw)


def status(out: str | os.PathLike[str]) -> GridSummary:
    """Counts of pending / running / finished / failed points of a grid directory."""
    from pathlib import Path

    from mixstack.ablate.runner import summarize

    return summarize(Path(out))


def report(out: str | os.PathLike[str]) -> pd.DataFrame:
    """The per-cell results table of a grid directory (a pandas DataFrame)."""
    from mixstack.ablate.reporting import report as _report

    return _report(out)
