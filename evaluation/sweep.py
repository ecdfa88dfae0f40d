"""Sweeps of a task over context lengths and needle depths: ``eval.csv``, a length ×
depth heatmap and the state-capacity curve (accuracy against context length).

One *cell* is one evaluation of one model on the task's fixed validation set with
``train.task.seq_len = length`` (and ``train.task.depth = depth`` for a task with a
depth, such as ``passkey``): the same samples, batching and metrics as
:func:`mixstack.training.evaluate.evaluate`.

Lengths above a model's ``max_seq_len``: the parallel forward pass refuses them (RoPE
tables, convolution kernels and position embeddings are sized by it), so a model whose
every layer keeps a bounded decode state (``MixStackModel.unbounded_state_reasons()``
empty: recurrences, MLPs, windowed attention) runs the first ``max_seq_len`` tokens
through one prefill and the rest through ``model.step``, one token at a time, the path
generation takes past ``max_seq_len``. Any other model is refused, naming the length,
``max_seq_len`` and the layers whose state grows.
"""

from __future__ import annotations

import csv
import io
import math
import os
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mixstack.dsl.errors import MixstackError, SpecError

if TYPE_CHECKING:
    from mixstack.archs.models import MixStackModel
    from mixstack.dsl.spec import Spec

#: Columns of ``eval.csv`` before the metrics (a grid adds its variant/axes/seed/point
#: columns after ``model``).
LEAD_COLUMNS = ("model",)
CELL_COLUMNS = ("length", "depth", "max_seq_len", "train_len")
TAIL_COLUMNS = ("n", "beyond_max_seq_len", "beyond_train_len", "status")


class SweepError(MixstackError):
    """A sweep cannot run as asked (bad lengths or depths, a refused length)."""


# -- parsing the options -------------------------------------------------------------------


def parse_lengths(text: str, option: str = "--lengths") -> list[int]:
    """``"256,512,1024"`` -> ``[256, 512, 1024]``: positive integers, no repeats."""
    items = [s.strip() for s in str(text).split(",")]
    if not text or not str(text).strip() or any(not s for s in items):
        raise SweepError(
            f"{option} {text!r}: expected a comma-separated list of positive integers, "
            "e.g. 256,512,1024"
        )
    out = []
    for s in items:
        try:
            value = int(s)
        except ValueError:
            raise SweepError(
                f"{option}: {s!r} is not an integer; expected positive integers, e.g. 256,512"
            ) from None
        if value < 1:
            raise SweepError(f"{option}: {value} is not a positive length")
        out.append(value)
    if len(set(out)) != len(out):
        raise SweepError(f"{option} {text!r} repeats a length")
    return out


def parse_depths(text: str, option: str = "--depths") -> list[float]:
    """``"0,0.5,1"`` -> ``[0.0, 0.5, 1.0]``: numbers in [0, 1], no repeats."""
    items = [s.strip() for s in str(text).split(",")]
    if not text or not str(text).strip() or any(not s for s in items):
        raise SweepError(
            f"{option} {text!r}: expected a comma-separated list of numbers in [0, 1], "
            "e.g. 0,0.25,0.5,0.75,1"
        )
    out = []
    for s in items:
        try:
            value = float(s)
        except ValueError:
            raise SweepError(
                f"{option}: {s!r} is not a number; expected values in [0, 1]"
            ) from None
        if not 0.0 <= value <= 1.0:  # NaN fails this too
            raise SweepError(f"{option}: depth {s} is outside [0, 1] (0: first, 1: last)")
        out.append(value)
    if len(set(out)) != len(out):
        raise SweepError(f"{option} {text!r} repeats a depth")
    return out


def task_has_depth(task_type: str) -> bool:
    """Whether the registered task's config has a ``depth`` field (``passkey``)."""
    from mixstack.dsl import registry

    return "depth" in registry.tasks.get(task_type).config_cls.model_fields


def replace_task(train: dict[str, Any] | None, task: str) -> dict[str, Any]:
    """``train`` (a train section, or None for the defaults) with ``train.task`` replaced
    by the registered task ``task`` at its defaults (``--task``)."""
    from mixstack.dsl import registry

    if task not in registry.tasks.names():
        try:
            registry.tasks.get(task)
        except MixstackError as exc:
            raise SweepError(f"--task: {exc}") from None
    return with_length({**(train or {}), "task": {"type": task}})


