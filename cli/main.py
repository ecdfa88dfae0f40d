"""The ``mixstack`` command: thin commands over the public Python API.

    mixstack [--plugin FILE.py]... [--debug] COMMAND ...

    validate SPEC [KEY=VALUE...]    load and check a spec; print its hash and pattern
    info SPEC [KEY=VALUE...]        layer table, ratios, parameters, state, FLOPs (meta build)
    train SPEC [KEY=VALUE...] [--out DIR] [--resume] [--overwrite]
                                    train with Lightning; run directory, model directory
    eval MODEL_DIR [KEY=VALUE...] [--spec SPEC] [--task T] [--lengths/--depths/--out]
                                    metrics of a model directory on a task's validation set
    verify MODEL_DIR                spec hash, data digests, tensor shapes/dtypes, no NaN
    schema [--out FILE]             JSON schema of the spec for editor completion
    registry list                   mixers, tasks, metrics and kernel providers, with origin
    zoo list | show NAME            presets shipped in mixstack/zoo (cli/zoo.py)
    bench [--suite S] [--check] ... speed and memory against references (docs/performance.md)
    push SRC REPO_ID [--revision B] [--private]
                                    upload a model/run directory to the Hugging Face Hub
    pull REPO_ID [--revision R] [--out DIR]
                                    download a Hub model, check it, print the commit
    grid plan|run|status|report     ablation grids (see mixstack.cli.grid)

SPEC is a YAML path, ``zoo:NAME`` or ``hf://ORG/NAME[@REVISION]`` (``--hub-endpoint``
picks the Hub); overrides are dotted ``key.path=value`` pairs
(values parsed as YAML). Exit codes: 0 ok, 1 a mixstack error (bad spec, unknown
backend, plugin failure, unwritable file), 2 bad command-line usage. Errors print as
one clean red message; ``--debug`` re-raises them with the traceback.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from mixstack.cli.verify import AllowUnverified, model_dir_of
from mixstack.cli.verify import verify as verify_command
from mixstack.dsl.errors import MixstackError
from mixstack.training.rundir import write_atomic

if TYPE_CHECKING:
    from mixstack.archs.report import LayerRow, Report
    from mixstack.dsl.spec import Spec
    from mixstack.training.run import RunResult

app = typer.Typer(
    name="mixstack",
    help="Build, inspect and compare sequence models made of matrix mixers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
registry_app = typer.Typer(
    help="What is registered: mixers, tasks, metrics, kernel providers.", no_args_is_help=True
)
app.add_typer(registry_app, name="registry")

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # the shell's code for a SIGINT-ended command


@dataclass
class _Options:
    debug: bool = False


# Piped or captured output has no terminal width; rich would assume 80 columns and fold
# the layer table into many lines per layer.
PIPE_WIDTH = 160


def _stdout() -> Console:
    return Console(highlight=False, width=None if sys.stdout.isatty() else PIPE_WIDTH)


@contextmanager
def _handled(ctx: typer.Context) -> Iterator[None]:
    """MixstackError / OSError -> red message on stderr and exit 1 (unless --debug)."""
    debug = isinstance(ctx.obj, _Options) and ctx.obj.debug
    try:
        yield
    except (MixstackError, OSError) as exc:
        if debug:
            raise
        label = "error" if isinstance(exc, MixstackError) else type(exc).__name__
        message = Text(f"{label}: ", style="bold red") + Text(str(exc), style="red")
        Console(stderr=True, highlight=False).print(message, soft_wrap=True)
        raise typer.Exit(EXIT_ERROR) from None


SpecArg = Annotated[str, typer.Argument(help="YAML path or zoo:NAME", show_default=False)]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(help="dotted overrides, e.g. model.d_model=128", show_default=False),
]


def _version(value: bool) -> None:
    if value:
        from mixstack import __version__

        typer.echo(f"mixstack {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    plugin: Annotated[
        list[Path] | None,
        typer.Option(
            "--plugin",
            help="Python file registering extra layers, tasks or metrics (repeatable; "
            "child processes load it too)",
        ),
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks of errors")] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="print the version and exit", is_eager=True, callback=_version
        ),
    ] = False,
    hub_endpoint: Annotated[
        str | None,
        typer.Option("--hub-endpoint", help="Hub URL for hf:// sources, push and pull"),
    ] = None,
) -> None:
    """Build, inspect and compare sequence models made of matrix mixers."""
    ctx.obj = _Options(debug=debug)
    with _handled(ctx):
        from mixstack.dsl.hubref import HubOptions, set_default_options

        set_default_options(HubOptions(endpoint=hub_endpoint))
        from mixstack.dsl.registry import load_plugin_file

        for path in plugin or []:
            load_plugin_file(path)


def _load(spec: str, overrides: list[str] | None) -> Spec:
    from mixstack import load_spec

    return load_spec(spec, overrides=list(overrides or []))


@app.command()
def show(
    ctx: typer.Context,
    spec: SpecArg,
    overrides: OverridesArg = None,
    resolved: Annotated[
        bool,
        typer.Option(
            "--resolved", help="every default filled in (the canonical spec a run stores)"
        ),
    ] = False,
) -> None:
    """Print the spec a run would use: bases merged, overrides applied (as YAML)."""
    with _handled(ctx):
        import yaml

        from mixstack.dsl.loader import compose_spec

        authored, loaded = compose_spec(spec, list(overrides or []))
        text = loaded.dump() if resolved else yaml.safe_dump(authored, sort_keys=False)
        typer.echo(text.rstrip("\n"))


@app.command()
def validate(ctx: typer.Context, spec: SpecArg, overrides: OverridesArg = None) -> None:
    """Load and check a spec; print 'ok', its hash and the realized pattern."""
    with _handled(ctx):
        loaded = _load(spec, overrides)
        layers = loaded.model.layers
        out = _stdout()
        out.print("ok")
        out.print(f"spec hash: {loaded.spec_hash}")
        out.print(Text(f"pattern:   {layers.pattern}  ({layers.n_layers} layers)"))


# -- info ---------------------------------------------------------------------------------
def human(n: float, unit: str = "") -> str:
    """``8_030_261_248 -> '8.03B'``; bytes with ``unit='B'`` -> ``'1.50 GiB'``."""
    if unit == "B":
        for suffix, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
            if n >= size:
                return f"{n / size:.2f} {suffix}"
        return f"{int(n)} B"
    for suffix, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{suffix}"
    return f"{n:g}"


def index_ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'``."""
    parts: list[str] = []
    start = prev = indices[0]
    for i in [*indices[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(parts)


def _short_ranges(indices: list[int]) -> str:
    """The ranges when short; else the span (the pattern line shows where exactly)."""
    text = index_ranges(indices)
    return text if len(text) <= 24 else f"{indices[0]}…{indices[-1]}"


def grouped_rows(report: Report) -> list[tuple[list[int], LayerRow]]:
    """Identical layers (same symbol, type, settings and sizes) as one row each, in the
    order of their first appearance: ``([indices], row)``."""
    groups: dict[tuple[object, ...], tuple[list[int], LayerRow]] = {}
    for row in report.rows:
        key = (row.symbol, row.type, row.settings, row.params, row.state_bytes)
        key = (*key, row.flops_per_token)
        groups.setdefault(key, ([], row))[0].append(row.index)
    return list(groups.values())


def _layer_table(report: Report, *, every_row: bool = False) -> Table:
    """One row per layer with ``every_row``; else identical layers grouped into one row
    (``layers 0-55`` with a count), so a 56-layer preset prints a few rows."""
    table = Table(title="layers", title_justify="left")
    first = ("#", "right") if every_row else ("layers", "left")
    columns = [first, ("sym", "center"), ("type", "left"), ("settings", "left")]
    if not every_row:
        columns.insert(1, ("n", "right"))
    columns += [("params", "right"), ("state", "right"), ("FLOPs/tok", "right")]
    for name, justify in columns:
        table.add_column(name, justify=justify, overflow="fold")
    groups = [([r.index], r) for r in report.rows] if every_row else grouped_rows(report)
    for indices, row in groups:
        lead = [str(row.index)] if every_row else [_short_ranges(indices), f"{len(indices)}×"]
        table.add_row(
            *lead,
            Text(row.symbol),
            Text(row.type),
            Text(row.settings),
            human(row.params),
            human(row.state_bytes, "B"),
            human(row.flops_per_token),
        )
    if not every_row:
        table.caption = "params, state and FLOPs are per layer; --all lists every layer"
    return table


def _ratio_table(spec: Spec) -> Table:
    """Realized count per symbol next to what was requested (``layers.requested``)."""
    layers = spec.model.layers
    symbols = layers.symbols_in_order
    requested = layers.requested
    ratios = (requested.ratios or {}) if requested else {}
    fill = requested.fill if requested else None
    table = Table(title="realized vs requested", title_justify="left")
    for name in ("symbol", "type", "realized", "fraction", "requested"):
        table.add_column(name, no_wrap=True)
    n = len(symbols)
    for symbol in dict.fromkeys(symbols):
        count = symbols.count(symbol)
        if symbol in ratios:
            asked = f"{ratios[symbol]:g}"
        else:
            asked = "fill" if symbol == fill else "-" if not ratios else "0"
        table.add_row(
            Text(symbol), layers.symbols[symbol].type, f"{count}/{n}", f"{count / n:.3f}", asked
        )
    for symbol, ratio in missing_ratio_types(spec):
        kind = layers.symbols[symbol].type if symbol in layers.symbols else "-"
        table.add_row(Text(symbol), kind, f"0/{n}", "0.000", f"{ratio:g}", style="yellow")
    return table


def missing_ratio_types(spec: Spec) -> list[tuple[str, float]]:
    """Requested types that realized no layer (only possible with ``allow_missing``)."""
    requested = spec.model.layers.requested
    if requested is None or not requested.ratios:
        return []
    pattern = spec.model.layers.pattern
    return [(s, r) for s, r in requested.ratios.items() if r > 0 and s not in pattern]


def _type_table(report: Report) -> Table:
    table = Table(title="per layer type", title_justify="left")
    for name in ("type", "count", "params", "state", "FLOPs/tok"):
        table.add_column(name, justify="left" if name == "type" else "right", overflow="fold")
    for row in report.rows_by_type():
        table.add_row(
            Text(row.type),
            str(row.count),
            human(row.params),
            human(row.state_bytes, "B"),
            human(row.flops_per_token),
        )
    return table


def _totals_table(report: Report, spec: Spec) -> Table:
    dtype = str(report.dtype).removeprefix("torch.")
    table = Table(title="totals", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("parameters", f"{report.total_params:,} ({human(report.total_params)})")
    table.add_row("  embedding", f"{report.embedding_params:,}")
    table.add_row("  head", f"{report.head_params:,}" + (" (tied)" if _tied(spec) else ""))
    table.add_row(
        f"decode state ({report.seq_len} tokens, {dtype})",
        f"{report.total_state_bytes:,} B ({human(report.total_state_bytes, 'B')})",
    )
    table.add_row(
        f"forward FLOPs/token (seq {report.seq_len})",
        f"{report.total_flops_per_token:,.0f} ({human(report.total_flops_per_token)})",
    )
    return table


def _tied(spec: Spec) -> bool:
    return spec.model.tie_embeddings and spec.model.arch != "classifier"


@app.command()
def info(
    ctx: typer.Context,
    spec: SpecArg,
    overrides: OverridesArg = None,
    seq_len: Annotated[
        int | None, typer.Option("--seq-len", min=1, help="length for state and FLOPs")
    ] = None,
    dtype: Annotated[
        str, typer.Option("--dtype", help="decode-state dtype: bf16|fp16|fp32")
    ] = "bf16",
    every_row: Annotated[
        bool, typer.Option("--all", help="one row per layer instead of grouping identical ones")
    ] = False,
    show_matrix: Annotated[
        int | None,
        typer.Option(
            "--show-matrix",
            min=0,
            help="draw layer N's materialized L×L mixing matrix per head (random weights "
            "and ids from --seed, length --seq-len or 64) into --out",
        ),
    ] = None,
    png: Annotated[Path | None, typer.Option("--out", help="PNG file for --show-matrix")] = None,
    seed: Annotated[int, typer.Option("--seed", help="weights and ids for --show-matrix")] = 0,
) -> None:
    """Layer table, realized pattern and ratios, parameters, decode state, FLOPs per token."""
    if (show_matrix is None) != (png is None):
        raise typer.BadParameter("--show-matrix LAYER and --out FILE.png go together")
    with _handled(ctx):
        from mixstack.archs.builder import build, parse_dtype

        loaded = _load(spec, overrides)
        model = build(loaded, device="meta")
        report = model.report(seq_len or loaded.model.max_seq_len, dtype=parse_dtype(dtype))
        out = _stdout()
        m = loaded.model
        out.print(
            Text(
                f"{m.arch}  d_model {m.d_model}  vocab {m.total_vocab} "
                f"(embedding rows {m.padded_vocab})  hash {loaded.spec_hash[:12]}"
            )
        )
        out.print(_layer_table(report, every_row=every_row))
        out.print(Text(f"pattern: {m.layers.pattern}  ({m.n_layers} layers)"))
        out.print(_ratio_table(loaded))
        for symbol, ratio in missing_ratio_types(loaded):
            out.print(
                Text(
                    f"warning: ratio {ratio:g} of {symbol!r} realized 0 of {m.n_layers} layers "
                    "(accepted by layers.allow_missing)",
                    style="yellow",
                )
            )
        out.print(_type_table(report))
        out.print(_totals_table(report, loaded))
        if show_matrix is not None and png is not None:
            _draw_layer_matrix(loaded, show_matrix, png, seed, seq_len)
            out.print(Text(f"layer {show_matrix}'s mixing matrix drawn to {png}"))


def _draw_layer_matrix(spec: Spec, layer: int, png: Path, seed: int, seq_len: int | None) -> None:
    """Build the model for real (seeded), feed random ids, draw layer ``layer``."""
    import torch

    from mixstack.archs.builder import build
    from mixstack.archs.matrix import draw_matrices, materialize

    length = min(seq_len or 64, spec.model.max_seq_len)
    model = build(spec, seed=seed, dtype=torch.float64).eval()
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, spec.model.vocab_size, (1, length), generator=generator)
    matrices = materialize(model, ids, layer=layer)
    png.parent.mkdir(parents=True, exist_ok=True)
    draw_matrices(matrices, png, title=f"layer {layer} ({matrices.layer_type}), L={length}")


# -- train and eval ---------------------------------------------------------------------------
RUNS_DIR = Path("runs")


def _train_source(spec: str, overrides: list[str] | None) -> tuple[str, list[str], Path | None]:
    """A run directory given as SPEC means its ``spec.yaml`` (its run section's
    ``stop_after`` dropped: a stop applies to one invocation) and that directory."""
    folder = Path(spec)
    if folder.is_dir() and (folder / "spec.yaml").is_file():
        return str(folder / "spec.yaml"), ["run.stop_after=null", *(overrides or [])], folder
    if folder.is_dir():
        raise MixstackError(
            f"{folder} is a directory but not a run directory (it has no spec.yaml); give "
            "a spec (a YAML file or zoo:NAME), or the directory of a run to continue it "
            "with --resume"
        )
    return spec, list(overrides or []), None


def _run_name(spec: str) -> str:
    name = spec.removeprefix("zoo:") if spec.startswith("zoo:") else Path(spec).stem
    return name or "run"


def _quiet_lightning() -> None:
    """Lightning's start-up chatter (accelerator lines, tips) and a deprecation notice
    from its own internals say nothing actionable to a mixstack user."""
    import logging
    import warnings

    import lightning.pytorch  # noqa: F401  (it sets its loggers' levels when imported)

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated", category=Warning)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*", category=Warning)


def _metric_rows(metrics: dict[str, float]) -> list[tuple[str, str]]:
    order = ("val/accuracy", "val/loss", "val/ppl", "train/loss")
    names = [n for n in order if n in metrics] + sorted(set(metrics) - set(order))
    return [(name, f"{metrics[name]:.4f}") for name in names]


def _summary(result: RunResult) -> Table:
    table = Table(title=f"mixstack train: {result.status}", title_justify="left", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", overflow="fold")
    steps = f"{result.step} / {result.total_steps}"
    table.add_row("steps", steps + (f"  ({result.reason})" if result.reason else ""))
    table.add_row("time", f"{result.elapsed_s:.1f} s")
    for name, value in _metric_rows(result.metrics):
        table.add_row(name, value)
    table.add_row("parameters", f"{result.params:,}")
    table.add_row("backends", ", ".join(f"{k}: {v}" for k, v in result.backends.items()) or "-")
    if result.init_from is not None:  # train.init_from
        from mixstack.training.init_from import describe

        table.add_row("init_from", f"{result.init_from['source']}: {describe(result.init_from)}")
    table.add_row("run directory", str(result.run_dir))
    if result.model_dir is not None:
        table.add_row("model", f"{result.model_dir}  (mixstack.from_pretrained / mixstack eval)")
    else:
        table.add_row("continue with", f"mixstack train {result.run_dir} --resume")
    if result.hub is not None:  # run.hub
        if "error" in result.hub:
            table.add_row(
                "hub push FAILED", Text(f"{result.hub['error']}\nretry: {result.hub['retry']}")
            )
        else:
            table.add_row("hub", f"{result.hub['url']} @ {result.hub['commit']}")
    return table


@app.command()
def train(
    ctx: typer.Context,
    spec: Annotated[
        str, typer.Argument(help="YAML path, zoo:NAME, or a run directory", show_default=False)
    ],
    overrides: OverridesArg = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="run directory (default: runs/<spec name>)")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue the run in --out from its checkpoint")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="replace a run already in --out")
    ] = False,
) -> None:
    """Train a spec (its train: section) with Lightning; export the model; print a summary."""
    with _handled(ctx):
        source, overrides, folder = _train_source(spec, overrides)
        loaded = _load(source, overrides)
        if loaded.train is None:
            raise MixstackError(
                f"{spec} has no train: section; add one, e.g. train: {{task: {{type: mqar}}, "
                "max_steps: 1000}, or give it as overrides (train.task.type=mqar ...)"
            )
        target = out or folder or RUNS_DIR / _run_name(spec)
        if not (isinstance(ctx.obj, _Options) and ctx.obj.debug):
            _quiet_lightning()
        from mixstack.training.run import fit

        try:
            result = fit(loaded, target, resume=resume, overwrite=overwrite)
        except (KeyboardInterrupt, SystemExit):  # Lightning turns Ctrl-C into sys.exit(1)
            from mixstack.training.rundir import resume_hint

            Console(stderr=True, highlight=False).print(
                Text(f"interrupted: {resume_hint(Path(target))}", style="yellow"), soft_wrap=True
            )
            raise typer.Exit(EXIT_INTERRUPTED) from None
        if result.is_global_zero:
            _stdout().print(_summary(result))


