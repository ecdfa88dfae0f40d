"""``mixstack push`` and ``mixstack pull``: Hub model repositories (see docs/hub.md).

    mixstack [--hub-endpoint URL] push SRC REPO_ID [--revision BRANCH] [--private]
    mixstack [--hub-endpoint URL] pull REPO_ID [--revision REV] [--out DIR]

The token comes from ``HF_TOKEN`` or ``hf auth login`` (never from the command line,
where it would end up in shell history); it is never printed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text


def _helpers() -> tuple[Any, Any]:
    """``cli.main``'s error handler and console, imported when a command runs: a
    module-level import would be circular when ``cli.main`` runs as ``__main__``
    (``python -m mixstack.cli.main``), since it imports this module to register it."""
    from mixstack.cli import main

    return main._handled, main._stdout


def push(
    ctx: typer.Context,
    src: Annotated[
        Path, typer.Argument(help="run directory (pushes its model/) or model directory")
    ],
    repo_id: Annotated[str, typer.Argument(help="ORG/NAME of the Hub model repository")],
    revision: Annotated[
        str | None, typer.Option("--revision", help="branch to push to (created if missing)")
    ] = None,
    private: Annotated[
        bool, typer.Option("--private", help="create the repository private")
    ] = False,
    message: Annotated[str | None, typer.Option("--message", help="commit message")] = None,
) -> None:
    """Upload a model directory (config.json, spec.yaml, weights, model card) in one commit."""
    _handled, _stdout = _helpers()
    with _handled(ctx):
        from mixstack.hub.hub import push as do_push

        result = do_push(src, repo_id, revision=revision, private=private, commit_message=message)
        out = _stdout()
        out.print(Text(f"pushed {src} to {result.url} (revision {result.revision})"))
        out.print(Text(f"commit: {result.commit}"))


def pull(
    ctx: typer.Context,
    repo_id: Annotated[str, typer.Argument(help="ORG/NAME or hf://ORG/NAME[@REVISION]")],
    revision: Annotated[
        str | None, typer.Option("--revision", help="branch, tag or commit (default: main)")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="also write the model directory here (atomically)"),
    ] = None,
    cache_dir: Annotated[
        Path | None, typer.Option("--cache-dir", help="Hub cache folder (default: HF_HUB_CACHE)")
    ] = None,
) -> None:
    """Download a model through the Hub cache, check it loads; print the resolved commit."""
    _handled, _stdout = _helpers()
    with _handled(ctx):
        from mixstack.hub.hub import pull as do_pull

        pulled = do_pull(repo_id, revision=revision, out=out, cache_dir=cache_dir)
        console = _stdout()
        console.print(Text(f"commit: {pulled.commit}"))
        console.print(Text(f"model directory: {pulled.path}"))
