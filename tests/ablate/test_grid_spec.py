"""Grid YAML: located errors (file:line:col and YAML path), expansion, metric direction."""

from __future__ import annotations

import pytest

from mixstack.ablate import load_grid
from mixstack.dsl.errors import SpecError


def _issues(exc: pytest.ExceptionInfo[SpecError]) -> list[str]:
    return [i.render() for i in exc.value.issues]


def test_expansion_product_zip_variants(write_grid):
    path = write_grid(
        """\
base: base.yaml
axes:
  model.d_model: [16, 32]
  zip:
    - {train.batch_size: [4, 8, 12], train.task.n_pairs: [1, 2, 3]}
variants:
  att: {model.layers.pattern: "*-"}
  ssm: {model.layers.pattern: "M-"}
seeds: [0, 1]
metric: accuracy
"""
    )
    grid = load_grid(path)
    assert grid.metric == "val/accuracy" and grid.mode == "max"
    cells = grid.cells()
    assert len(cells) == 2 * 2 * 3
    got = [(v.name, tuple((s.key, s.value) for s in settings)) for v, settings in cells]
    # independent expansion: variants outermost, then d_model, then the zipped pairs
    want = [
        (v, (("model.d_model", d), ("train.batch_size", b), ("train.task.n_pairs", n)))
        for v in ("att", "ssm")
        for d in (16, 32)
        for b, n in ((4, 1), (8, 2), (12, 3))
    ]
    assert got == want
    # each setting knows where the grid file says it
    d32 = cells[3][1][0]
    assert d32.value == 32 and d32.path == ("axes", "model.d_model", 1)
    assert d32.origin.endswith("grid.yaml:3:23")


def test_every_problem_is_located(write_grid):
    path = write_grid(
        """\
base: base.yaml
axis:
  model.d_model: [16]
axes:
  model.d_model: 16
  zip:
    - {train.batch_size: [4, 8], train.seed: [1]}
seeds: [0, 0]
metric: val/loss
mode: max
budget: {tokenz: 100}
"""
    )
    with pytest.raises(SpecError) as exc:
        load_grid(path)
    text = "\n".join(_issues(exc))
    assert "grid.yaml:2:1: axis: unknown grid key 'axis'" in text
    assert "did you mean 'axes'?" in text
    assert "grid.yaml:5:18: axes.model.d_model: an axis needs a non-empty list" in text
    assert "grid.yaml:7:7: axes.zip[0]: the lists of a zip group must have the same length" in text
    assert "grid.yaml:8:1: seeds: seeds must be a list of distinct" in text
    assert "mode 'max' contradicts metric val/loss" in text and "grid.yaml:10:7" in text
    assert "unknown budget kind 'tokenz'" in text and "did you mean 'tokens'?" in text


def test_metric_must_be_registered(write_grid):
    path = write_grid("base: base.yaml\nmetric: val/acuracy\n")
    with pytest.raises(SpecError) as exc:
        load_grid(path)
    text = str(exc.value)
    assert "grid.yaml:2:9: metric: unknown metric 'val/acuracy'" in text
    assert "did you mean 'val/accuracy'?" in text


def test_mode_agreeing_with_registry_is_accepted(write_grid):
    grid = load_grid(write_grid("base: base.yaml\nmetric: val/loss\nmode: min\n"))
    assert grid.mode == "min"


def test_match_and_overlaps(write_grid):
    path = write_grid(
        """\
base: base.yaml
axes: {model.d_model: [16]}
variants:
  a: {model.d_model: 32}
metric: accuracy
match: {quantity: parms, to: b, knob: model.d_model}
"""
    )
    with pytest.raises(SpecError) as exc:
        load_grid(path)
    text = str(exc.value)
    assert "variants.a.model.d_model: variant 'a' sets model.d_model, which is an axis" in text
    assert "match.quantity must be one of params, flops, state_bytes" in text
    assert "did you mean 'params'?" in text
    assert "match.to names no variant: 'b'" in text


def test_match_knob_must_be_free(write_grid):
    path = write_grid(
        """\
base: base.yaml
axes: {model.d_model: [16]}
metric: accuracy
match: {quantity: params, to: 20000, knob: model.d_model}
"""
    )
    with pytest.raises(SpecError) as exc:
        load_grid(path)
    assert "grid.yaml:4:44: match.knob: match.knob 'model.d_model' is also set by " in str(
        exc.value
    )