EvalTask = Annotated[
    str | None,
    typer.Option("--task", help="evaluate on this registered task (its defaults, then overrides)"),
]
EvalLengths = Annotated[
    str | None,
    typer.Option("--lengths", help="sweep: context lengths, e.g. 256,512,1024"),
]
EvalDepths = Annotated[
    str | None,
    typer.Option("--depths", help="sweep: needle depths in [0, 1], e.g. 0,0.5,1 (passkey)"),
]
EvalOut = Annotated[
    Path | None,
    typer.Option("--out", help="sweep: write eval.csv, heatmap.png, capacity.png here"),
]
EvalMetric = Annotated[
    str | None,
    typer.Option("--metric", help="sweep: the plotted metric (default: the task's own)"),
]


@app.command("eval")
def evaluate(
    ctx: typer.Context,
    model_dir: Annotated[Path, typer.Argument(help="model directory", show_default=False)],
    overrides: OverridesArg = None,
    spec: Annotated[
        str | None,
        typer.Option(
            "--spec",
            help="spec whose train: section gives the task (default: the run's spec.yaml "
            "when MODEL_DIR sits in a run directory)",
        ),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", min=1, help="validation batch size")
    ] = None,
    allow_unverified: AllowUnverified = False,
    task: EvalTask = None,
    lengths: EvalLengths = None,
    depths: EvalDepths = None,
    out: EvalOut = None,
    metric: EvalMetric = None,
) -> None:
    """Evaluate a model directory (or a run directory's model) on a task's validation set;
    exits 1 if a metric is NaN or infinite. With --lengths/--depths/--out: a sweep
    (eval.csv, heatmap.png, capacity.png; more model, run or grid directories may follow
    MODEL_DIR)."""
    with _handled(ctx):
        from mixstack.hub.modeldir import load_model_dir
        from mixstack.training.evaluate import evaluate as run_eval
        from mixstack.training.evaluate import spec_for

        more = [Path(o) for o in overrides or [] if "=" not in o]  # further models
        keys = [o for o in overrides or [] if "=" in o]
        if more or any(v is not None for v in (lengths, depths, out, metric)):
            from mixstack.cli.evalsweep import eval_sweep

            eval_sweep(
                [model_dir, *more],
                keys,
                spec=spec,
                task=task,
                lengths=lengths,
                depths=depths,
                out=out,
                metric=metric,
                batch_size=batch_size,
                allow_unverified=allow_unverified,
            )
            return
        model_dir, found_spec = model_dir_of(model_dir)
        model = load_model_dir(model_dir, allow_unverified=allow_unverified)
        if task is not None:  # the registered task at its defaults, then the overrides
            from mixstack.cli.evalsweep import train_for

            train, _, source = train_for(
                model, model_dir, found_spec, spec=spec, overrides=keys, task=task
            )
            combined = spec_for(model, train)
        else:
            run_spec = found_spec or model_dir.parent / "spec.yaml"
            if spec is None and not run_spec.is_file():
                raise MixstackError(
                    f"{model_dir} is not inside a run directory; pass --spec SPEC (a spec "
                    "with a train: section naming the task) or --task NAME"
                )
            source = spec or str(run_spec)
            combined = spec_for(model, _load(source, overrides))
        metrics = run_eval(model, combined, batch_size=batch_size)
        task = combined.train.task if combined.train else None
        table = Table(title=f"mixstack eval: {model_dir}", title_justify="left")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for name, value in _metric_rows({f"val/{k}": v for k, v in metrics.items()}):
            table.add_row(name, value)
        out = _stdout()
        out.print(Text(f"task: {task.type if task else '?'} (from {source})"))
        out.print(table)
        bad = [f"val/{k} = {v}" for k, v in metrics.items() if not math.isfinite(v)]
        if bad:
            raise MixstackError(
                f"non-finite metrics ({', '.join(bad)}): the model's outputs overflow or are "
                "NaN on this task"
            )


