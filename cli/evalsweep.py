"""``mixstack eval`` with ``--task``, ``--lengths``, ``--depths``, ``--out``: the task a
model is evaluated on, and sweeps over context lengths and needle depths
(:mod:`mixstack.evaluation.sweep`). Registered as options of ``mixstack eval``
(cli/main.py calls in here)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixstack.dsl.errors import MixstackError, SpecError

if TYPE_CHECKING:
    from mixstack.archs.models import MixStackModel
    from mixstack.evaluation.sweep import SweepModel


def train_for(
    model: MixStackModel,
    model_dir: Path,
    found_spec: Path | None,
    *,
    spec: str | None,
    overrides: list[str],
    task: str | None,
    lengths: list[int] | None = None,
) -> tuple[dict[str, Any], int | None, str]:
    """(train section, training length or None, where it came from) for ``model``: the
    ``--spec``'s or the run's train section, its task replaced by ``--task`` at the
    registered defaults, then the overrides; validated against the model (its
    ``max_seq_len`` raised to the longest swept length, which only the task sees)."""
    from mixstack.dsl.loader import load_spec
    from mixstack.evaluation.sweep import replace_task

    run_spec = found_spec or model_dir.parent / "spec.yaml"
    source = spec or (str(run_spec) if run_spec.is_file() else None)
    if source is None and task is None:
        raise MixstackError(
            f"{model_dir} is not inside a run directory; pass --spec SPEC (a spec with a "
            "train: section naming the task) or --task NAME"
        )
    train: dict[str, Any] | None = None
    train_len = None
    if source is not None:
        train = load_spec(source).to_dict().get("train")
        if train is None and task is None:
            raise MixstackError(
                f"{source} has no train: section; pass a spec with one, or --task NAME"
            )
        if train is not None:
            train_len = int(train["task"]["seq_len"])
    if task is not None:
        train = replace_task(train, task)
        if lengths:
            train["task"]["seq_len"] = max(lengths)  # each cell sets its own length
    assert train is not None
    shown = f"--task {task}" + (f" over {source}" if source else "") if task else str(source)
    return _with_overrides(model, train, overrides, lengths), train_len, shown


def _with_overrides(
    model: MixStackModel, train: dict[str, Any], overrides: list[str], lengths: list[int] | None
) -> dict[str, Any]:
    """``train`` with the overrides applied, validated against the model (its
    ``max_seq_len`` raised to the longest swept length, which only the task sees)."""
    from mixstack.dsl.loader import load_spec

    model_section = dict(model.spec.canonical())
    model_section["max_seq_len"] = max([model.spec.max_seq_len, *(lengths or [])])
    try:
        loaded = load_spec({"model": model_section, "train": train}, overrides)
    except SpecError as exc:
        if not lengths:
            raise
        raise MixstackError(f"--lengths {max(lengths)}: {exc}") from None
    return loaded.to_dict()["train"]


def _sweep_models(
    sources: list[Path],
    *,
    spec: str | None,
    overrides: list[str],
    task: str | None,
    lengths: list[int] | None,
    allow_unverified: bool,
) -> list[SweepModel]:
    from mixstack.cli.verify import model_dir_of
    from mixstack.evaluation.sweep import SweepModel, is_grid_dir, models_from_grid
    from mixstack.hub.modeldir import load_model_dir

    models: list[SweepModel] = []
    for path in sources:
        if is_grid_dir(path):
            if spec is not None:
                raise MixstackError(
                    f"{path} is a grid directory: each point is evaluated on its own spec's "
                    "task; --spec applies to model directories only (--task and KEY=VALUE "
                    "overrides apply to every point)"
                )
            for point in models_from_grid(path, task=task, allow_unverified=allow_unverified):
                point.train = _with_overrides(point.model, point.train, overrides, lengths)
                models.append(point)
            continue
        model_dir, found_spec = model_dir_of(path)
        model = load_model_dir(model_dir, allow_unverified=allow_unverified)
        train, train_len, _ = train_for(
            model,
            model_dir,
            found_spec,
            spec=spec,
            overrides=overrides,
            task=task,
            lengths=lengths,
        )
        models.append(SweepModel(str(path), model, train, train_len))
    labels = [m.label for m in models]
    if len(set(labels)) != len(labels):
        raise MixstackError(f"a model is given twice: {', '.join(labels)}")
    return models


def eval_sweep(
    model_dirs: list[Path],
    overrides: list[str],
    *,
    spec: str | None,
    task: str | None,
    lengths: str | None,
    depths: str | None,
    out: Path | None,
    metric: str | None,
    batch_size: int | None,
    allow_unverified: bool,
) -> None:
    """Sweep every model (model, run or grid directories) over the length × depth cells;
    print the table; with ``out`` write eval.csv, heatmap.png and capacity.png."""
    from rich.table import Table
    from rich.text import Text

    from mixstack.cli.main import _stdout
    from mixstack.evaluation import sweep as sw

    length_list = sw.parse_lengths(lengths) if lengths is not None else None
    depth_list = sw.parse_depths(depths) if depths is not None else None
    if out is not None and out.exists() and not out.is_dir():
        raise MixstackError(f"--out {out} is a file, not a folder")
    models = _sweep_models(
        model_dirs,
        spec=spec,
        overrides=overrides,
        task=task,
        lengths=length_list,
        allow_unverified=allow_unverified,
    )
    console = _stdout()
    rows = sw.sweep(
        models,
        length_list,
        depth_list,
        batch_size=batch_size,
        skip_refused=len(models) > 1,
        progress=lambda line: console.print(Text(line)),
    )
    task_type = models[0].train["task"]["type"]
    chosen = metric or sw.default_metric(rows, task_type)
    extra = [c for c in rows[0] if c in models[0].extra]
    if chosen not in sw.metric_columns(rows, extra):
        raise MixstackError(
            f"--metric {chosen!r} is not among this task's metrics: "
            f"{', '.join(sw.metric_columns(rows, extra))}"
        )
    table = Table(title=f"mixstack eval: {task_type} sweep", title_justify="left")
    for column in ("model", "length", "depth", chosen, "n", "beyond max_seq_len", "beyond train"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in rows:
        value = row[chosen]
        table.add_row(
            str(row["model"]),
            str(row["length"]),
            "-" if row["depth"] is None else f"{row['depth']:g}",
            "refused" if math.isnan(value) else f"{value:.4f}",
            str(row["n"]),
            "yes" if row["beyond_max_seq_len"] else "no",
            {True: "yes", False: "no", None: "?"}[row["beyond_train_len"]],
        )
    console.print(table)
    for row in rows:
        if row["status"] == "refused":
            console.print(
                Text(f"refused: {sw.refusal(_model_of(models, row), row['length'], row['model'])}")
            )
    if out is not None:
        files = sw.write_outputs(rows, out, chosen)
        console.print(Text("wrote " + ", ".join(str(p) for p in files.values())))
    bad = [
        f"{r['model']} length {r['length']}: {chosen} = {r[chosen]}"
        for r in rows
        if r["status"] == "ok" and not math.isfinite(r[chosen])
    ]
    if bad:
        raise MixstackError(f"non-finite metrics ({'; '.join(bad)})")


def _model_of(models: list[SweepModel], row: dict[str, Any]) -> MixStackModel:
    return next(m.model for m in models if m.label == row["model"])
