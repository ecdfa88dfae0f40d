"""Pieces shared by the benchmark scripts: timing modes, argument parser, log-log plots.

The kernel-scaling scripts run as ``python -m mixstack.benchmarks.ssm`` (or ``conv``);
``mixstack bench`` (:mod:`mixstack.benchmarks.suites`) uses the plotting helpers too.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MODES = ("fwd", "fwd+bwd")
_STYLES = ("-", "--")  # solid: forward, dashed: forward + backward


def argument_parser(doc: str) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of the benchmark's docstring."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0])


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (imported only when plotting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loglog_modes(ax: Any, xs: Sequence[float], cells: Sequence[Any], color: int, name: str) -> None:
    """One log-log line per timing mode for method ``name``: the median time of the cell
    measured at each x (cells have ``median(mode)``)."""
    for mode, style in zip(MODES, _STYLES, strict=True):
        times = [cell.median(mode) for cell in cells]
        ax.loglog(xs, times, style, marker="o", color=f"C{color}", label=f"{name} ({mode})")


def save_figure(fig: Any, axes: Sequence[Any], path: str | Path) -> None:
    """Grid and legend on every axis, then write ``path`` and free the figure."""
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
