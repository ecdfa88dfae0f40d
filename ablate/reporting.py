"""Tables and plots of a grid directory (pandas and matplotlib, imported lazily).

Per point (one training run): the best and the last value of the grid's metric read
from its ``metrics.csv`` (best by the metric's registered direction). When the grid
lists learning rates, the sub-runs of one cell and seed are all kept, and the one with
the best value stands for that seed (as zoology does for MQAR). Per cell (a variant at
one combination of axis values): mean, standard deviation (ddof 1) and an interval over
seeds: a 95% percentile bootstrap of the mean (10,000 resamples, fixed generator) with
at least 3 seeds, the min and max otherwise. Paired differences: each variant minus the
first one, seed by seed, at the same axis values.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixstack.ablate.runner import GridDir

if TYPE_CHECKING:
    import pandas as pd

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
MIN_SEEDS_FOR_BOOTSTRAP = 3


def interval(values: list[float]) -> tuple[float, float, str]:
    """``(lo, hi, kind)`` of the mean of ``values``: a 95% percentile bootstrap when
    there are at least 3 values, else their min and max."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return math.nan, math.nan, "none"
    if len(v) < MIN_SEEDS_FOR_BOOTSTRAP:
        return float(v.min()), float(v.max()), "minmax"
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    idx = rng.integers(0, len(v), size=(BOOTSTRAP_RESAMPLES, len(v)))
    means = v[idx].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi), "bootstrap95"


def _stats(values: list[float], prefix: str) -> dict[str, Any]:
    import numpy as np

    v = np.asarray(values, dtype=float)
    lo, hi, kind = interval(values)
    return {
        f"{prefix}_mean": float(v.mean()) if len(v) else math.nan,
        f"{prefix}_std": float(v.std(ddof=1)) if len(v) > 1 else (0.0 if len(v) else math.nan),
        f"{prefix}_lo": lo,
        f"{prefix}_hi": hi,
        "interval": kind,
    }


