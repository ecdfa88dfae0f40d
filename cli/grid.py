"""``mixstack grid``: plan, run, status and report of ablation grids (mixstack.ablate).

grid plan GRID                  expand and check every point; table of sizes
grid run GRID --out DIR [--workers N] [--threads N] [--executor local|submitit] [--retry-failed]
grid status DIR                 per-point state, attempts, wall time, errors
grid report DIR [--dest D]      summary.md/csv, points.csv, differences.csv, PNG plots
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

# Import the command module's helpers at call time: under `python -m mixstack.cli.main`
# that module is `__main__`, and importing it from here at import time would be circular.


def _cli() -> Any:
    from mixstack.cli import main

    return main


grid_app = typer.Typer(
    help="Ablation grids: plan, run (locally or via submitit), status, report.",
    no_args_is_help=True,
)

GridArg = Annotated[str, typer.Argument(help="grid YAML file", show_default=False)]
DirArg = Annotated[Path, typer.Argument(help="grid directory (--out of grid run)")]


def _show(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


@grid_app.command("plan")
def plan_cmd(ctx: typer.Context, grid: GridArg) -> None:
    """Expand and validate every point; print id, overrides, params, FLOPs/token, state."""
    with _cli()._handled(ctx):
        from mixstack.ablate.planner import plan

        p = plan(grid)
        g = p.grid
        table = Table(
            title=f"grid {g.name}: {len(p.points)} points, {len(p.cells)} cells",
            title_justify="left",
        )
        for name, justify in (
            ("#", "right"),
            ("point", "left"),
            ("overrides", "left"),
            ("seed", "right"),
            ("lr", "right"),
            ("params", "right"),
            ("FLOPs/tok", "right"),
            ("state", "right"),
            ("steps", "right"),
            ("tokens", "right"),
        ):
            table.add_column(name, justify=justify, overflow="fold")
        for pt in p.points:
            table.add_row(
                str(pt.index + 1),
                pt.id,
                Text(pt.cell),
                str(pt.seed),
                "" if pt.lr is None else f"{pt.lr:g}",
                f"{pt.size.params:,}",
                _cli().human(pt.size.flops_per_token),
                _cli().human(pt.size.state_bytes, "B"),
                str(pt.steps),
                _cli().human(pt.tokens),
            )
        out = _cli()._stdout()
        out.print(table)
        direction = "higher" if g.mode == "max" else "lower"
        out.print(Text(f"metric: {g.metric} ({direction} is better); base: {g.base}"))
        if g.match is not None:
            res = [p_.residual for p_ in p.points if p_.residual is not None]
            worst = max(res, key=abs) if res else 0.0
            out.print(
                Text(
                    f"match: {g.match.quantity} to {g.match.to} via {g.match.knob}; "
                    f"largest residual {worst:+.2%} (tolerance {g.match.tolerance:.0%})"
                )
            )


@grid_app.command("run")
def run_cmd(
    ctx: typer.Context,
    grid: GridArg,
    out: Annotated[Path, typer.Option("--out", help="grid directory (created or resumed)")],
    workers: Annotated[int, typer.Option("--workers", min=1, help="worker processes")] = 1,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            min=1,
            help="torch threads per worker (default: local workers share the cores; "
            "submitit jobs keep torch's default)",
        ),
    ] = None,
    executor: Annotated[
        str, typer.Option("--executor", help="local (subprocesses) or submitit (Slurm)")
    ] = "local",
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="run failed points again")
    ] = False,
    cluster: Annotated[
        str | None,
        typer.Option("--cluster", help="submitit cluster: slurm, local or debug (default: auto)"),
    ] = None,
    submitit_param: Annotated[
        list[str] | None,
        typer.Option("--submitit-param", help="KEY=VALUE for submitit (e.g. slurm_partition=gpu)"),
    ] = None,
) -> None:
    """Run every point not finished yet (resumable: finished points are skipped)."""
    with _cli()._handled(ctx):
        import yaml

        from mixstack.ablate.runner import GridRunError, run_grid

        params = {}
        for item in submitit_param or []:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise GridRunError(f"--submitit-param {item!r} is not KEY=VALUE")
            params[key.strip()] = yaml.safe_load(value)
        _cli()._quiet_lightning()
        summary = run_grid(
            grid,
            out,
            workers=workers,
            executor=executor,
            retry_failed=retry_failed,
            cluster=cluster,
            submitit_params=params,
            threads=threads,
        )
        console = _cli()._stdout()
        console.print(_status_table(out))
        counts = ", ".join(f"{k} {v}" for k, v in summary.counts.items() if v)
        console.print(Text(f"grid {out}: {counts}"))
        for error in summary.errors:
            console.print(Text(error, style="red"))
        if not summary.ok:
            raise typer.Exit(1)


def _status_table(out: Path) -> Table:
    from mixstack.ablate.runner import GridDir

    gd = GridDir(out)
    plan = gd.read_plan()
    table = Table(title=f"grid {plan['name']} ({out})", title_justify="left")
    for name in ("#", "point", "cell", "seed", "lr", "state", "tries", "wall s", "error"):
        table.add_column(name, overflow="fold")
    for pt in plan["points"]:
        st = gd.read_status(pt["id"])
        style = {"finished": "green", "failed": "red", "running": "yellow"}.get(st["state"], "")
        wall = st.get("wall_s")
        table.add_row(
            str(pt["index"] + 1),
            pt["id"],
            Text(pt["cell"]),
            str(pt["seed"]),
            "" if pt["lr"] is None else f"{pt['lr']:g}",
            Text(st["state"], style=style),
            str(st.get("attempts", 0)),
            "" if wall is None else f"{wall:.1f}",
            Text(st.get("error") or ""),
        )
    return table


@grid_app.command("status")
def status_cmd(ctx: typer.Context, out: DirArg) -> None:
    """Per-point state (pending / running / finished / failed), tries, wall time, errors."""
    with _cli()._handled(ctx):
        from mixstack.ablate.runner import summarize

        console = _cli()._stdout()
        console.print(_status_table(out))
        counts = summarize(out).counts
        console.print(Text(", ".join(f"{k} {v}" for k, v in counts.items())))


@grid_app.command("report")
def report_cmd(
    ctx: typer.Context,
    out: DirArg,
    dest: Annotated[
        Path | None, typer.Option("--dest", help="folder for the files (default DIR/report)")
    ] = None,
) -> None:
    """Summary table (Markdown and CSV), per-point and paired-difference CSVs, PNG plots."""
    with _cli()._handled(ctx):
        from mixstack.ablate.reporting import summary_markdown, tables, write_report

        files = write_report(out, dest)
        console = _cli()._stdout()
        console.print(Text(summary_markdown(tables(out))), soft_wrap=True)
        for name, path in files.items():
            console.print(Text(f"wrote {path}", style="dim") if name else "")
