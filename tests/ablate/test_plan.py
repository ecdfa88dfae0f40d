"""Planning: point ids, budgets, the sizing solver, invalid points stopped before training."""

from __future__ import annotations

import json

import pytest
import torch

import mixstack
from mixstack.ablate import plan
from mixstack.ablate.planner import point_id
from mixstack.dsl.errors import SpecError

GRID = """\
base: base.yaml
axes:
  model.d_model: [16, 32]
variants:
  att: {model.layers.pattern: "*-"}
  ssm: {model.layers.pattern: "M-"}
seeds: [0, 1]
metric: val/accuracy
"""


def _report(spec):
    model = mixstack.build(spec, device="meta")
    return model.report(spec.train.task.seq_len, dtype=torch.bfloat16)


def test_points_sizes_and_ids(write_grid, tmp_path):
    p = plan(write_grid(GRID))
    assert len(p.points) == 8 and len(p.cells) == 4
    for pt in p.points:
        # the point is the base with its overrides, loaded independently
        spec = mixstack.load_spec(str(tmp_path / "base.yaml"), pt.overrides)
        assert spec.to_dict() == pt.spec.to_dict()
        assert spec.train.seed == pt.seed
        assert spec.model.d_model == pt.axes["model.d_model"]
        rep = _report(spec)
        assert (
            pt.size.params
            == rep.total_params
            == sum(x.numel() for x in mixstack.build(spec).parameters())
        )
        assert pt.size.flops_per_token == rep.total_flops_per_token
        assert pt.size.state_bytes == rep.total_state_bytes
        assert pt.steps == 4 and pt.tokens == 4 * 4 * 16
    assert len({pt.id for pt in p.points}) == 8


def test_ids_survive_an_added_axis_value(write_grid):
    before = {(pt.cell, pt.seed): pt.id for pt in plan(write_grid(GRID)).points}
    after = plan(write_grid(GRID.replace("[16, 32]", "[8, 16, 32]"), "grid2.yaml")).points
    assert len(after) == 12
    kept = {(pt.cell, pt.seed): pt.id for pt in after if (pt.cell, pt.seed) in before}
    assert kept == before  # same resolved spec + seed -> same id, wherever it sits
    assert all(pt.id == point_id(pt.spec) for pt in after)


def test_budgets(write_grid):
    tokens = write_grid(GRID + "budget: {tokens: 1000}\n", "tokens.yaml")
    for pt in plan(tokens).points:
        assert pt.steps == round(1000 / (4 * 16)) == pt.spec.train.max_steps
    flops = write_grid(GRID + "budget: {flops: 3.0e8}\n", "flops.yaml")
    steps = set()
    for pt in plan(flops).points:
        f = _report(pt.spec).total_flops_per_token
        assert pt.steps == round(3.0e8 / (3 * f) / 64) == pt.spec.train.max_steps
        assert pt.train_flops == pytest.approx(3 * f * pt.steps * 64)
        steps.add(pt.steps)
    assert len(steps) == 4  # matched FLOPs: wider models get fewer steps
    lrs = write_grid(GRID + "lr: [0.001, 0.003]\nbudget: {steps: 7}\n", "lrs.yaml")
    pts = plan(lrs).points
    assert len(pts) == 16
    assert sorted({pt.spec.train.optimizer.lr for pt in pts}) == [0.001, 0.003]
    assert {pt.spec.train.max_steps for pt in pts} == {7}


def test_sizing_solver_finds_the_closest_valid_knob(write_grid, tmp_path):
    grid = """\
base: base.yaml
set: {model.d_model: 32}
variants:
  att: {model.layers.pattern: "*-"}
  ssm: {model.layers.pattern: "M-"}
metric: val/accuracy
match: {quantity: params, to: att, knob: model.layers.symbols.-.hidden, tolerance: 0.05}
"""
    p = plan(write_grid(grid))
    att = next(pt for pt in p.points if pt.variant == "att")
    ssm = next(pt for pt in p.points if pt.variant == "ssm")
    assert att.knob is None
    # independent reference: every hidden width from 1 to 256, the closest in params
    target = att.size.params
    base = str(tmp_path / "base.yaml")
    best = min(
        range(1, 257),
        key=lambda h: abs(
            _report(
                mixstack.load_spec(
                    base,
                    [
                        "model.d_model=32",
                        'model.layers.pattern="M-"',
                        f"model.layers.symbols.-.hidden={h}",
                    ],
                )
            ).total_params
            - target
        ),
    )
    assert ssm.knob == best
    assert ssm.spec.model.layers.symbols["-"].hidden == best
    assert ssm.residual == pytest.approx(ssm.size.params / target - 1)
    assert abs(ssm.residual) <= 0.05


def test_solver_skips_values_that_fail_checks(write_grid):
    # mamba2 needs expand·d_model % headdim == 0 (headdim 8, expand 2: d_model % 4)
    grid = """\
base: base.yaml
variants:
  att: {model.layers.pattern: "*-"}
  ssm: {model.layers.pattern: "M-"}
metric: val/accuracy
match: {quantity: params, to: 9000, knob: model.d_model, tolerance: 0.2}
"""
    for pt in plan(write_grid(grid)).points:
        assert pt.knob % 4 == 0 and pt.spec.model.d_model == pt.knob
        assert abs(pt.size.params / 9000 - 1) <= 0.2


def test_solver_reports_an_unreachable_tolerance(write_grid):
    grid = """\
base: base.yaml
metric: val/accuracy
match: {quantity: params, to: 9000, knob: model.layers.symbols.*.n_heads, tolerance: 0.01}
"""
    with pytest.raises(SpecError) as exc:
        plan(write_grid(grid))
    assert "no valid model.layers.symbols.*.n_heads brings params within 1.0%" in str(exc.value)


