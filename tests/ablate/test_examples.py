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


def test_read_twice_example_switches_only_read_twice():
    """Per variant and seed, the two points differ in read-twice and the lengths it
    doubles, and nothing else: the twice task's samples are the single task's samples
    shown twice, scored only in the second copy (the same MQAR instances in both arms)."""
    from mixstack.tasks import make_task
    from mixstack.tasks.base import IGNORE_INDEX

    p = plan(ROOT / "examples" / "grids" / "read_twice.yaml")
    arms: dict[tuple[str, int], dict[bool, object]] = {}
    for pt in p.points:
        arms.setdefault((pt.variant, pt.seed), {})[pt.spec.train.task.read_twice] = pt.spec
    assert sorted(arms) == [(v, s) for v in ("mamba2_d1", "mamba2_d16") for s in (0, 1, 2)]
    for (variant, seed), pair in arms.items():
        once, twice = pair[False], pair[True]
        assert once.train.seed == twice.train.seed == seed
        layer = once.model.layers.symbols["M"]
        assert layer.type == "mamba2" and layer.d_state <= 16
        assert (layer.d_state, layer.headdim) == {"mamba2_d1": (1, 128), "mamba2_d16": (16, 16)}[
            variant
        ]
        task = once.train.task
        assert task.n_queries is not None and task.n_queries < task.n_pairs
        assert twice.train.task.seq_len == twice.model.max_seq_len == 2 * task.seq_len
        assert once.model.max_seq_len == task.seq_len
        # nothing else differs: undo the axis and the specs are equal
        undone = twice.to_dict()
        undone["train"]["task"].update(read_twice=False, seq_len=task.seq_len)
        undone["model"]["max_seq_len"] = once.model.max_seq_len
        assert undone == once.to_dict()
        one, two = make_task(once.train, once.model), make_task(twice.train, twice.model)
        for split, step, index in [("train", 0, 0), ("train", 7, 3), ("val", 0, 5)]:
            a, b = one.sample(split, step, index), two.sample(split, step, index)
            assert b["input_ids"].tolist() == a["input_ids"].tolist() * 2
            assert b["labels"].tolist() == [IGNORE_INDEX] * task.seq_len + a["labels"].tolist()
            # one scored query, asking a key of the context
            (at,) = (a["labels"] != IGNORE_INDEX).nonzero().flatten().tolist()
            assert a["input_ids"][at] in a["input_ids"][: 2 * task.n_pairs : 2]