def with_length(train: dict[str, Any]) -> dict[str, Any]:
    """A train section must say how long a run trains even when nothing trains:
    ``max_steps: 1`` when it gives neither ``max_steps`` nor ``max_epochs``."""
    if train.get("max_steps") is None and train.get("max_epochs") is None:
        return {**train, "max_steps": 1}
    return train


# -- models past max_seq_len ---------------------------------------------------------------


def refusal(model: MixStackModel, length: int, label: str = "the model") -> str | None:
    """Why ``model`` cannot evaluate sequences of ``length`` tokens, or None when it can
    (``length <= max_seq_len``, or every layer's state is bounded)."""
    msl = model.spec.max_seq_len
    if length <= msl:
        return None
    reasons: list[str] = []
    if model.spec.arch != "causal_lm":
        reasons.append(f"arch {model.spec.arch!r} has no decode path (only causal_lm has one)")
    else:
        symbols, configs = model.spec.layers.symbols_in_order, model.spec.layer_configs()
        for i, caps in enumerate(model.layer_capabilities):
            if not caps.decode:
                reasons.append(
                    f"layer {i} (symbol {symbols[i]!r}, type {configs[i].type!r}) cannot decode"
                )
        reasons += model.unbounded_state_reasons()
    if not reasons:
        return None
    return (
        f"length {length} exceeds max_seq_len {msl} of {label}; past max_seq_len only a "
        "causal_lm whose every layer keeps a bounded state (recurrences, MLPs, windowed "
        "attention) can run, through its decode path, but: " + "; ".join(reasons)
    )


@torch.no_grad()
def lm_logits(model: MixStackModel, input_ids: Tensor) -> Tensor:
    """``input_ids (B, L)`` -> logits ``(B, L, V)`` for any ``L``.

    ``L <= max_seq_len``: the parallel forward. Longer: ``model(ids[:, :max_seq_len],
    state=...)`` fills the decode state (and gives the first ``max_seq_len`` logits),
    then one ``model.step`` per remaining token; a model with a growing state is refused
    (:func:`refusal`)."""
    msl = model.spec.max_seq_len
    batch, length = input_ids.shape
    if length <= msl:
        return model(input_ids)
    why = refusal(model, length)
    if why is not None:
        from mixstack.dsl.errors import CapabilityError

        raise CapabilityError(why)
    state = model.init_state(batch, length)
    head = model(input_ids[:, :msl], state=state)  # (B, msl, V), state filled
    tail = [model.step(input_ids[:, t], state) for t in range(msl, length)]  # each (B, V)
    return torch.cat([head, torch.stack(tail, dim=1)], dim=1)


# -- one cell ------------------------------------------------------------------------------


def cell_spec(
    model: MixStackModel, train: dict[str, Any], length: int, depth: float | None
) -> Spec:
    """The validated spec of one cell: the model's architecture (``max_seq_len`` raised to
    ``length`` when it is longer: only the task's checks see it) with ``train.task``'s
    ``seq_len`` (and ``depth``) set."""
    from mixstack.dsl.loader import load_spec

    task = {**train["task"], "seq_len": length}
    if depth is not None:
        task["depth"] = depth
    model_section = dict(model.spec.canonical())
    model_section["max_seq_len"] = max(length, model.spec.max_seq_len)
    where = f"length {length}" + ("" if depth is None else f", depth {depth:g}")
    try:
        return load_spec({"model": model_section, "train": with_length({**train, "task": task})})
    except SpecError as exc:
        raise SweepError(f"the task does not fit the cell ({where}): {exc}") from None


def evaluate_cell(
    model: MixStackModel, spec: Spec, *, batch_size: int | None = None
) -> tuple[dict[str, float], int]:
    """(metrics, samples) of ``model`` on the validation set of ``spec.train.task``, as
    :func:`mixstack.training.evaluate.evaluate` computes them, at any length
    (:func:`lm_logits`)."""
    from mixstack.training.evaluate import validation_metrics

    return validation_metrics(model, spec, batch_size=batch_size, forward=_cell_forward)


def _cell_forward(model: MixStackModel, batch: dict[str, Tensor]) -> Tensor:
    """Logits of a validation batch; a causal LM's rows without packing go through
    :func:`lm_logits` (past ``max_seq_len`` for bounded-state models)."""
    if "seq_idx" in batch or model.spec.arch != "causal_lm":
        return model(batch["input_ids"], seq_idx=batch.get("seq_idx"))
    return lm_logits(model, batch["input_ids"])


# -- the sweep -----------------------------------------------------------------------------


