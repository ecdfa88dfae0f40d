"""Outputs of ``mixstack bench``: the Markdown table, the JSON file, log-log plots, and the
comparison with an earlier JSON file (ratios old median / new median per entry)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mixstack.benchmarks.suites import SuiteResult
from mixstack.dsl.errors import MixstackError

FORMAT = "mixstack-bench/1"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def to_json(
    result: SuiteResult, machine: dict[str, Any], options: dict[str, Any]
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "machine": machine,
        "options": options,
        "checks": result.checks,
        "entries": [e.as_json() for e in result.entries],
        "ratios": [r.as_json() for r in result.ratios],
    }


def load_json(path: Path) -> dict[str, Any]:
    """An earlier ``bench.json``; a clear error for a missing or foreign file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise MixstackError(f"--compare: no such file {str(path)!r}") from error
    except (OSError, json.JSONDecodeError) as error:
        raise MixstackError(f"--compare: {str(path)!r} is not readable JSON: {error}") from error
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise MixstackError(
            f"--compare: {str(path)!r} is not a `mixstack bench` result (expected "
            f"format {FORMAT!r}, got {data.get('format') if isinstance(data, dict) else data!r})"
        )
    return data


def compare(data: dict[str, Any], old: dict[str, Any]) -> list[tuple[str, float, float, float]]:
    """``(key, old median, new median, old/new)`` for every entry present in both (> 1:
    the new run is faster)."""
    before = {e["key"]: e["median_s"] for e in old.get("entries", [])}
    rows = []
    for e in data["entries"]:
        if e["key"] in before and e["median_s"] > 0:
            rows.append(
                (e["key"], before[e["key"]], e["median_s"], before[e["key"]] / e["median_s"])
            )
    return rows


def markdown(data: dict[str, Any], comparison: list[tuple[str, float, float, float]] | None) -> str:
    """The report: machine, equality checks, one table per suite, ratios with goals."""
    m = data["machine"]
    load = m.get("load_average")
    lines = [
        "# mixstack bench",
        "",
        f"- CPU: {m['cpu']} ({m['cpu_count']} logical CPUs), {m['threads']} torch threads"
        + (f", GPU: {m['cuda']}" if m.get("cuda") else ""),
        f"- torch {m['torch']}, transformers {m.get('transformers')}, Python {m['python']}",
        "- load average at the end (1/5/15 min): "
        + ("n/a" if not load else " / ".join(f"{x:.2f}" for x in load)),
        "- kernel backends: "
        + (", ".join(f"{k}: {v}" for k, v in sorted(m["backends"].items())) or "none resolved"),
        "",
        "## Equality checks (fp32, outputs and gradients, before timing)",
        "",
        "| pair | max relative error |",
        "|---|---|",
    ]
    lines += [f"| {name} | {err:.1e} |" for name, err in data["checks"].items()]
    for suite in ("mixers", "models", "decode"):
        entries = [e for e in data["entries"] if e["suite"] == suite]
        if not entries:
            continue
        lines += ["", f"## {suite}", ""]
        lines += [
            "| contender | mode | L | B | median ms | peak MiB | tokens/s | state bytes/seq "
            "| rounds |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for e in entries:
            tps = e["extra"].get("tokens_per_s")
            sb = e["extra"].get("state_bytes")
            lines.append(
                f"| {e['name']} | {e['mode']} | {e['length']} | {e['batch']} | "
                f"{_ms(e['median_s'])} | {_mib(e['peak_bytes'])} | "
                f"{'-' if tps is None else f'{tps:,.0f}'} | "
                f"{'-' if sb is None else f'{sb:,.0f}'} | {len(e['times'])} |"
            )
    if data["ratios"]:
        lines += ["", "## Ratios (medians of interleaved rounds)", ""]
        lines += ["| ratio | L | value | goal | met |", "|---|---|---|---|---|"]
        for r in data["ratios"]:
            goal = "-" if r["goal"] is None else ("≤ " if r["at_most"] else "≥ ") + f"{r['goal']:g}"
            met = {None: "-", True: "yes", False: "no"}[r["met"]]
            lines.append(f"| {r['name']} | {r['length']} | {r['value']:.2f} | {goal} | {met} |")
    if comparison is not None:
        lines += ["", "## Against the earlier run (old median / new median; > 1: faster now)", ""]
        lines += ["| entry | old ms | new ms | old/new |", "|---|---|---|---|"]
        lines += [f"| {k} | {_ms(a)} | {_ms(b)} | {r:.2f} |" for k, a, b, r in comparison]
    return "\n".join(lines) + "\n"


def plots(data: dict[str, Any], out: Path) -> list[Path]:
    """Log-log median time vs L per contender (mixers: solid fwd, dashed fwd+bwd; decode:
    step latency). matplotlib is imported here only."""
    from mixstack.benchmarks.common import pyplot, save_figure

    written = []
    for suite, modes in (("mixers", ("fwd", "fwd+bwd")), ("decode", ("step",))):
        entries = [e for e in data["entries"] if e["suite"] == suite and e["mode"] in modes]
        lengths = {e["length"] for e in entries}
        if len(lengths) < 2:
            continue  # a single length is a table, not a curve
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(7, 4.5))
        names = list(dict.fromkeys(e["name"] for e in entries))
        for i, name in enumerate(names):
            for mode, style in zip(modes, ("-", "--"), strict=False):
                pts = sorted(
                    (e["length"], e["median_s"])
                    for e in entries
                    if e["name"] == name and e["mode"] == mode
                )
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    ax.loglog(
                        xs, ys, style, marker="o", color=f"C{i % 10}", label=f"{name} ({mode})"
                    )
        ax.set_xlabel("sequence length L" if suite == "mixers" else "context length")
        ax.set_ylabel("median seconds per call")
        ax.set_title(f"mixstack bench: {suite}")
        path = out / f"{suite}.png"
        save_figure(fig, (ax,), path)
        written.append(path)
    return written
