"""Every shipped example grid (examples/grids/*.yaml that are grids, not base specs) plans:
`mixstack grid plan` exits 0, the number of points is the one the file asks for
(counted here from the YAML itself), and every point is its base with its overrides."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

import mixstack
from mixstack.ablate import plan

ROOT = Path(__file__).resolve().parents[2]
GRIDS = sorted(
    p
    for p in (ROOT / "examples" / "grids").glob("*.yaml")
    # a grid has a metric; the other files there are the base specs the grids start from
    if "metric" in (yaml.safe_load(p.read_text()) or {})
)


def _expected_points(data: dict) -> int:
    """variants x (axis values, a zip group counting once) x seeds x learning rates."""
    factors = []
    for key, values in (data.get("axes") or {}).items():
        if key == "zip":
            factors += [len(next(iter(group.values()))) for group in values]
        else:
            factors.append(len(values))
    seeds = data.get("seeds", [0])
    return (
        max(1, len(data.get("variants") or {}))
        * math.prod(factors)
        * len(seeds)
        * max(1, len(data.get("lr") or []))
    )


def test_the_examples_are_found():
    names = {p.name for p in GRIDS}
    assert {"mqar_width.yaml", "icll_ngram.yaml"} <= names
    assert "mqar_width_base.yaml" not in names


@pytest.mark.parametrize("path", GRIDS, ids=[p.stem for p in GRIDS])
def test_example_grid_plans(path: Path):
    from typer.testing import CliRunner

    from mixstack.cli.main import app

    data = yaml.safe_load(path.read_text())
    result = CliRunner().invoke(app, ["grid", "plan", str(path)])
    assert result.exit_code == 0, result.output
    n = _expected_points(data)
    assert f": {n} points," in result.output
    p = plan(path)
    assert len(p.points) == n == len({pt.id for pt in p.points})
    bases = {v.name: v.base or p.grid.base for v in p.grid.variants}
    for pt in p.points:
        assert pt.id in result.output
        spec = mixstack.load_spec(bases[pt.variant], pt.overrides)
        assert spec.to_dict() == pt.spec.to_dict()
        assert spec.train.seed == pt.seed
        built = mixstack.build(spec, device="meta")
        assert pt.size.params == sum(t.numel() for t in built.parameters())


def test_icll_example_compares_with_and_without_ngram_layers():
    p = plan(ROOT / "examples" / "grids" / "icll_ngram.yaml")
    types = {}
    for pt in p.points:
        symbols = pt.spec.model.layers.symbols
        used = {symbols[c].type for c in pt.spec.model.layers.pattern if c in symbols}
        types.setdefault(pt.variant, used)
        assert pt.spec.train.task.type == "icll"
        assert p.grid.metric == "val/accuracy"
    assert "ngram" in types["mamba2+ngram"] and "ngram" not in types["mamba2"]
    assert "mamba2" in types["mamba2"] and "mamba2" in types["mamba2+ngram"]
    assert sorted({pt.seed for pt in p.points}) == [0, 1, 2]