@dataclass
class SweepModel:
    """One model of a sweep: its label (``eval.csv``'s ``model`` column), the train
    section whose task it is evaluated on, its training length (None: unknown) and extra
    columns (a grid point's variant, axes, seed and id)."""

    label: str
    model: MixStackModel
    train: dict[str, Any]
    train_len: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _cells(
    sm: SweepModel, lengths: Sequence[int] | None, depths: Sequence[float] | None
) -> list[tuple[int, float | None]]:
    task = sm.train["task"]
    has_depth = task_has_depth(task["type"])
    if depths is not None and not has_depth:
        raise SweepError(
            f"--depths: task {task['type']!r} has no depth (only tasks with a `depth` "
            "field, such as passkey, take --depths)"
        )
    ls = list(lengths) if lengths else [int(task.get("seq_len", 0)) or _default_len(task)]
    ds: list[float | None] = list(depths) if depths is not None else [None]
    return [(length, depth) for length in ls for depth in ds]


def _default_len(task: dict[str, Any]) -> int:
    from mixstack.dsl import registry

    return int(registry.tasks.get(task["type"]).config_cls.model_fields["seq_len"].default)


def sweep(
    models: Sequence[SweepModel],
    lengths: Sequence[int] | None = None,
    depths: Sequence[float] | None = None,
    *,
    batch_size: int | None = None,
    skip_refused: bool = False,
    progress: Callable[[str], object] | None = None,
) -> list[dict[str, Any]]:
    """One row per (model, length, depth): ``model``, the extra columns, ``length``,
    ``depth`` (None: the task's own, or a task without depth), ``max_seq_len``,
    ``train_len``, every metric, ``n`` (samples), ``beyond_max_seq_len``,
    ``beyond_train_len`` and ``status`` (``ok``, or ``refused`` with NaN metrics).

    Every cell is checked before anything is evaluated: a length a model cannot run is a
    :class:`SweepError` naming it, or with ``skip_refused`` a ``refused`` row."""
    if not models:
        raise SweepError("nothing to sweep: no model given")
    plan: list[tuple[SweepModel, int, float | None, Spec | None]] = []
    for sm in models:
        for length, depth in _cells(sm, lengths, depths):
            why = refusal(sm.model, length, sm.label)
            if why is not None and not skip_refused:
                raise SweepError(why)
            spec = None if why else cell_spec(sm.model, sm.train, length, depth)
            plan.append((sm, length, depth, spec))
    rows: list[dict[str, Any]] = []
    for sm, length, depth, spec in plan:
        msl = sm.model.spec.max_seq_len
        if spec is None:
            metrics, n, status = {}, 0, "refused"
        else:
            metrics, n = evaluate_cell(sm.model, spec, batch_size=batch_size)
            status = "ok"
        row = {
            "model": sm.label,
            **sm.extra,
            "length": length,
            "depth": depth,
            "max_seq_len": msl,
            "train_len": sm.train_len,
            **metrics,
            "n": n,
            "beyond_max_seq_len": length > msl,
            "beyond_train_len": None if sm.train_len is None else length > sm.train_len,
            "status": status,
        }
        rows.append(row)
        if progress is not None:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) or status
            where = f"length {length}" + ("" if depth is None else f" depth {depth:g}")
            progress(f"{sm.label}: {where}: {shown}")
    return _fill_metrics(rows)


def _fill_metrics(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every row gets every column (NaN for a metric a refused row lacks), in one order."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    tail = [c for c in TAIL_COLUMNS if c in columns]
    order = [c for c in columns if c not in tail] + tail
    return [{c: row.get(c, math.nan) for c in order} for row in rows]


def metric_columns(rows: Sequence[dict[str, Any]], extra: Sequence[str] = ()) -> list[str]:
    """The metric columns of sweep rows (what is neither fixed nor an extra column)."""
    fixed = {*LEAD_COLUMNS, *CELL_COLUMNS, *TAIL_COLUMNS, *extra}
    return [c for c in (rows[0] if rows else {}) if c not in fixed]


# -- eval.csv ------------------------------------------------------------------------------


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return value


def write_csv(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """``rows`` as CSV, written atomically (a temporary file, then a rename)."""
    from mixstack.training.rundir import write_atomic

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(v) for k, v in row.items()})
    path = Path(path)
    write_atomic(path, buffer.getvalue())
    return path


# -- plots ---------------------------------------------------------------------------------


