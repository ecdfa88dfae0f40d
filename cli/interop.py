"""``mixstack convert`` and ``mixstack export`` (docs/interop.md).

Registered on the main app by :mod:`mixstack.cli.main`; the work is done by
:mod:`mixstack.interop`, imported when a command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

OutOption = Annotated[
    Path, typer.Option("--out", help="folder to write (created, or replaced if it holds a model)")
]


def convert(
    ctx: typer.Context,
    src: Annotated[
        Path,
        typer.Argument(help="transformers checkpoint folder (config.json + safetensors)"),
    ],
    out: OutOption,
) -> None:
    """Import a transformers checkpoint (llama, mamba, mamba2, bamba, nemotron_h) as a
    mixstack model directory."""
    from mixstack.cli.main import _handled, _stdout

    with _handled(ctx):
        from mixstack.interop.export import convert as run_convert
        from mixstack.interop.export import load_source

        path = run_convert(src, out)
        model, _ = load_source(path)
        spec = model.spec
        summary = f"{spec.arch} `{spec.layers.pattern}`, spec hash {spec.spec_hash[:12]}"
        _stdout().print(Text(f"wrote {path}: {summary}"))


def export(
    ctx: typer.Context,
    src: Annotated[
        Path,
        typer.Argument(help="run directory, model directory or transformers checkpoint folder"),
    ],
    out: OutOption,
    to: Annotated[
        str, typer.Option("--to", help="mixstack (a model directory) or transformers")
    ] = "mixstack",
) -> None:
    """Write the model of SRC as a mixstack model directory or a transformers checkpoint.

    A run directory gives its model/ folder, or the weights of checkpoints/last.ckpt when
    model/ is missing or older (an interrupted run)."""
    from mixstack.cli.main import _handled, _stdout

    with _handled(ctx):
        from mixstack.dsl.errors import MixstackError
        from mixstack.interop.export import TARGETS, load_source

        if to not in TARGETS:
            raise MixstackError(f"--to {to!r} is not a target; allowed: {', '.join(TARGETS)}")
        model, what = load_source(src)
        if Path(out).resolve() == Path(src).resolve():
            raise MixstackError(f"--out {out} is the source itself; choose another folder")
        if to == "transformers":
            from mixstack.interop.transformers import export_transformers, transformers_config_of

            path = export_transformers(model, out)
            kind = transformers_config_of(model)["model_type"]
            _stdout().print(Text(f"wrote {path} (transformers {kind}) from {what}"))
        else:
            from mixstack.hub.modeldir import save_model_dir

            path = save_model_dir(model, out)
            _stdout().print(Text(f"wrote {path} (mixstack model directory) from {what}"))