def test_invalid_point_names_point_axis_value_and_yaml_path(write_grid, tmp_path):
    from mixstack.ablate.runner import run_grid

    path = write_grid(GRID.replace("[16, 32]", "[16, 30]"))
    with pytest.raises(SpecError) as exc:
        run_grid(path, tmp_path / "out")
    text = str(exc.value)
    # d_model 30 is not divisible by headdim for mamba2 (expand·30 % 8) and by the heads
    assert "point 7/8 (ssm | model.d_model=30) is invalid" in text
    assert "model.d_model=30 (axes.model.d_model[1] at " in text
    assert "grid.yaml:3:23)" in text
    assert "grid.yaml:3:23: axes.model.d_model[1]: point 7/8" in text
    assert not (tmp_path / "out" / "points").exists()  # nothing was prepared or trained
    assert not (tmp_path / "out" / "grid.json").exists()


def test_plan_cli_table(write_grid):
    from typer.testing import CliRunner

    from mixstack.cli.main import app

    path = write_grid(GRID)
    result = CliRunner().invoke(app, ["grid", "plan", str(path)])
    assert result.exit_code == 0, result.output
    for pt in plan(path).points:
        assert pt.id in result.output
        assert f"{pt.size.params:,}" in result.output
    bad = write_grid(GRID.replace("[16, 32]", "[16, 30]"), "bad.yaml")
    result = CliRunner().invoke(app, ["grid", "plan", str(bad)])
    assert result.exit_code == 1
    assert "is invalid" in result.output and "axes.model.d_model[1]" in result.output
    json.dumps([pt.to_dict() for pt in plan(path).points])  # plain data


def test_a_variant_may_start_from_its_own_base(write_grid, tmp_path):
    (tmp_path / "other.yaml").write_text("base: base.yaml\nmodel: {d_model: 24}\n")
    grid = """\
base: base.yaml
variants:
  plain: {}
  other: {base: other.yaml, model.layers.pattern: "M-"}
metric: val/accuracy
"""
    plain, other = plan(write_grid(grid)).points
    assert plain.spec.model.d_model == 16 and plain.spec.model.layers.pattern == "*-"
    assert other.spec.model.d_model == 24 and other.spec.model.layers.pattern == "M-"


HUB_GRID = """\
base: base.yaml
set: {run.hub.repo_id: me/grid}
variants:
  att: {model.layers.pattern: "*-"}
  ssm+conv: {model.layers.pattern: "M-"}
seeds: [0, 1]
metric: val/accuracy
"""


def test_run_hub_branch_per_point(write_grid):
    # default: one branch per point, named by the point id (the run section is not
    # part of the id, so setting run.hub changes no id)
    p = plan(write_grid(HUB_GRID))
    plain = plan(write_grid(HUB_GRID.replace("set: {run.hub.repo_id: me/grid}\n", ""), "b.yaml"))
    assert [pt.id for pt in p.points] == [pt.id for pt in plain.points]
    assert [pt.hub for pt in p.points] == [f"hf://me/grid@{pt.id}" for pt in p.points]
    assert all(pt.hub is None for pt in plain.points)
    assert all(pt.spec.run.hub.revision == pt.id for pt in p.points)
    # a template with placeholders
    text = HUB_GRID.replace(
        "{run.hub.repo_id: me/grid}",
        "{run.hub: {repo_id: me/grid, revision: 'v1/{variant}-s{seed}'}}",
    )
    p = plan(write_grid(text))
    assert [pt.spec.run.hub.revision for pt in p.points] == [
        "v1/att-s0",
        "v1/att-s1",
        "v1/ssm+conv-s0",
        "v1/ssm+conv-s1",
    ]
    assert p.points[2].to_dict()["hub"] == "hf://me/grid@v1/ssm+conv-s0"


def test_run_hub_branches_that_collide_or_are_invalid_stop_the_plan(write_grid):
    same = HUB_GRID.replace(
        "{run.hub.repo_id: me/grid}", "{run.hub: {repo_id: me/grid, revision: 'v1-{variant}'}}"
    )
    with pytest.raises(SpecError) as err:
        plan(write_grid(same))
    text = str(err.value)
    assert (
        "points 1 (att, seed 0) and 2 (att, seed 1) would both push to hf://me/grid@v1-att" in text
    )
    assert "grid.yaml:2:" in text and "each point needs its own branch" in text
    assert "{point}" in text
    unknown = HUB_GRID.replace(
        "{run.hub.repo_id: me/grid}", "{run.hub: {repo_id: me/grid, revision: '{pont}'}}"
    )
    with pytest.raises(SpecError, match=r"unknown placeholder \{pont\}.*allowed: \{point\}"):
        plan(write_grid(unknown))
    bad = HUB_GRID.replace(
        "{run.hub.repo_id: me/grid}", "{run.hub: {repo_id: me/grid, revision: 'a..{point}'}}"
    )
    with pytest.raises(SpecError, match=r"gives 'a\.\.[0-9a-f]{12}', not a branch name"):
        plan(write_grid(bad))
    # set by a variant: the error points at the variant's setting
    in_variant = HUB_GRID.replace("set: {run.hub.repo_id: me/grid}\n", "").replace(
        'att: {model.layers.pattern: "*-"}',
        'att: {model.layers.pattern: "*-", run.hub: {repo_id: me/g, revision: x}}',
    )
    with pytest.raises(SpecError) as err:
        plan(write_grid(in_variant))
    assert "grid.yaml:3:" in str(err.value) and "variants.att" in str(err.value)
