"""Model cards (``README.md`` of a model directory) through ``huggingface_hub.ModelCard``.

The metadata block is a validated :class:`huggingface_hub.ModelCardData`
(``library_name: mixstack``, tags, ``pipeline_tag`` from the arch, ``license`` and
``datasets`` when known, ``base_model`` for a model trained from another repository's
weights); the body shows the pattern and the realized ratios, layer counts per type,
parameters, decode-state size, backends, the training task and final metrics when the
card is written from a run, the spec hash and how to load it. Every number comes from
the model itself (:meth:`MixStackModel.report`) or from the run's ``run.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch

from mixstack.archs.models import MixStackModel

PIPELINE_TAGS = {
    "causal_lm": "text-generation",
    "encoder": "fill-mask",
    "classifier": "text-classification",
}


@dataclass
class RunInfo:
    """What a card says about the run that trained the model (from its run directory)."""

    task: dict[str, Any] | None = None  # the resolved train.task section
    metrics: dict[str, float] = field(default_factory=dict)
    steps: int | None = None
    backends: dict[str, str] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)


def _bytes(n: float) -> str:
    for suffix, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {suffix}"
    return f"{int(n)} B"


def _md(text: str) -> str:
    """A table cell: pipes escaped."""
    return str(text).replace("|", "\\|")


def render(
    model: MixStackModel,
    metrics: dict[str, float] | None = None,
    *,
    run: RunInfo | None = None,
    repo_id: str | None = None,
    license: str | None = None,
    base_model: str | None = None,
) -> str:
    """The card text (YAML metadata block + Markdown body)."""
    from huggingface_hub import ModelCard, ModelCardData

    spec = model.spec
    report = model.report(seq_len=spec.max_seq_len, dtype=torch.bfloat16)
    symbols = spec.layers.symbols_in_order
    n = len(symbols)
    run = run or RunInfo()
    metrics = dict(metrics or {})
    metrics.update(run.metrics)
    backends = run.backends or _backends(model)

    types = {spec.layers.symbols[s].type for s in symbols}
    data = ModelCardData(
        library_name="mixstack",
        tags=["mixstack", "sequence-mixers", spec.arch, *sorted(types)],
        pipeline_tag=PIPELINE_TAGS.get(spec.arch),
        license=license,
        datasets=run.datasets or None,
        base_model=base_model,
    )
    lines = [
        f"# mixstack {spec.arch} · `{_md(spec.layers.pattern)}`",
        "",
        "A sequence model built with [mixstack](https://pypi.org/project/mixstack/). The "
        "architecture is data (`config.json`, `spec.yaml`): loading it runs no code from "
        "this repository.",
        "",
        "## Architecture",
        "",
        "| | |",
        "|---|---|",
        f"| pattern | `{_md(spec.layers.pattern)}` ({spec.n_layers} layers) |",
        "| realized ratios | "
        + ", ".join(
            f"`{_md(s)}` {spec.layers.symbols[s].type} {symbols.count(s)}/{n}"
            for s in dict.fromkeys(symbols)
        )
        + " |",
        f"| d_model / vocab | {spec.d_model} / {spec.total_vocab} |",
        f"| parameters | {report.total_params:,} |",
        f"| decode state ({spec.max_seq_len} tokens, bf16) | {report.total_state_bytes:,} bytes "
        f"({_bytes(report.total_state_bytes)}) |",
        f"| backends | {_md(', '.join(f'{k}: {v}' for k, v in backends.items()) or '-')} |",
        f"| spec hash | `{spec.spec_hash}` |",
        "",
        "| layer type | count | parameters | decode state (bytes) |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {_md(row.type)} | {row.count} | {row.params:,} | {row.state_bytes:,} |"
        for row in report.rows_by_type()
    ]
    if run.task is not None:
        settings = {k: v for k, v in run.task.items() if k != "type"}
        lines += [
            "",
            "## Training",
            "",
            "| | |",
            "|---|---|",
            f"| task | {_md(run.task.get('type', '?'))} |",
            f"| task settings | `{_md(json.dumps(settings, sort_keys=True))}` |",
        ]
        if run.datasets:
            lines.append(f"| data | {_md(', '.join(run.datasets))} |")
        if run.steps is not None:
            lines.append(f"| steps | {run.steps} |")
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {_md(name)} | {value:.6g} |" for name, value in sorted(metrics.items())]
    where = f"hf://{repo_id}" if repo_id else "<this folder>"
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import mixstack",
        f'model = mixstack.from_pretrained("{where}")',
        "```",
        "",
        "or `mixstack pull " + (repo_id or "ORG/NAME") + " --out DIR`. The spec can be a base "
        f"of your own: `base: {where}` in a spec file (see mixstack's docs/hub.md).",
        "",
    ]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
    return str(card)


def _backends(model: MixStackModel) -> dict[str, str]:
    try:
        return dict(model.backends.resolved())
    except Exception:  # a model never run has no resolved backends yet
        return {}


def run_info(run_dir: Any) -> RunInfo:
    """:class:`RunInfo` of a run directory (``run.json`` + its ``spec.yaml``)."""
    from pathlib import Path

    import yaml

    root = Path(run_dir)
    meta: dict[str, Any] = {}
    try:
        meta = json.loads((root / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = {}
    task = None
    try:
        spec = yaml.safe_load((root / "spec.yaml").read_text(encoding="utf-8")) or {}
        task = (spec.get("train") or {}).get("task")
    except (OSError, yaml.YAMLError, AttributeError):
        task = None
    metrics = meta.get("metrics") or {}
    datasets = []
    if isinstance(task, dict):
        for key in ("dataset", "hf_dataset"):  # a Hub dataset id, not a local path
            if isinstance(task.get(key), str):
                datasets.append(task[key])
    return RunInfo(
        task=task if isinstance(task, dict) else None,
        metrics={k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
        steps=meta.get("step"),
        backends=meta.get("backends") or {},
        datasets=datasets,
    )
