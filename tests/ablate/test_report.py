"""Reports: numbers equal each point's metrics.csv, bootstrap intervals against the exact
bootstrap distribution, paired differences, plots return what they drew, PNGs read back."""

from __future__ import annotations

import csv
import itertools
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from mixstack.ablate.runner import GridDir, prepare

GRID = """\
base: base.yaml
axes:
  model.d_model: [16, 32]
variants:
  att: {model.layers.pattern: "*-"}
  ssm: {model.layers.pattern: "M-"}
seeds: [0, 1, 2, 3, 4]
lr: [0.001, 0.01]
metric: val/accuracy
"""


@pytest.fixture
def fake_grid(write_grid, tmp_path) -> Path:
    """A grid directory whose points "finished" with made-up metrics.csv files (the
    report only reads files; training is tested in test_runner.py)."""
    return _fake(write_grid(GRID), tmp_path / "out")


def _fake(grid: Path, out: Path) -> Path:
    plan = prepare(grid, out, retry_failed=False)
    gd = GridDir(out)
    rng = random.Random(7)
    for pt in plan.points:
        run = gd.run_dir(pt.id)
        run.mkdir(parents=True)
        rows = [
            {"epoch": 0, "step": s, "train/loss": round(rng.uniform(1, 3), 4)} for s in range(4)
        ]
        for s in (1, 3):  # validation rows (Lightning: index of the step before)
            rows.append({"epoch": 0, "step": s, "val/accuracy": round(rng.random(), 4)})
        with (run / "metrics.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, ["epoch", "step", "train/loss", "val/accuracy"])
            w.writeheader()
            w.writerows(rows)
        status = gd.read_status(pt.id)
        status.update(state="finished", wall_s=rng.uniform(1, 2))
        gd.write_status(pt.id, status)
    return out


def _csv_metric(run: Path) -> list[float]:
    with (run / "metrics.csv").open(newline="") as f:
        return [float(r["val/accuracy"]) for r in csv.DictReader(f) if r["val/accuracy"]]


def _exact_bootstrap_quantile(values: list[float], q: float) -> float:
    """Quantile of the mean over every one of the n^n resamples (the exact bootstrap)."""
    means = sorted(sum(c) / len(c) for c in itertools.product(values, repeat=len(values)))
    return means[min(len(means) - 1, int(q * len(means)))]


def test_report_equals_metrics_csv(fake_grid):
    from mixstack.ablate import report
    from mixstack.ablate.reporting import tables

    t = tables(fake_grid)
    gd = GridDir(fake_grid)
    plan = gd.read_plan()
    assert len(t.points) == 40
    chosen: dict[tuple[str, int], tuple[float, float, dict]] = {}
    for pt, row in zip(plan["points"], t.points.to_dict("records"), strict=True):
        values = _csv_metric(gd.run_dir(pt["id"]))
        assert row["best"] == max(values) and row["last"] == values[-1]
        key = (pt["cell"], pt["seed"])
        if key not in chosen or max(values) > chosen[key][0]:
            chosen[key] = (max(values), values[-1], pt)
    summary = report(fake_grid)
    assert len(summary) == 4
    for row in summary.to_dict("records"):
        best = [chosen[(row["cell"], s)][0] for s in range(5)]
        last = [chosen[(row["cell"], s)][1] for s in range(5)]
        assert row["n_seeds"] == 5 and row["n_points"] == 10
        assert row["best_mean"] == pytest.approx(sum(best) / 5)
        assert row["best_std"] == pytest.approx(np.std(best, ddof=1))
        assert row["last_mean"] == pytest.approx(sum(last) / 5)
        assert row["interval"] == "bootstrap95"
        assert (
            _exact_bootstrap_quantile(best, 0.015)
            <= row["best_lo"]
            <= _exact_bootstrap_quantile(best, 0.035)
        )
        assert (
            _exact_bootstrap_quantile(best, 0.965)
            <= row["best_hi"]
            <= _exact_bootstrap_quantile(best, 0.985)
        )
        pt = chosen[(row["cell"], 0)][2]
        assert row["params"] == pt["params"] and row["tokens"] == pt["tokens"]
        walls = t.points[t.points["cell"] == row["cell"]]["wall_s"]
        assert row["wall_s"] == pytest.approx(sum(walls))
    # the chosen learning rates are the best sub-runs, per cell and seed
    picked = t.points[t.points["chosen"]]
    assert len(picked) == 20
    for r in picked.to_dict("records"):
        assert r["best"] == chosen[(r["cell"], r["seed"])][0]
    # paired differences: ssm minus att, seed by seed
    d = t.differences
    assert list(d["variant"]) == ["ssm", "ssm"] and list(d["reference"]) == ["att", "att"]
    for row in d.to_dict("records"):
        width = row["model.d_model"]
        diffs = [
            chosen[(f"ssm | model.d_model={width}", s)][0]
            - chosen[(f"att | model.d_model={width}", s)][0]
            for s in range(5)
        ]
        assert row["n_pairs"] == 5
        assert row["best_diff_mean"] == pytest.approx(sum(diffs) / 5)


def test_few_seeds_give_min_max(write_grid, tmp_path):
    from mixstack.ablate.reporting import interval

    assert interval([0.2, 0.5]) == (0.2, 0.5, "minmax")
    assert interval([0.3]) == (0.3, 0.3, "minmax")
    lo, hi, kind = interval([0.25, 0.25, 0.25])
    assert (lo, hi, kind) == (0.25, 0.25, "bootstrap95")


def test_plots_return_what_the_table_holds(fake_grid, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    from mixstack.ablate.reporting import (
        plot_learning_curves,
        plot_metric_vs_axis,
        tables,
        write_report,
    )

    t = tables(fake_grid)
    fig, ax = plt.subplots()
    series = plot_metric_vs_axis(t, "model.d_model", ax)
    assert [s["label"] for s in series] == ["att", "ssm"]
    for s in series:
        rows = t.summary[t.summary["variant"] == s["label"]].sort_values("model.d_model")
        assert s["x"] == list(rows["model.d_model"]) == [16, 32]
        assert s["y"] == list(rows["best_mean"])
        assert s["lo"] == list(rows["best_lo"]) and s["hi"] == list(rows["best_hi"])
        drawn = next(c for c in ax.containers if c.get_label() == s["label"])
        assert list(drawn.lines[0].get_ydata()) == s["y"]
    plt.close(fig)
    fig, ax = plt.subplots()
    curves = plot_learning_curves(t, ax)
    plt.close(fig)
    assert len(curves) == 4
    picked = t.points[t.points["chosen"]]
    for c in curves:
        assert c["x"] == [2, 4]
        ids = picked[picked["cell"] == c["label"]]["id"]
        for i, step in enumerate(c["x"]):
            values = [dict(t.histories[pid])[step] for pid in ids]
            assert c["y"][i] == pytest.approx(sum(values) / len(values))

    files = write_report(fake_grid, tmp_path / "rep")
    for name, path in files.items():
        if name.endswith(".png"):
            image = mpimg.imread(path)
            assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0.01
    assert set(files) >= {
        "summary.md",
        "summary.csv",
        "points.csv",
        "differences.csv",
        "metric_vs_model.d_model.png",
        "learning_curves.png",
    }
    import pandas as pd

    back = pd.read_csv(files["summary.csv"])
    assert list(back["best_mean"]) == pytest.approx(list(t.summary["best_mean"]))
    md = files["summary.md"].read_text()
    assert "| variant | model.d_model | n_seeds | best_mean |" in md
    first = t.summary.iloc[0]
    assert f"| att | 16 | 5 | {first['best_mean']:.4f} |" in md


def test_report_cli(fake_grid):
    from typer.testing import CliRunner

    from mixstack.cli.main import app

    result = CliRunner().invoke(app, ["grid", "report", str(fake_grid)])
    assert result.exit_code == 0, result.output
    assert (fake_grid / "report" / "summary.md").is_file()
    assert "paired differences" in result.output
    result = CliRunner().invoke(app, ["grid", "status", str(fake_grid)])
    assert result.exit_code == 0 and "finished 40" in result.output
    result = CliRunner().invoke(app, ["grid", "status", str(fake_grid / "nope")])
    assert result.exit_code == 1 and "is not a grid directory" in result.output


def test_unfinished_points_are_reported_as_missing(fake_grid):
    from mixstack.ablate import report

    gd = GridDir(fake_grid)
    first = gd.read_plan()["points"][0]["id"]
    status = gd.read_status(first)
    status.update(state="failed", error="RuntimeError: x")
    gd.write_status(first, status)
    row = report(fake_grid).iloc[0]
    assert row["finished"] == 9 and row["n_seeds"] == 5  # seed 0 keeps its other lr
    assert not math.isnan(row["best_mean"])
    json.dumps(list(report(fake_grid).columns))


def test_zipped_axes_share_one_line_per_variant(write_grid, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mixstack.ablate.reporting import plot_metric_vs_axis, tables

    text = GRID.replace(
        "  model.d_model: [16, 32]\n",
        "  zip:\n    - {model.d_model: [16, 32], model.layers.symbols.M.d_state: [4, 8]}\n",
    )
    t = tables(_fake(write_grid(text, "zip.yaml"), tmp_path / "zip"))
    fig, ax = plt.subplots()
    series = plot_metric_vs_axis(t, "model.d_model", ax)
    plt.close(fig)
    assert [s["label"] for s in series] == ["att", "ssm"]  # not one line per d_state
    for s in series:
        rows = t.summary[t.summary["variant"] == s["label"]].sort_values("model.d_model")
        assert s["x"] == [16, 32] and s["y"] == list(rows["best_mean"])
        assert list(rows["model.layers.symbols.M.d_state"]) == [4, 8]


def test_lr_column_without_an_lr_list_is_the_rate_each_point_trained_with(write_grid, tmp_path):
    """No grid `lr` list: the table shows the variant's `train.optimizer.lr`, or the
    base's (0.01 in conftest's base) for a variant that does not set one."""
    from mixstack.ablate.reporting import tables

    text = (
        GRID.replace("lr: [0.001, 0.01]\n", "")
        .replace('"*-"}', '"*-", train.optimizer.lr: 0.003}')
        .replace("seeds: [0, 1, 2, 3, 4]", "seeds: [0, 1, 2]")
    )
    assert "lr: [" not in text and "train.optimizer.lr: 0.003" in text
    t = tables(_fake(write_grid(text, "vlr.yaml"), tmp_path / "vlr"))
    assert len(t.points) == 12 and bool(t.points["chosen"].all())
    expected = {"att": 0.003, "ssm": 0.01}
    assert [expected[v] for v in t.points["variant"]] == list(t.points["lr"])
    assert {r["variant"]: r["lr"] for r in t.summary.to_dict("records")} == expected


def test_learning_curves_carry_an_early_stopped_seed_at_its_last_value(fake_grid):
    """A seed that stopped early (reached the threshold) holds its last value: the cell's
    curve runs to its longest seed and its mean there includes the stopped seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mixstack.ablate.reporting import plot_learning_curves, tables

    t = tables(fake_grid)
    picked = t.points[t.points["chosen"]]
    cell = picked["cell"].iloc[0]
    ids = list(picked[picked["cell"] == cell]["id"])
    stopped = ids[0]
    t.histories[stopped] = [(2, 0.99)]  # stopped after its first validation
    fig, ax = plt.subplots()
    curves = plot_learning_curves(t, ax)
    plt.close(fig)
    curve = next(c for c in curves if c["label"] == cell)
    assert curve["x"] == [2, 4]
    at4 = [0.99] + [dict(t.histories[pid])[4] for pid in ids[1:]]
    assert curve["y"][1] == pytest.approx(sum(at4) / len(at4))
    # a seed missing a step it did reach (a gap, not a stop) still drops that step
    t.histories[stopped] = [(4, 0.5)]
    fig, ax = plt.subplots()
    curve = next(c for c in plot_learning_curves(t, ax) if c["label"] == cell)
    plt.close(fig)
    assert curve["x"] == [4]
