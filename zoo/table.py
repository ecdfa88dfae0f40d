"""The zoo's catalogue and the README preset table generated from it.

Every preset is a YAML file in this package whose leading comment block follows one
convention (checked by the tests):

    # NAME: one line saying what it is.
    # Source: where the shapes come from (paper, repository and file, checkpoint).
    # Published parameters: 129,135,360 (how it was counted) | 9.78B (...) | unconfirmed (...)

An **alias** keeps an old name working: its only content is ``base: zoo:TARGET`` under
a ``# Alias: ...`` comment.

``python -m mixstack.zoo.table README.md`` rewrites the table between the markers
``<!-- zoo-table:start -->`` and ``<!-- zoo-table:end -->``; ``--check`` exits 1 when
the file is stale (the tests run that check). Parameters are counted on the meta
device (nothing is allocated, so the 8B presets count in seconds); the "published"
column shows the figure of the header's ``Published parameters:`` line, or "—" where the
header says it is unconfirmed.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from mixstack.dsl.errors import MixstackError

START = "<!-- zoo-table:start -->"
END = "<!-- zoo-table:end -->"
NONE = "—"

# "129,135,360", "9.78B", "153M": a figure; anything else ("unconfirmed", "none") is none.
_FIGURE = re.compile(r"^(\d{1,3}(?:,\d{3})+|\d+(?:\.\d+)?[KMB])\b")


@dataclass(frozen=True)
class Preset:
    """One YAML file of the zoo: its name, header lines and, for an alias, its target."""

    name: str
    text: str
    header: tuple[str, ...]
    alias_of: str | None

    def field(self, key: str) -> str | None:
        """The value of a ``# Key: value`` header line, or None."""
        prefix = f"{key}:"
        for line in self.header:
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
        return None

    @property
    def summary(self) -> str:
        """The first header line without its ``NAME:`` prefix."""
        first = self.header[0] if self.header else ""
        return first.removeprefix(f"{self.name}:").strip()

    @property
    def source(self) -> str:
        return self.field("Source") or self.field("Alias") or self.summary

    @property
    def published(self) -> str | None:
        """The published parameter figure as written (``"129,135,360"``, ``"9.78B"``), or
        None where the header says it is unconfirmed or there is none."""
        value = self.field("Published parameters")
        match = _FIGURE.match(value or "")
        return match.group(1) if match else None

    @property
    def published_count(self) -> int | None:
        """The published figure as an exact integer, when it is one (``"129,135,360"``)."""
        figure = self.published
        return int(figure.replace(",", "")) if figure and "," in figure else None


def header_lines(text: str) -> tuple[str, ...]:
    """The leading ``#`` comment block of a YAML file, one entry per non-empty line."""
    lines = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped.startswith("#"):
            break
        body = stripped.lstrip("#").strip()
        if body:
            lines.append(body)
    return tuple(lines)


def _alias_target(text: str) -> str | None:
    data = yaml.safe_load(text)
    if isinstance(data, dict) and set(data) == {"base"} and isinstance(data["base"], str):
        base = data["base"]
        if base.startswith("zoo:"):
            return base.removeprefix("zoo:")
    return None


def presets() -> list[Preset]:
    """Every preset of the installed package, by name (package data, so it works from a
    wheel as well as from a checkout)."""
    folder = resources.files("mixstack.zoo")
    out = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".yaml"):
            continue
        text = entry.read_text("utf-8")
        name = entry.name.removesuffix(".yaml")
        out.append(Preset(name, text, header_lines(text), _alias_target(text)))
    return out


def preset(name: str) -> Preset:
    """The preset called ``name`` (an alias too); a clear error naming the presets else."""
    found = {p.name: p for p in presets()}
    if name not in found:
        from mixstack.dsl.errors import did_you_mean

        hint = did_you_mean(name, list(found))
        suggestion = f"; did you mean {hint!r}?" if hint else ""
        raise MixstackError(
            f"unknown zoo preset {name!r}{suggestion} (presets: {', '.join(found)})"
        )
    return found[name]


@dataclass(frozen=True)
class Row:
    """What the README table and ``zoo list`` show for one preset."""

    name: str
    pattern: str
    layers: int
    d_model: int
    params: int
    published: str | None


def row(item: Preset) -> Row:
    """Load the preset, build it on the meta device and count its parameters."""
    from mixstack.archs.builder import build
    from mixstack.dsl.loader import load_spec

    spec = load_spec(f"zoo:{item.name}")
    model = build(spec, device="meta")
    layers = spec.model.layers
    request = layers.requested
    pattern = request.pattern if request is not None and request.pattern else layers.pattern
    # tied weights are one tensor: parameters() lists each tensor once
    params = sum(p.numel() for p in model.parameters())
    return Row(item.name, pattern, layers.n_layers, spec.model.d_model, params, item.published)


def markdown_table(items: list[Preset] | None = None, rows: dict[str, Row] | None = None) -> str:
    """The README table: one row per preset (aliases listed after it). ``rows``: already
    computed rows by preset name (the rest are computed here)."""
    items = presets() if items is None else items
    rows = {} if rows is None else rows
    lines = [
        "| preset | pattern | layers | d_model | parameters | published |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for item in items:
        if item.alias_of is not None:
            continue
        r = rows[item.name] if item.name in rows else row(item)
        pattern = r.pattern.replace("|", "\\|")  # a table cell; `*` is literal in code
        lines.append(
            f"| `{r.name}` | `{pattern}` | {r.layers} | {r.d_model} | {r.params:,} | "
            f"{r.published or NONE} |"
        )
    aliases = [f"`{i.name}` → `{i.alias_of}`" for i in items if i.alias_of is not None]
    if aliases:
        lines += ["", "Old names kept as aliases: " + ", ".join(aliases) + "."]
    return "\n".join(lines) + "\n"


def render(text: str, table: str) -> str:
    """``text`` with the part between the markers replaced by ``table``."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise MixstackError(f"expected one {START} ... {END} block")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    return f"{head}{START}\n{table}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate the README's zoo preset table.")
    parser.add_argument("readme", type=Path, help="the README.md holding the markers")
    parser.add_argument("--check", action="store_true", help="exit 1 if the table is stale")
    args = parser.parse_args(argv)
    text = args.readme.read_text(encoding="utf-8")
    new = render(text, markdown_table())
    if args.check:
        if new != text:
            print(f"{args.readme}: the zoo table is stale; run python -m mixstack.zoo.table")
            return 1
        return 0
    if new != text:
        tmp = args.readme.with_name(f".{args.readme.name}.tmp")
        tmp.write_text(new, encoding="utf-8")
        tmp.replace(args.readme)  # atomic: never half a README
    return 0


if __name__ == "__main__":
    sys.exit(main())