# -- schema -----------------------------------------------------------------------------


@app.command()
def schema(
    ctx: typer.Context,
    out: Annotated[
        Path | None, typer.Option("--out", help="write to FILE instead of stdout")
    ] = None,
) -> None:
    """Print the JSON schema of a spec file (for editor completion)."""
    with _handled(ctx):
        from mixstack.dsl.schema import spec_json_schema

        text = json.dumps(spec_json_schema(), indent=2) + "\n"
        if out is None:
            typer.echo(text, nl=False)
        else:
            if not out.parent.is_dir():  # a typo in the folder: say so, create nothing
                raise FileNotFoundError(f"folder {out.parent} does not exist (--out {out})")
            write_atomic(out, text)
            _stdout().print(Text(f"wrote {out}"))


def registry_tables() -> list[Table]:
    """One table per registry: layer types, tasks, metrics, kernel providers."""
    from mixstack.dsl import registry
    from mixstack.kernels import backends

    layers = Table(
        "type", "kind", "class", "origin", title="mixers and layers", title_justify="left"
    )
    for layer in registry.entries():
        layers.add_row(layer.name, layer.kind, layer.source, str(layer.origin))
    tasks = Table("type", "archs", "extra metrics", "origin", title="tasks", title_justify="left")
    tasks.columns[2].max_width = 24  # a long metric list wraps instead of cutting the origin
    for task in registry.tasks.all():
        archs = ", ".join(getattr(task.config_cls, "archs", ()))
        tasks.add_row(task.name, archs, ", ".join(task.metrics) or "-", str(task.origin))
    metrics = Table("name", "better", "task", "description", "origin", title="metrics (val/<name>)")
    metrics.title_justify = "left"
    for entry in registry.metrics.all():
        better = "higher" if entry.metric.higher_is_better else "lower"
        task = entry.task or "every task"
        metrics.add_row(entry.name, better, task, entry.metric.description, str(entry.origin))
    providers = Table("provider", "origin", title="kernel providers", title_justify="left")
    for name, origin in backends.provider_origins().items():
        providers.add_row(name, str(origin))
    tables = [layers, tasks, metrics, providers]
    for table in tables:  # a long path wraps in its cell; eliding it would hide the file name
        next(c for c in table.columns if c.header == "origin").overflow = "fold"
    return tables


