"""``mixstack verify MODEL_DIR``: the integrity checks of loading, without keeping a model.

For a user who copied checkpoints around: config.json / spec.yaml / spec hash agree,
every weights file (or shard) matches its recorded data digest, the headers match the
model of config.json (names, shapes, float dtypes, tied head), no weight is NaN or inf.
Exit 0 when everything holds, 1 with the first problem otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from mixstack.dsl.errors import MixstackError

AllowUnverified = Annotated[
    bool,
    typer.Option(
        "--allow-unverified",
        help="accept weights without spec hash / data digest or with NaN/inf (warns)",
    ),
]


def model_dir_of(path: Path) -> tuple[Path, Path | None]:
    """(the model directory, the run's spec.yaml or None) of a model directory or a run
    directory (its ``model/``); a run without an exported model is a clear error."""
    if (path / "config.json").is_file():
        run_spec = path.parent / "spec.yaml"
        return path, run_spec if run_spec.is_file() else None
    if (path / "spec.yaml").is_file() and (
        (path / "run.json").is_file() or (path / "model").is_dir()
    ):
        if (path / "model" / "config.json").is_file():
            return path / "model", path / "spec.yaml"
        raise MixstackError(
            f"{path} is a run directory without an exported model (the run has not finished); "
            f"continue it with: mixstack train {path} --resume"
        )
    return path, None


def verify(
    ctx: typer.Context,
    model_dir: Annotated[
        Path, typer.Argument(help="model directory (or a run directory: its model/)")
    ],
    allow_unverified: AllowUnverified = False,
) -> None:
    """Check a model directory: spec hash, data digests, tensor names/shapes/dtypes, no NaN."""
    from mixstack.cli.main import _handled, _stdout, human

    with _handled(ctx):
        from mixstack.hub.modeldir import verify_model_dir

        folder, _ = model_dir_of(model_dir)
        report = verify_model_dir(folder, allow_unverified=allow_unverified)
        table = Table(title=f"mixstack verify: {folder}", title_justify="left")
        table.add_column("weights file")
        table.add_column("data sha256")
        for name, digest in report["files"].items():
            table.add_row(name, digest or Text("none recorded", style="yellow"))
        out = _stdout()
        out.print(table)
        out.print(
            f"ok: spec hash {report['spec_hash']}, {report['tensors']} tensors, "
            f"{human(report['params'])} parameters, all finite"
        )
