"""``mixstack bench``: speed and memory against reference implementations (docs/performance.md).

    mixstack bench [--suite mixers|models|decode|all] [--lengths 512,1024,2048]
                   [--threads N] [--out DIR] [--compare old.json] [--check]
                   [--reps N] [--presets a,b] [--size goal|small]
                   [--contenders mamba2-hf,mamba1-hf,...] [--slow-after SECONDS]
                   [--chunk N]

Every pair is checked equal (fp32, rtol 1e-4 on outputs and gradients) before any time
is measured; ``--check`` stops there. Writes ``DIR/bench.md``, ``DIR/bench.json`` and
log-log plots ``DIR/<suite>.png``, and prints the table.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.markdown import Markdown

from mixstack.dsl.errors import MixstackError
from mixstack.training.rundir import write_atomic


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace(" ", ",").split(",") if v)
    except ValueError:
        raise MixstackError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise MixstackError(f"{what} must be positive integers, got {text!r}")
    return values


def bench(
    ctx: typer.Context,
    suite: Annotated[
        str, typer.Option("--suite", help="mixers | models | decode | all")
    ] = "mixers",
    lengths: Annotated[
        str | None,
        typer.Option("--lengths", help="comma-separated sequence / context lengths"),
    ] = None,
    threads: Annotated[
        int | None, typer.Option("--threads", min=1, help="torch threads (default: torch's)")
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="directory for bench.md/json/png")] = Path(
        "bench"
    ),
    compare: Annotated[
        Path | None, typer.Option("--compare", help="an earlier bench.json to compare against")
    ] = None,
    check: Annotated[
        bool, typer.Option("--check", help="only the equality checks, no timing")
    ] = False,
    reps: Annotated[int, typer.Option("--reps", min=1, help="interleaved timing rounds")] = 5,
    presets: Annotated[
        str | None, typer.Option("--presets", help="comma-separated zoo presets (models suite)")
    ] = None,
    size: Annotated[
        str,
        typer.Option("--size", help="goal: the sizes of the performance goals; small: a smoke run"),
    ] = "goal",
    contenders: Annotated[
        str | None,
        typer.Option(
            "--contenders",
            help="comma-separated comparisons to run (default: all): mixers: mamba2-hf, "
            "mamba1-hf, hydra, lower-bound, mamba2-reference, mamba2-torch; models: llama, "
            "presets",
        ),
    ] = None,
    slow_after: Annotated[
        float,
        typer.Option(
            "--slow-after",
            min=0.0,
            help="a contender whose warm-up call takes longer (seconds) is timed in one round only",
        ),
    ] = 5.0,
    chunk: Annotated[
        int | None,
        typer.Option(
            "--chunk",
            min=1,
            help="SSD chunk length of the mixers suite, ours and transformers' alike "
            "(default: 128 at --size goal, where the goals are stated; another chunk "
            "reports no goals)",
        ),
    ] = None,
) -> None:
    """Benchmark mixers, models and decoding against reference implementations."""
    # at call time: cli.main imports this module to register it (python -m would loop)
    from mixstack.cli.main import _handled, _stdout

    with _handled(ctx):
        import torch

        from mixstack.benchmarks import report, suites
        from mixstack.benchmarks.timing import machine_info

        names = list(suites.SUITES) if suite == "all" else [suite]
        if suite != "all" and suite not in suites.SUITES:
            raise MixstackError(
                f"--suite must be one of {', '.join(suites.SUITES)}, all; got {suite!r}"
            )
        if size not in ("goal", "small"):
            raise MixstackError(f"--size must be 'goal' or 'small', got {size!r}")
        old = report.load_json(compare) if compare is not None else None
        if threads is not None:
            torch.set_num_threads(threads)
        opts = suites.small_options() if size == "small" else suites.Options()
        changes: dict[str, object] = {"reps": reps, "check_only": check, "slow_s": slow_after}
        if contenders is not None:
            chosen = tuple(c.strip() for c in contenders.split(",") if c.strip())
            changes["contenders"] = suites.check_contenders(names, chosen)
        if lengths is not None:
            changes["lengths"] = _ints(lengths, "--lengths")
        if presets is not None:
            changes["presets"] = tuple(p for p in presets.split(",") if p)
        if chunk is not None and chunk != opts.mixer.chunk:
            changes["mixer"] = suites.replace(opts.mixer, chunk=chunk)
            changes["goal_length"] = 0  # the goals are stated at the default chunk
        opts = suites.replace(opts, **changes)
        result = suites.run_suites(names, opts)
        console = _stdout()
        options = {**asdict(opts), "suites": names, "size": size}
        data = report.to_json(result, machine_info(result.backends), options)
        comparison = report.compare(data, old) if old is not None else None
        text = report.markdown(data, comparison)
        import json

        write_atomic(out / "bench.json", json.dumps(data, indent=2) + "\n")
        write_atomic(out / "bench.md", text)
        written = [] if check else report.plots(data, out)
        console.print(Markdown(text))
        console.print(
            f"wrote {out / 'bench.md'}, {out / 'bench.json'}" + "".join(f", {p}" for p in written)
        )
