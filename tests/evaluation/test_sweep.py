"""``mixstack eval --task/--lengths/--depths/--out``: eval.csv rows equal evaluations
computed cell by cell here, the plots draw what eval.csv says, a bounded-state model
runs past max_seq_len exactly as the same weights built longer, an attention model is
refused with the length, max_seq_len and the layer named, and bad options are named."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

from mixstack.archs.builder import build
from mixstack.archs.models import MixStackModel
from mixstack.cli.main import app
from mixstack.dsl.loader import load_spec
from mixstack.dsl.spec import ModelSpec
from mixstack.evaluation import sweep as sw
from mixstack.hub.modeldir import save_model_dir
from mixstack.training.evaluate import evaluate, spec_for

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]

SYMBOLS = {
    "M": {"type": "mamba2", "d_state": 8, "headdim": 8, "chunk_size": 16},
    "w": {"type": "attention", "n_heads": 2, "window": 8},  # RoPE, a ring buffer
    "*": {"type": "attention", "n_heads": 2},
    "-": {"type": "mlp", "hidden": 32},
}
# passkey with 3 digits needs 96 bytes (needle, question, key); 112 and 128 fit
MSL = 128
LENGTHS = [112, 144]
DEPTHS = [0.0, 1.0]


def raw_model(pattern: str, max_seq_len: int = MSL) -> dict[str, Any]:
    return {
        "vocab_size": 256,
        "max_seq_len": max_seq_len,
        "d_model": 16,
        "init": {"std": 0.3},  # spread logits: the losses differ between cells
        "layers": {"pattern": pattern, "symbols": SYMBOLS},
    }


def model_spec(pattern: str, max_seq_len: int = MSL) -> ModelSpec:
    return load_spec({"model": raw_model(pattern, max_seq_len)}).model


def same_weights_longer(model: MixStackModel, max_seq_len: int) -> MixStackModel:
    """The reference past ``max_seq_len``: the same weights built for longer inputs."""
    spec = load_spec({"model": {**model.spec.canonical(), "max_seq_len": max_seq_len}}).model
    longer = build(spec, seed=1)
    longer.load_state_dict(model.state_dict())
    return longer.eval()


@pytest.fixture(scope="module")
def recurrent(tmp_path_factory: pytest.TempPathFactory) -> tuple[MixStackModel, Path]:
    model = build(model_spec("Mw-"), seed=0).eval()
    return model, save_model_dir(model, tmp_path_factory.mktemp("rec") / "model")


@pytest.fixture(scope="module")
def attention(tmp_path_factory: pytest.TempPathFactory) -> tuple[MixStackModel, Path]:
    model = build(model_spec("*-"), seed=0).eval()
    return model, save_model_dir(model, tmp_path_factory.mktemp("att") / "model")


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def reference(model: MixStackModel, length: int, depth: float, seed: int = 0) -> dict[str, float]:
    return reference_for(model, length, depth, seed=seed, val_size=3)


def reference_for(
    model: MixStackModel, length: int, depth: float, *, val_size: int, seed: int = 0
) -> dict[str, float]:
    """One cell evaluated the ordinary way (training.evaluate), on a model built long
    enough when the length passes max_seq_len."""
    if length > model.spec.max_seq_len:
        model = same_weights_longer(model, length)
    task = {"type": "passkey", "seq_len": length, "depth": depth, "val_size": val_size}
    task["n_digits"] = 3
    train = {"task": task, "max_steps": 1, "seed": seed}
    return evaluate(model, spec_for(model, train))


def test_decode_path_past_max_seq_len_equals_the_longer_model(recurrent: Any) -> None:
    model, _ = recurrent
    ids = torch.randint(256, (2, 200), generator=torch.Generator().manual_seed(0))
    got = sw.lm_logits(model, ids)  # 128 in one prefill, then 72 steps
    want = same_weights_longer(model, 256)(ids)
    assert got.shape == want.shape == (2, 200, model.spec.total_vocab)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    # where both apply, the prefill half is the plain forward
    torch.testing.assert_close(got[:, :MSL], model(ids[:, :MSL]), atol=1e-6, rtol=1e-6)


def test_sweep_csv_equals_cell_by_cell_evaluation(recurrent: Any, tmp_path: Path) -> None:
    model, folder = recurrent
    out = tmp_path / "sweep"
    args = ["--task", "passkey", "--lengths", "112,144", "--depths", "0,1", "--out", str(out)]
    result = runner.invoke(
        app, ["eval", str(folder), *args, "train.task.val_size=3", "train.task.n_digits=3"]
    )
    assert result.exit_code == 0, result.output
    rows = read_csv(out / "eval.csv")
    assert [(int(r["length"]), float(r["depth"])) for r in rows] == [
        (n, d) for n in LENGTHS for d in DEPTHS
    ]
    losses = set()
    for row in rows:
        want = reference(model, int(row["length"]), float(row["depth"]))
        for name in ("loss", "accuracy", "passkey_exact", "ppl"):
            assert float(row[name]) == pytest.approx(want[name], rel=1e-4, abs=1e-6), name
        losses.add(round(want["loss"], 4))
        assert int(row["n"]) == 3
        assert int(row["max_seq_len"]) == MSL
        assert row["beyond_max_seq_len"] == str(int(row["length"]) > MSL)
        assert row["train_len"] == "" and row["beyond_train_len"] == ""  # no run spec
        assert row["status"] == "ok"
    assert len(losses) >= len(LENGTHS)  # the cells really differ

    # the plots draw eval.csv (passkey_exact: the task's own metric) and read back
    import matplotlib.image as mpimg

    for name in ("heatmap.png", "capacity.png"):
        image = mpimg.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and float(image.std()) > 0.01


def test_plot_series_are_the_csv_values(recurrent: Any, tmp_path: Path) -> None:
    model, _ = recurrent
    train = {"task": {"type": "passkey", "n_digits": 3, "val_size": 2}}
    sm = sw.SweepModel("rec", model, sw.with_length(train), train_len=112)
    rows = sw.sweep([sm], [112, 144], [0.0, 0.5, 1.0])
    sw.write_outputs(rows, tmp_path, "loss")
    table = read_csv(tmp_path / "eval.csv")
    heat = sw.plot_heatmap(rows, "loss", tmp_path / "h.png")["rec"]
    assert heat["lengths"] == [112, 144] and heat["depths"] == [0.0, 0.5, 1.0]
    assert heat["train_len"] == 112
    for row in table:
        i = heat["depths"].index(float(row["depth"]))
        j = heat["lengths"].index(int(row["length"]))
        assert heat["values"][i][j] == pytest.approx(float(row["loss"]), rel=1e-6)
    curve = sw.plot_capacity(rows, "loss", tmp_path / "c.png")["rec"]
    for j, length in enumerate(curve["lengths"]):
        cells = [float(r["loss"]) for r in table if int(r["length"]) == length]
        assert curve["values"][j] == pytest.approx(sum(cells) / 3, rel=1e-6)
    assert [r["beyond_train_len"] for r in table] == ["False"] * 3 + ["True"] * 3


def test_attention_past_max_seq_len_is_refused(attention: Any, tmp_path: Path) -> None:
    _, folder = attention
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["eval", str(folder), "--task", "passkey", "--lengths", "128,144", "--out", str(out)]
    )
    assert result.exit_code == 1
    message = " ".join(result.output.split())
    assert "length 144 exceeds max_seq_len 128" in message
    assert "layer 0 (symbol '*', type 'attention')" in message
    assert "bounded" in message
    assert not out.exists()  # checked before anything is evaluated or written


def test_several_models_refused_cells_are_rows(recurrent: Any, attention: Any) -> None:
    rec, att = recurrent[0], attention[0]
    train = sw.with_length({"task": {"type": "passkey", "n_digits": 3, "val_size": 2}})
    models = [sw.SweepModel("rec", rec, train), sw.SweepModel("att", att, train)]
    rows = sw.sweep(models, [128, 144], None, skip_refused=True)
    status = {(r["model"], r["length"]): r["status"] for r in rows}
    assert status == {
        ("rec", 128): "ok",
        ("rec", 144): "ok",
        ("att", 128): "ok",
        ("att", 144): "refused",
    }
    refused = next(r for r in rows if r["status"] == "refused")
    assert math.isnan(refused["loss"]) and refused["n"] == 0
    curve = sw.capacity_series(rows, "loss")
    assert math.isnan(curve["att"]["values"][1]) and not math.isnan(curve["rec"]["values"][1])


def test_task_option_replaces_the_runs_task(recurrent: Any, tmp_path: Path) -> None:
    """A run trained on MQAR (train.seed 5): --task passkey evaluates passkey at its
    defaults, keeping the run's other train settings (the seed picks the samples)."""
    model, _ = recurrent
    run = tmp_path / "run"
    run.mkdir()
    train = {"task": {"type": "mqar", "seq_len": 64, "vocab_size": 64}, "max_steps": 9, "seed": 5}
    (run / "spec.yaml").write_text(
        yaml.safe_dump({"model": model.spec.canonical(), "train": train})
    )
    save_model_dir(model, run / "model")
    overrides = ["train.task.val_size=3", "train.task.seq_len=112", "train.task.depth=0.5"]
    overrides.append("train.task.n_digits=3")
    result = runner.invoke(app, ["eval", str(run), "--task", "passkey", *overrides])
    assert result.exit_code == 0, result.output
    assert "task: passkey" in result.output
    want = reference(model, 112, 0.5, seed=5)
    other_seed = reference(model, 112, 0.5, seed=0)
    assert want["loss"] != pytest.approx(other_seed["loss"], abs=1e-3)
    printed = {
        line.split()[1]: float(line.split()[3])
        for line in result.output.splitlines()
        if line.startswith("│ val/")
    }
    assert printed["val/loss"] == pytest.approx(want["loss"], abs=1e-4)
    # a sweep of the run: the training length is the run's (64), 112 lies beyond it
    out = tmp_path / "s"
    result = runner.invoke(
        app,
        [
            "eval",
            str(run),
            "--task",
            "passkey",
            "--lengths",
            "112",
            "--out",
            str(out),
            *["train.task.val_size=2"],
        ],
    )
    assert result.exit_code == 0, result.output
    (row,) = read_csv(out / "eval.csv")
    assert row["train_len"] == "64" and row["beyond_train_len"] == "True"
    assert row["depth"] == ""  # passkey's own depth (null: uniform per sample)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--task", "pasky"], ["--task", "unknown task type 'pasky'", "did you mean 'passkey'"]),
        (["--task", "passkey", "--lengths", ""], ["--lengths", "comma-separated"]),
        (["--task", "passkey", "--lengths", "128,x"], ["--lengths", "'x' is not an integer"]),
        (["--task", "passkey", "--lengths", "0"], ["--lengths", "0 is not a positive length"]),
        (["--task", "passkey", "--depths", "0,1.5"], ["--depths", "1.5 is outside [0, 1]"]),
        (["--task", "mqar", "--depths", "0.5"], ["--depths", "task 'mqar' has no depth"]),
        (["--task", "passkey", "--lengths", "40"], ["--lengths 40", "102 bytes"]),
    ],
)
def test_bad_options_are_named(recurrent: Any, args: list[str], expected: list[str]) -> None:
    _, folder = recurrent
    result = runner.invoke(app, ["eval", str(folder), *args, "train.task.val_size=2"])
    assert result.exit_code == 1, result.output
    message = " ".join(result.output.split())
    for part in expected:
        assert part in message, message
    assert "Traceback" not in result.output