def _by_model(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        out.setdefault(str(row["model"]), []).append(row)
    return out


def _depth_key(depth: Any) -> float:
    # a missing depth (the task's own, uniform) sorts as one column
    return -1.0 if depth is None or (isinstance(depth, float) and math.isnan(depth)) else depth


def heatmap_series(rows: Sequence[dict[str, Any]], metric: str) -> dict[str, dict[str, Any]]:
    """Per model: ``lengths``, ``depths`` (None: uniform), ``values[i][j]`` the metric at
    depth i and length j (NaN where refused) and ``train_len``."""
    out = {}
    for label, group in _by_model(rows).items():
        lengths = sorted({int(r["length"]) for r in group})
        depths = sorted({_depth_key(r["depth"]) for r in group})
        cell = {(int(r["length"]), _depth_key(r["depth"])): float(r[metric]) for r in group}
        values = [[cell.get((n, d), math.nan) for n in lengths] for d in depths]
        out[label] = {
            "lengths": lengths,
            "depths": [None if d == -1.0 else d for d in depths],
            "values": values,
            "train_len": group[0]["train_len"],
        }
    return out


def capacity_series(rows: Sequence[dict[str, Any]], metric: str) -> dict[str, dict[str, Any]]:
    """Per model: ``lengths`` and ``values`` (the metric averaged over depths; NaN where
    refused) and ``train_len``: the state-capacity curve."""
    out = {}
    for label, series in heatmap_series(rows, metric).items():
        columns = list(zip(*series["values"], strict=True))  # per length: values over depths
        values = [
            math.nan if any(math.isnan(v) for v in col) else sum(col) / len(col) for col in columns
        ]
        out[label] = {
            "lengths": series["lengths"],
            "values": values,
            "train_len": series["train_len"],
        }
    return out


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_heatmap(
    rows: Sequence[dict[str, Any]], metric: str, path: str | os.PathLike[str]
) -> dict[str, dict[str, Any]]:
    """One panel per model: depth (rows) × length (columns), ``metric`` as colour, the
    value written in each cell; the training length's column boxed. Writes ``path``
    (PNG) and returns the series drawn (:func:`heatmap_series`)."""
    plt = _pyplot()
    series = heatmap_series(rows, metric)
    n = len(series)
    cols = min(n, 3)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(
        nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False, layout="constrained"
    )
    image = None
    for ax, (label, s) in zip(axes.flat, series.items(), strict=False):
        image = ax.imshow(s["values"], vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(s["lengths"])), [str(x) for x in s["lengths"]])
        ax.set_yticks(
            range(len(s["depths"])),
            ["uniform" if d is None else f"{d:g}" for d in s["depths"]],
        )
        for i, line in enumerate(s["values"]):
            for j, v in enumerate(line):
                text = "refused" if math.isnan(v) else f"{v:.2f}"
                shade = "k" if math.isnan(v) or v > 0.6 else "w"  # readable on yellow/blank
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color=shade)
        if s["train_len"] in s["lengths"]:
            j = s["lengths"].index(s["train_len"])
            ax.add_patch(
                plt.Rectangle(
                    (j - 0.5, -0.5), 1, len(s["depths"]), fill=False, edgecolor="red", lw=2
                )
            )
        ax.set_xlabel("context length" + (" (red: training length)" if s["train_len"] else ""))
        ax.set_ylabel("depth")
        ax.set_title(textwrap.fill(label, 48), fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=list(axes.flat), label=metric)
    fig.savefig(Path(path), dpi=100)
    plt.close(fig)
    return series