def metric_history(run_dir: Path, metric: str) -> list[tuple[int, float]]:
    """``(steps done, value)`` of every logged value of ``metric`` in a run's
    ``metrics.csv`` (Lightning logs at the 0-based index of the step before)."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    out = []
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            value = row.get(metric)
            if value not in (None, ""):
                out.append((int(row["step"]) + 1, float(value)))
    return out


def _best(history: list[tuple[int, float]], mode: str) -> tuple[int, float]:
    pick = max if mode == "max" else min
    value = pick(v for _, v in history)
    step = next(s for s, v in history if v == value)
    return step, value


def _is_better(a: float, b: float, mode: str) -> bool:
    return a > b if mode == "max" else a < b


@dataclass
class GridTables:
    """What a report holds: one row per point, per cell, and per paired difference."""

    grid: dict[str, Any]  # the grid directory's plan (grid.json)
    points: pd.DataFrame
    summary: pd.DataFrame
    differences: pd.DataFrame
    histories: dict[str, list[tuple[int, float]]]  # point id -> metric history


def tables(out: str | os.PathLike[str]) -> GridTables:
    """Read a grid directory into :class:`GridTables`."""
    import pandas as pd

    gd = GridDir(Path(out))
    plan = gd.read_plan()
    metric, mode, axes = plan["metric"], plan["mode"], plan["axes"]
    rows, histories = [], {}
    for pt in plan["points"]:
        status = gd.read_status(pt["id"])
        history = (
            metric_history(gd.run_dir(pt["id"]), metric) if status["state"] == "finished" else []
        )
        histories[pt["id"]] = history
        best_step, best = _best(history, mode) if history else (None, math.nan)
        rows.append(
            {
                "id": pt["id"],
                "cell": pt["cell"],
                "variant": pt["variant"],
                **{a: _cell_value(pt["axes"].get(a)) for a in axes},
                "seed": pt["seed"],
                "lr": pt["lr"] if pt["lr"] is not None else _spec_lr(gd, pt["id"]),
                "state": status["state"],
                "best": best,
                "best_step": best_step,
                "last": history[-1][1] if history else math.nan,
                "last_step": history[-1][0] if history else None,
                "params": pt["params"],
                "flops_per_token": pt["flops_per_token"],
                "state_bytes": pt["state_bytes"],
                "steps": pt["steps"],
                # tokens trained: the planned ones, fewer when train.early_stop ended the run
                "tokens": _trained_tokens(pt, status),
                "train_flops": pt["train_flops"],
                "wall_s": status.get("wall_s") if status["state"] == "finished" else None,
                "error": status.get("error"),
            }
        )
    points = pd.DataFrame(rows)
    points["chosen"] = _choose(points, mode)
    summary = _summary(points, plan)
    differences = _differences(points, plan)
    return GridTables(plan, points, summary, differences, histories)


def _spec_lr(gd: GridDir, pid: str) -> float | None:
    """The learning rate a point trained with when the grid has no ``lr`` list (the
    base's, or a variant's ``train.optimizer.lr``), from its resolved spec."""
    try:
        lr = gd.read_point(pid)["spec"]["train"]["optimizer"]["lr"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return float(lr) if isinstance(lr, (int, float)) else None


def _trained_tokens(pt: dict[str, Any], status: dict[str, Any]) -> int | None:
    if status["state"] != "finished":
        return None
    step = status.get("step")
    if not isinstance(step, int) or not pt["steps"]:
        return pt["tokens"]
    return pt["tokens"] // pt["steps"] * step


def report(out: str | os.PathLike[str]) -> pd.DataFrame:
    """The per-cell table of a grid directory (see the module docstring for columns)."""
    return tables(out).summary


def _cell_value(value: Any) -> Any:
    """Axis values as table cells: scalars stay, lists and mappings become JSON text."""
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def _choose(points: pd.DataFrame, mode: str) -> list[bool]:
    """Per (cell, seed), the finished learning-rate sub-run with the best value."""
    chosen = [False] * len(points)
    best: dict[tuple[str, int], int] = {}
    for i, row in enumerate(points.itertuples()):
        if row.state != "finished" or math.isnan(row.best):
            continue
        key = (row.cell, row.seed)
        if key not in best or _is_better(row.best, points.iloc[best[key]]["best"], mode):
            best[key] = i
    for i in best.values():
        chosen[i] = True
    return chosen


def _summary(points: pd.DataFrame, plan: dict[str, Any]) -> pd.DataFrame:
    import pandas as pd

    rows = []
    for cell, group in points.groupby("cell", sort=False):
        picked = group[group["chosen"]]
        first = group.iloc[0]
        lrs = sorted({x for x in picked["lr"] if x is not None and not _nan(x)})
        row = {
            "cell": cell,
            "variant": first["variant"],
            **{a: first[a] for a in plan["axes"]},
            "n_seeds": len(picked),
            "n_points": len(group),
            "finished": int((group["state"] == "finished").sum()),
        }
        best = _stats(list(picked["best"]), "best")
        last = _stats(list(picked["last"]), "last")
        kind = best.pop("interval")
        last.pop("interval")
        row.update(best)
        row.update(last)
        row.update(
            interval=kind,
            lr=(lrs[0] if len(lrs) == 1 else (json.dumps(lrs) if lrs else None)),
            params=int(first["params"]),
            flops_per_token=float(first["flops_per_token"]),
            state_bytes=int(first["state_bytes"]),
            tokens=float(picked["tokens"].mean()) if len(picked) else math.nan,
            wall_s=float(group["wall_s"].sum()) if group["wall_s"].notna().any() else math.nan,
        )
        rows.append(row)
    return pd.DataFrame(rows)


def _nan(x: Any) -> bool:
    return isinstance(x, float) and math.isnan(x)


def _differences(points: pd.DataFrame, plan: dict[str, Any]) -> pd.DataFrame:
    """Each variant minus the first, seed by seed, at equal axis values."""
    import pandas as pd

    variants = plan["variants"]
    columns = [
        "variant",
        "reference",
        *plan["axes"],
        "n_pairs",
        "best_diff_mean",
        "best_diff_std",
        "best_diff_lo",
        "best_diff_hi",
        "last_diff_mean",
        "last_diff_std",
        "last_diff_lo",
        "last_diff_hi",
        "interval",
    ]
    if len(variants) < 2:
        return pd.DataFrame(columns=columns)
    picked = points[points["chosen"]]
    ref = variants[0]
    axes = plan["axes"]

    def by_axes(frame: pd.DataFrame) -> dict[tuple[Any, ...], dict[int, Any]]:
        out: dict[tuple[Any, ...], dict[int, Any]] = {}
        for row in frame.to_dict("records"):
            out.setdefault(tuple(row[a] for a in axes), {})[row["seed"]] = row
        return out

    reference = by_axes(picked[picked["variant"] == ref])
    rows = []
    for variant in variants[1:]:
        for key, seeds in by_axes(picked[picked["variant"] == variant]).items():
            base = reference.get(key, {})
            common = sorted(set(seeds) & set(base))
            if not common:
                continue
            row: dict[str, Any] = {
                "variant": variant,
                "reference": ref,
                **dict(zip(axes, key, strict=True)),
                "n_pairs": len(common),
            }
            for which in ("best", "last"):
                diffs = [seeds[s][which] - base[s][which] for s in common]
                stats = _stats(diffs, f"{which}_diff")
                row["interval"] = stats.pop("interval")
                row.update(stats)
            rows.append(row)
    return pd.DataFrame(rows, columns=columns)


# -- files ------------------------------------------------------------------------------------


def markdown(frame: pd.DataFrame, digits: int = 4) -> str:
    """A GitHub Markdown table (no tabulate dependency)."""

    def cell(v: Any) -> str:
        if v is None or _nan(v):
            return ""
        if isinstance(v, float):
            return (
                f"{v:.{digits}g}" if abs(v) >= 1e4 or (v and abs(v) < 1e-3) else f"{v:.{digits}f}"
            )
        return str(v).replace("|", "\\|")

    head = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *body]) + "\n"


SUMMARY_COLUMNS = (
    "variant",
    "n_seeds",
    "best_mean",
    "best_std",
    "best_lo",
    "best_hi",
    "last_mean",
    "interval",
    "lr",
    "params",
    "tokens",
    "wall_s",
)


def write_report(
    out: str | os.PathLike[str], dest: str | os.PathLike[str] | None = None
) -> dict[str, Path]:
    """Write ``summary.md`` / ``summary.csv`` / ``points.csv`` / ``differences.csv`` and PNG
    plots into ``dest`` (default ``OUT/report``); returns name -> path."""
    from mixstack.training.rundir import write_atomic

    t = tables(out)
    folder = Path(dest) if dest is not None else Path(out) / "report"
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    for name, frame in (
        ("summary", t.summary),
        ("points", t.points),
        ("differences", t.differences),
    ):
        files[f"{name}.csv"] = folder / f"{name}.csv"
        write_atomic(files[f"{name}.csv"], frame.to_csv(index=False))
    files["summary.md"] = folder / "summary.md"
    write_atomic(files["summary.md"], summary_markdown(t))
    files.update(write_plots(t, folder))
    return files


def summary_markdown(t: GridTables) -> str:
    g = t.grid
    cols = [c for c in ("variant", *g["axes"], *SUMMARY_COLUMNS[1:]) if c in t.summary.columns]
    if not any(g["variants"]):
        cols.remove("variant")
    boot = (t.summary["interval"] == "bootstrap95").any()
    kind = "95% bootstrap of the mean" if boot else "min-max over seeds"
    text = (
        f"# grid {g['name']}\n\nmetric: {g['metric']} ({g['mode']}imum is best); "
        f"best and last value per run; mean over seeds, interval: {kind}\n\n"
        + markdown(t.summary[cols])
    )
    if len(t.differences):
        text += "\n## paired differences (variant − reference, per seed)\n\n" + markdown(
            t.differences
        )
    return text


# -- plots ------------------------------------------------------------------------------------


def _sorted_x(values: list[Any]) -> tuple[list[Any], bool]:
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    unique = list(dict.fromkeys(values))
    return (sorted(unique) if numeric else unique), numeric


def _follows(s: Any, other: str, axis: str) -> bool:
    """Whether ``other`` is a function of ``axis`` in the summary ``s`` (a zip partner,
    or an axis with a single value), so it need not split the lines."""
    if other == "variant":
        return False
    pairs = {(repr(a), repr(b)) for a, b in zip(s[axis], s[other], strict=True)}
    return len({a for a, _ in pairs}) == len(pairs)


def plot_metric_vs_axis(
    t: GridTables, axis: str, ax: Any = None, which: str = "best"
) -> list[dict[str, Any]]:
    """Metric (mean over seeds of the ``which`` value) against ``axis``: one line per
    variant (and per combination of the other axes), error bars = the interval.
    ``axis`` may be ``"variant"``. Returns the series drawn: label, x, y, lo, hi."""
    import matplotlib.pyplot as plt

    s = t.summary
    ax = ax or plt.gca()
    # Axes zipped with ``axis`` (each of their values goes with one value of ``axis``)
    # move along the same line instead of splitting it into one line per value.
    others = [a for a in ("variant", *t.grid["axes"]) if a != axis and not _follows(s, a, axis)]
    xs, numeric = _sorted_x(list(s[axis]))
    series = []
    for key, group in s.groupby(others, sort=False) if others else [((), s)]:
        key = key if isinstance(key, tuple) else (key,)
        label = (
            ", ".join(
                str(k) if o == "variant" else f"{o}={k}"
                for o, k in zip(others, key, strict=True)
                if k != ""
            )
            or t.grid["metric"]
        )
        rows = sorted(group.to_dict("records"), key=lambda r: xs.index(r[axis]))
        x = [r[axis] for r in rows]
        y = [r[f"{which}_mean"] for r in rows]
        lo = [r[f"{which}_lo"] for r in rows]
        hi = [r[f"{which}_hi"] for r in rows]
        pos = x if numeric else [xs.index(v) for v in x]
        yerr = [
            [max(0.0, a - b) for a, b in zip(y, lo, strict=True)],
            [max(0.0, b - a) for a, b in zip(y, hi, strict=True)],
        ]
        ax.errorbar(pos, y, yerr=yerr, marker="o", capsize=3, label=label)
        series.append({"label": label, "x": x, "y": y, "lo": lo, "hi": hi})
    if not numeric:
        ax.set_xticks(range(len(xs)))
        ax.set_xticklabels([str(v) for v in xs])
    elif len(xs) > 1 and min(xs) > 0 and max(xs) / min(xs) >= 8:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(axis)
    ax.set_ylabel(f"{t.grid['metric']} ({which}, mean over seeds)")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return series


def plot_learning_curves(t: GridTables, ax: Any = None) -> list[dict[str, Any]]:
    """Metric against steps per cell: the mean over seeds (chosen learning rate) at each
    step where every seed has a value or has already stopped. A seed that stopped before a
    step (early stop: it reached the threshold) counts with its last value there, so a
    cell's curve runs to its longest seed instead of ending where its first seed stopped.
    Returns the series drawn: label, x (steps), y."""
    import matplotlib.pyplot as plt

    ax = ax or plt.gca()
    picked = t.points[t.points["chosen"]]
    series = []
    for cell, group in picked.groupby("cell", sort=False):
        curves = [dict(t.histories[pid]) for pid in group["id"]]
        curves = [c for c in curves if c]
        steps = [
            s for s in sorted(set().union(*curves)) if all(s in c or s > max(c) for c in curves)
        ]
        y = [sum(c.get(s, c[max(c)]) for c in curves) / len(curves) for s in steps]
        ax.plot(steps, y, marker=".", label=cell)
        series.append({"label": cell, "x": steps, "y": y})
    ax.set_xlabel("step")
    ax.set_ylabel(f"{t.grid['metric']} (mean over seeds)")
    ax.legend(fontsize="x-small")
    ax.grid(alpha=0.3)
    return series


def write_plots(t: GridTables, folder: Path) -> dict[str, Path]:
    """One PNG per axis (``variant`` too when there is no axis) and the learning curves."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    files = {}
    axes = list(t.grid["axes"]) or ["variant"]
    for axis in axes:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        plot_metric_vs_axis(t, axis, ax)
        ax.set_title(f"grid {t.grid['name']}: {t.grid['metric']} vs {axis}")
        name = f"metric_vs_{_safe(axis)}.png"
        fig.tight_layout()
        fig.savefig(folder / name, dpi=100)
        plt.close(fig)
        files[name] = folder / name
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    plot_learning_curves(t, ax)
    ax.set_title(f"grid {t.grid['name']}: learning curves")
    fig.tight_layout()
    fig.savefig(folder / "learning_curves.png", dpi=100)
    plt.close(fig)
    files["learning_curves.png"] = folder / "learning_curves.png"
    return files


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