def test_shipped_passkey_grid_plans() -> None:
    import mixstack.ablate as ab

    plan = ab.plan(ROOT / "examples" / "grids" / "passkey_dstate.yaml")
    cells = {(p.variant, p.axes["model.layers.symbols.M.d_state"], p.seed) for p in plan.points}
    assert cells == {(v, d, s) for v in ("attention", "mamba2") for d in (4, 16) for s in (0, 1, 2)}
    for p in plan.points:
        task = p.spec.train.task
        assert (task.type, task.seq_len, p.spec.model.max_seq_len) == ("passkey", 256, 256)
        kinds = {c.type for c in p.spec.model.layer_configs()}
        assert kinds == {p.variant}
        # Mamba-2 scales its embeddings (its layers would drown them at init), attention not
        assert p.spec.model.embedding.scale == (p.variant == "mamba2")
        if p.variant == "mamba2":
            assert (
                p.spec.model.layer_configs()[0].d_state == p.axes["model.layers.symbols.M.d_state"]
            )


def test_grid_directory_sweep(tmp_path: Path) -> None:
    """A grid directory as written by the runner (plan and point files from
    ``prepare``), each point's run holding a model: every finished point is swept with
    its variant, axis and seed columns; the pending one is left out; attention's cell
    past max_seq_len is a refused row."""
    from mixstack.ablate.runner import GridDir, prepare

    base = tmp_path / "base.yaml"
    task = {"type": "passkey", "seq_len": 112, "n_digits": 3, "val_size": 4}
    base.write_text(
        yaml.safe_dump({"model": raw_model("*-"), "train": {"task": task, "max_steps": 5}})
    )
    grid = {
        "base": str(base),
        "axes": {"model.d_model": [16, 24]},
        "variants": {"att": {"model.layers.pattern": "*-"}, "rec": {"model.layers.pattern": "Mw-"}},
        "metric": "val/passkey_exact",
    }
    out = tmp_path / "grid"
    plan = prepare(grid, out, retry_failed=False)
    gd = GridDir(out)
    models = {}
    for i, pt in enumerate(plan.points):
        if pt.variant == "rec" and pt.axes["model.d_model"] == 24:
            continue  # stays pending
        model = build(pt.spec.model, seed=i).eval()
        save_model_dir(model, gd.run_dir(pt.id) / "model")
        (gd.run_dir(pt.id) / "spec.yaml").write_text(pt.spec.dump())
        gd.write_status(pt.id, {"id": pt.id, "state": "finished"})
        models[pt.id] = model
    result = runner.invoke(
        app,
        [
            *["eval", str(out), "--lengths", "112,144", "--depths", "0.5"],
            *["--out", str(out / "e"), "train.task.val_size=2"],  # the override: every point
        ],
    )
    assert result.exit_code == 0, result.output
    rows = read_csv(out / "e" / "eval.csv")
    assert list(rows[0])[:6] == ["model", "variant", "model.d_model", "seed", "point", "length"]
    assert {r["point"] for r in rows} == set(models)
    for row in rows:
        assert row["train_len"] == "112"
        model = models[row["point"]]
        assert int(row["model.d_model"]) == model.spec.d_model
        if row["variant"] == "att" and row["length"] == "144":
            assert row["status"] == "refused" and row["loss"] == "nan"
            continue
        want = reference_for(model, int(row["length"]), 0.5, val_size=2)
        assert float(row["loss"]) == pytest.approx(want["loss"], rel=1e-4)