def plot_capacity(
    rows: Sequence[dict[str, Any]], metric: str, path: str | os.PathLike[str]
) -> dict[str, dict[str, Any]]:
    """The state-capacity curve: ``metric`` (mean over depths) against context length,
    one line per model, a dotted line at each training length. Writes ``path`` (PNG) and
    returns the series drawn (:func:`capacity_series`)."""
    plt = _pyplot()
    series = capacity_series(rows, metric)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    marked = set()
    for label, s in series.items():
        ax.plot(s["lengths"], s["values"], marker="o", label=label)
        if s["train_len"] and s["train_len"] not in marked:
            marked.add(s["train_len"])
            ax.axvline(s["train_len"], color="grey", ls=":", lw=1)
    lengths = sorted({n for s in series.values() for n in s["lengths"]})
    if len(lengths) > 1 and lengths[-1] / lengths[0] >= 4:
        ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("context length" + (" (dotted: training length)" if marked else ""))
    ax.set_ylabel(f"{metric} (mean over depths)")
    ax.legend(fontsize="x-small", loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(Path(path), dpi=100)
    plt.close(fig)
    return series


def default_metric(rows: Sequence[dict[str, Any]], task_type: str) -> str:
    """The task's own metric (``passkey_exact``) when it has one, else ``accuracy``."""
    from mixstack.dsl import registry

    own = list(registry.tasks.get(task_type).metrics)
    columns = metric_columns(rows)
    for name in [*own, "accuracy"]:
        if name in columns:
            return name
    raise SweepError(f"no metric to plot among {columns}")


def write_outputs(
    rows: Sequence[dict[str, Any]], out: str | os.PathLike[str], metric: str
) -> dict[str, Path]:
    """``eval.csv``, ``heatmap.png`` and ``capacity.png`` in folder ``out``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SweepError(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    if metric not in metric_columns(rows, _extra_columns(rows)):
        raise SweepError(
            f"--metric {metric!r} is not among the metrics of this task: "
            f"{', '.join(metric_columns(rows, _extra_columns(rows)))}"
        )
    files = {"eval.csv": write_csv(rows, out / "eval.csv")}
    for name, draw in (("heatmap.png", plot_heatmap), ("capacity.png", plot_capacity)):
        tmp = out / f".{name}.tmp.png"
        draw(rows, metric, tmp)
        os.replace(tmp, out / name)  # atomic: an old plot is never half overwritten
        files[name] = out / name
    return files


def _extra_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    columns = list(rows[0]) if rows else []
    end = columns.index("length") if "length" in columns else 0
    return columns[1:end]


# -- sources: model directories, run directories, grid directories -------------------------


def models_from_grid(
    grid_dir: str | os.PathLike[str],
    *,
    task: str | None = None,
    allow_unverified: bool = False,
    all_lrs: bool = False,
) -> list[SweepModel]:
    """Every finished point of a grid directory as a :class:`SweepModel` labelled by its
    cell and seed, with ``variant``, the axes, ``seed`` and ``point`` as extra columns.

    A grid with an ``lr`` list trains one sub-run per learning rate for each cell and
    seed. Only the sub-run the grid report chooses is swept (the best value of the grid's
    metric in its direction, :func:`mixstack.ablate.reporting.tables`' ``chosen``), or
    with ``all_lrs`` every finished one; either way ``lr`` is a column and the label ends
    in ``lr VALUE``."""
    from mixstack.ablate.runner import GridDir
    from mixstack.dsl.loader import load_spec
    from mixstack.hub.modeldir import load_model_dir

    gd = GridDir(Path(grid_dir))
    plan = gd.read_plan()
    has_lrs = bool(plan.get("lrs"))
    chosen: set[str] | None = None
    if has_lrs and not all_lrs:
        from mixstack.ablate.reporting import tables

        points = tables(grid_dir).points
        chosen = set(points.loc[points["chosen"], "id"])
    out = []
    for pt in plan["points"]:
        if gd.read_status(pt["id"])["state"] != "finished":
            continue
        if chosen is not None and pt["id"] not in chosen:
            continue  # a learning-rate sub-run the report did not choose
        run = gd.run_dir(pt["id"])
        model = load_model_dir(run / "model", allow_unverified=allow_unverified)
        train = load_spec(str(run / "spec.yaml")).to_dict()["train"]
        train_len = int(train["task"]["seq_len"])
        if task is not None:
            train = replace_task(train, task)
        axes = {a: pt["axes"].get(a) for a in plan["axes"]}
        # "mamba2 | d_state=4, n_heads=2": the last part of each axis key
        short = ", ".join(f"{a.rsplit('.', 1)[-1]}={v}" for a, v in axes.items())
        label = " | ".join(part for part in (pt["variant"], short) if part)
        label = (label or pt["cell"]) + (f" seed {pt['seed']}" if len(plan["seeds"]) > 1 else "")
        extra = {"variant": pt["variant"], **axes, "seed": pt["seed"]}
        if has_lrs:
            label += f" lr {pt['lr']:g}"
            extra["lr"] = pt["lr"]
        extra["point"] = pt["id"]
        out.append(SweepModel(label, model, train, train_len, extra))
    if not out:
        why = (
            " with a value of its metric (the report chooses among the learning-rate "
            "sub-runs by it)"
            if chosen is not None
            else ""
        )
        raise SweepError(f"{grid_dir}: no finished point{why} to evaluate (mixstack grid status)")
    return out


def is_grid_dir(path: str | os.PathLike[str]) -> bool:
    from mixstack.ablate.runner import GRID_FILE

    return (Path(path) / GRID_FILE).is_file()