@registry_app.command("list")
def registry_list(ctx: typer.Context) -> None:
    """List what is registered, with where each entry comes from (built-in, a package's
    entry point with its version, or a --plugin file with its sha256)."""
    with _handled(ctx):
        console = _stdout()
        for table in registry_tables():
            console.print(table)


from mixstack.cli.generate import generate_command  # noqa: E402

app.command("generate")(generate_command)
from mixstack.cli import interop as _interop  # noqa: E402  (convert / export commands)

app.command("convert")(_interop.convert)
app.command("export")(_interop.export)
from mixstack.cli.bench import bench  # noqa: E402  (needs _handled above)

app.command()(bench)
from mixstack.cli.zoo import zoo_app  # noqa: E402  (its commands import this module lazily)

app.add_typer(zoo_app, name="zoo")
from mixstack.cli import hub as _hub_cli  # noqa: E402  (it imports the helpers above)

app.command("push")(_hub_cli.push)
app.command("pull")(_hub_cli.pull)
# `mixstack grid ...` (mixstack.ablate); imported here, after the helpers it uses.
from mixstack.cli.grid import grid_app  # noqa: E402

app.add_typer(grid_app, name="grid")
app.command()(verify_command)
# `mixstack tokenizer train` / `mixstack data prepare` (mixstack.data)
from mixstack.cli.data import data_app, tokenizer_app  # noqa: E402

app.add_typer(tokenizer_app, name="tokenizer")
app.add_typer(data_app, name="data")
# `mixstack lm-eval MODEL --tasks ...` (mixstack.interop.lm_eval)
from mixstack.cli.lmeval import lm_eval_command  # noqa: E402

app.command("lm-eval")(lm_eval_command)


def main() -> None:
    """Console-script entry point (``mixstack = "mixstack.cli.main:main"``)."""
    app()


if __name__ == "__main__":
    main()
