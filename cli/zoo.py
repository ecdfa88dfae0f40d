"""``mixstack zoo``: the presets shipped in ``mixstack/zoo`` (use them as ``zoo:NAME``).

    zoo list          one line per preset: name, pattern, parameters, one-line source;
                      aliases (old names) are marked with the preset they stand for
    zoo show NAME     the preset's YAML as shipped (header comment included)

Parameters are counted on the meta device (nothing is allocated), so the 8B presets
list in seconds. The catalogue and the header convention are in
:mod:`mixstack.zoo.table`.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

zoo_app = typer.Typer(
    help="Presets shipped with mixstack (use them as zoo:NAME).", no_args_is_help=True
)

# A long source line is cut here (the row stays one line at the 160-column pipe width);
# `zoo show` prints the whole header.
SOURCE_WIDTH = 52


def zoo_presets() -> list[tuple[str, str]]:
    """``(name, one-line summary)`` of every preset in the package's zoo folder."""
    from mixstack.zoo.table import presets

    return [(p.name, p.summary) for p in presets()]


def _one_line(text: str, width: int = SOURCE_WIDTH) -> str:
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


def list_table() -> Table:
    """The ``zoo list`` table (one row per preset; aliases point at their target)."""
    from mixstack.cli.main import human
    from mixstack.zoo.table import presets, row

    table = Table(title="zoo presets (use as zoo:NAME)", title_justify="left")
    for name, justify in (("name", "left"), ("pattern", "left"), ("params", "right")):
        table.add_column(name, justify=justify, no_wrap=True)
    table.add_column("source", no_wrap=True, overflow="ellipsis")  # one line per preset
    for item in presets():
        if item.alias_of is not None:
            table.add_row(item.name, Text(f"alias of {item.alias_of}"), "", "(old name)")
            continue
        r = row(item)
        table.add_row(r.name, Text(r.pattern), human(r.params), Text(_one_line(item.source)))
    return table


@zoo_app.command("list")
def zoo_list(ctx: typer.Context) -> None:
    """List the presets: name, pattern, parameters and source, one line each."""
    from mixstack.cli.main import _handled, _stdout

    with _handled(ctx):
        _stdout().print(list_table())


@zoo_app.command("show")
def zoo_show(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="preset name (zoo:NAME also accepted)")],
) -> None:
    """Print a preset's YAML as shipped (an alias also names the preset it stands for)."""
    from mixstack.cli.main import _handled
    from mixstack.zoo.table import preset

    with _handled(ctx):
        item = preset(name.removeprefix("zoo:"))
        typer.echo(item.text, nl=not item.text.endswith("\n"))
        if item.alias_of is not None:
            typer.echo(f"# {item.name} is an alias; the preset it stands for:")
            typer.echo(preset(item.alias_of).text, nl=False)