def test_grid_with_lr_list_sweeps_the_sub_run_the_report_chooses(tmp_path: Path) -> None:
    """A grid with ``lr: [a, b]`` has two sub-runs per cell: the sweep evaluates only the
    one with the best logged metric (max for passkey_exact; lr b wins in one cell, lr a in
    the other, and the best value is not the last one logged), labelled and columned by its
    lr. The rows are that sub-run's model's numbers. ``all_lrs`` keeps every sub-run,
    each labelled by its lr."""
    from mixstack.ablate.reporting import tables
    from mixstack.ablate.runner import GridDir, prepare

    base = tmp_path / "base.yaml"
    task = {"type": "passkey", "seq_len": 112, "n_digits": 3, "val_size": 2}
    base.write_text(
        yaml.safe_dump({"model": raw_model("Mw-"), "train": {"task": task, "max_steps": 5}})
    )
    grid = {
        "base": str(base),
        "axes": {"model.d_model": [16, 24]},
        "lr": [1.0e-3, 3.0e-3],
        "metric": "val/passkey_exact",
    }
    out = tmp_path / "grid"
    plan = prepare(grid, out, retry_failed=False)
    gd = GridDir(out)
    # (d_model, lr) -> logged passkey_exact at steps 10, 20: the best is the max, not the last
    logged = {
        (16, 1.0e-3): (0.50, 0.25),
        (16, 3.0e-3): (0.25, 0.75),  # d_model 16: lr 3e-3 is best
        (24, 1.0e-3): (0.90, 0.10),  # d_model 24: lr 1e-3 is best (by its max, 0.90)
        (24, 3.0e-3): (0.50, 0.60),
    }
    models, best = {}, {}
    for i, pt in enumerate(plan.points):
        assert pt.spec.train.optimizer.lr == pt.lr
        model = build(pt.spec.model, seed=10 + i).eval()  # each sub-run its own weights
        run = gd.run_dir(pt.id)
        save_model_dir(model, run / "model")
        (run / "spec.yaml").write_text(pt.spec.dump())
        values = logged[(pt.axes["model.d_model"], pt.lr)]
        lines = ["step,val/passkey_exact"] + [f"{9 + 10 * k},{v}" for k, v in enumerate(values)]
        (run / "metrics.csv").write_text("\n".join(lines) + "\n")
        gd.write_status(pt.id, {"id": pt.id, "state": "finished"})
        models[pt.id] = model
        d = pt.axes["model.d_model"]
        if d not in best or max(values) > best[d][1]:
            best[d] = (pt.id, max(values), pt.lr)
    assert {d: b[2] for d, b in best.items()} == {16: 3.0e-3, 24: 1.0e-3}
    report = tables(out).points  # the grid report's choice is the same sub-run
    assert set(report.loc[report["chosen"], "id"]) == {b[0] for b in best.values()}

    result = runner.invoke(
        app, ["eval", str(out), "--lengths", "112", "--depths", "0.5", "--out", str(out / "e")]
    )
    assert result.exit_code == 0, result.output
    rows = read_csv(out / "e" / "eval.csv")
    columns = ["model", "variant", "model.d_model", "seed", "lr", "point", "length"]
    assert list(rows[0])[:7] == columns
    assert len(rows) == 2
    for row in rows:
        point, _, lr = best[int(row["model.d_model"])]
        assert row["point"] == point and float(row["lr"]) == lr
        assert row["model"].endswith(f"lr {lr:g}")
        want = reference_for(models[point], 112, 0.5, val_size=2)
        assert float(row["loss"]) == pytest.approx(want["loss"], rel=1e-4)
        others = [reference_for(models[p], 112, 0.5, val_size=2)["loss"] for p in models]
        assert sum(math.isclose(float(row["loss"]), o, rel_tol=1e-4) for o in others) == 1

    every = sw.models_from_grid(out, all_lrs=True)
    assert sorted(m.extra["point"] for m in every) == sorted(models)
    assert len({m.label for m in every}) == 4
    assert all(m.label.endswith(f"lr {m.extra['lr']:g}") for m in every)
