"""``mixstack lm-eval MODEL --tasks a,b``: lm-evaluation-harness tasks on a model directory.

The model is :mod:`mixstack.interop.lm_eval`'s adapter; tasks are lm-eval's (built-in,
which may download their datasets) or local task YAMLs under ``--include-path``. The
results table goes to stdout, the results JSON to ``--output`` (written atomically).
Registered in ``cli/main.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer


def lm_eval_command(
    ctx: typer.Context,
    model_dir: Annotated[
        str, typer.Argument(help="model directory (with tokenizer.json or bytes)")
    ],
    tasks: Annotated[str, typer.Option("--tasks", help="comma-separated lm-eval task names")],
    include_path: Annotated[
        list[Path] | None,
        typer.Option("--include-path", help="folder of local task YAMLs (repeatable)"),
    ] = None,
    builtin_tasks: Annotated[
        bool,
        typer.Option(
            "--builtin-tasks/--no-builtin-tasks",
            help="also index lm-eval's own tasks (slower start; off: local tasks only)",
        ),
    ] = True,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="documents per task at most")
    ] = None,
    num_fewshot: Annotated[
        int | None, typer.Option("--num-fewshot", min=0, help="few-shot examples")
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="windows scored per forward")
    ] = 8,
    max_length: Annotated[
        int | None,
        typer.Option("--max-length", min=1, help="window length (default model.max_seq_len)"),
    ] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda, ...")] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="fp32, bf16, ...")] = None,
    output: Annotated[
        Path | None, typer.Option("--output", help="write lm-eval's results JSON here")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="lm-eval's sampling seeds")] = 0,
) -> None:
    """Evaluate a model directory on lm-eval tasks (loglikelihood, rolling, generation)."""
    from mixstack.cli.main import _handled

    with _handled(ctx):
        results = run_lm_eval(
            model_dir,
            [t.strip() for t in tasks.split(",") if t.strip()],
            include_path=include_path or [],
            builtin_tasks=builtin_tasks,
            limit=limit,
            num_fewshot=num_fewshot,
            batch_size=batch_size,
            max_length=max_length,
            device=device,
            dtype=dtype,
            seed=seed,
        )
        from lm_eval.utils import make_table

        typer.echo(make_table(results))
        if output is not None:
            from mixstack.training.rundir import write_atomic

            write_atomic(output, json.dumps(_plain(results), indent=2, default=str) + "\n")
            typer.echo(f"results: {output}")


def run_lm_eval(
    model_dir: str,
    tasks: list[str],
    *,
    include_path: list[Path],
    builtin_tasks: bool = True,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` on the model directory; its results dict."""
    from mixstack.dsl.errors import MixstackError
    from mixstack.interop.lm_eval import lm_class, load_scorer

    if not tasks:
        raise MixstackError("lm-eval: --tasks names no task")
    for folder in include_path:
        if not folder.is_dir():
            raise MixstackError(f"lm-eval: --include-path {str(folder)!r} is not a folder")
    if not builtin_tasks and not include_path:
        raise MixstackError("lm-eval: --no-builtin-tasks needs an --include-path with tasks")
    scorer = load_scorer(
        model_dir, device=device, dtype=dtype, max_length=max_length, batch_size=batch_size
    )
    lm = lm_class()(scorer=scorer)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(
        include_path=[str(p) for p in include_path] or None, include_defaults=builtin_tasks
    )
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise MixstackError(
            f"lm-eval: unknown task(s) {unknown}; local tasks: "
            f"{sorted(set(manager.all_tasks)) if not builtin_tasks else 'see lm-eval --tasks list'}"
        )
    results = simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=False,
        bootstrap_iters=0,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    if results is None:  # only on non-zero ranks of a distributed run
        raise MixstackError("lm-eval returned no results")
    return dict(results)


def _plain(results: dict[str, Any]) -> dict[str, Any]:
    """The JSON-able parts of lm-eval's results (its per-task configs hold functions)."""
    keep = ("results", "groups", "group_subtasks", "versions", "n-shot", "higher_is_better")
    return {k: results[k] for k in keep if k in results} | {"n-samples": results.get("n-samples")}
