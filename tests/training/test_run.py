"""Runs through Lightning: exact resume, the run directory, text LM, evaluation."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mixstack
from mixstack.dsl.errors import MixstackError
from mixstack.kernels import native
from mixstack.tasks import make_task
from mixstack.training.data import TaskDataset
from mixstack.training.evaluate import evaluate, spec_for
from mixstack.training.losses import compute_loss
from mixstack.training.rundir import RunDirError


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def _numbers(rows: list[dict[str, str]]) -> list[dict[str, float]]:
    return [{k: float(v) for k, v in row.items() if v != ""} for row in rows]


def _assert_same_history(a: Path, b: Path) -> None:
    ra, rb = _numbers(_rows(a)), _numbers(_rows(b))
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key] == pytest.approx(y[key], abs=1e-6), key


def _max_weight_diff(a: Path, b: Path) -> float:
    wa, wb = (
        load_file(a / "model" / "model.safetensors"),
        load_file(b / "model" / "model.safetensors"),
    )
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def test_stopped_and_resumed_run_equals_the_uninterrupted_one(
    tiny_run, tiny_spec, fit_quietly, tmp_path: Path
) -> None:
    """Dropout, accumulation, a stop off the validation grid: weights and metrics match."""
    out = tmp_path / "resumed"
    first = fit_quietly(tiny_spec("run.stop_after=4"), out)
    assert first.status == "stopped" and first.step == 4 and first.model_dir is None
    second = fit_quietly(tiny_spec(), out, resume=True)
    assert second.status == "finished" and second.step == 6
    assert _max_weight_diff(tiny_run.run_dir, out) <= 1e-6
    _assert_same_history(tiny_run.run_dir, out)
    segments = json.loads((out / "run.json").read_text())["segments"]
    assert [s["start_step"] for s in segments] == [0, 4]


@pytest.mark.slow(budget_s=20)
def test_epoch_based_run_resumes_inside_an_epoch(tiny_spec, fit_quietly, tmp_path: Path) -> None:
    """Text task, max_epochs: the sampler continues from the restored step of the epoch."""
    text = [
        "train.task={type: text, seq_len: 16, val_fraction: 0.2, val_size: 4}",
        "model.vocab_size=256",
        "model.max_seq_len=16",
        "train.max_steps=null",
        "train.max_epochs=2",
        "train.batch_size=64",
        "train.accumulate_grad_batches=1",
        "train.val_every=4",
    ]
    spec = tiny_spec(*text)
    per_epoch = math.ceil(make_task(spec.train, spec.model).epoch_size / 64)
    whole = fit_quietly(spec, tmp_path / "whole")
    assert whole.total_steps == whole.step == 2 * per_epoch
    stop = per_epoch + per_epoch // 2  # inside the second epoch
    fit_quietly(tiny_spec(*text, f"run.stop_after={stop}"), tmp_path / "parts")
    fit_quietly(tiny_spec(*text), tmp_path / "parts", resume=True)
    assert _max_weight_diff(tmp_path / "whole", tmp_path / "parts") <= 1e-6
    _assert_same_history(tmp_path / "whole", tmp_path / "parts")


def test_run_directory_records_what_happened(tiny_run, tiny_spec) -> None:
    root = tiny_run.run_dir
    meta = json.loads((root / "run.json").read_text())
    assert meta["status"] == "finished" and meta["step"] == 6
    assert meta["spec_hash"] == tiny_spec().spec_hash
    # the norms' kernel runs the compiled C kernels where a C compiler is there
    norm = "native" if native.unavailable("norm") is None else "torch"
    assert meta["backends"] == {
        "attention@cpu/float32": "torch",
        "gated_rms_norm@cpu/float32": norm,
    }
    assert {"mixstack", "torch", "lightning", "torchmetrics", "python"} <= set(meta["versions"])
    assert "git" in meta and meta["params"] == tiny_run.params > 0
    assert mixstack.load_spec(str(root / "spec.yaml")) == tiny_spec()
    rows = _rows(root)
    train_steps = [int(r["step"]) for r in rows if r["train/loss"]]
    val_steps = [int(r["step"]) for r in rows if r["val/loss"]]
    assert train_steps == list(range(6)) and val_steps == [2, 5]
    assert tiny_run.metrics["val/loss"] == pytest.approx(float(rows[-1]["val/loss"]))
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    assert sorted(p.name for p in (root / "model").iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "spec.yaml",
    ]


def test_run_json_records_last_and_best_of_every_val_metric(tiny_run) -> None:
    """The task's own metric (MQAR's exact_match) is logged beside loss / accuracy / ppl,
    and run.json keeps each one's last value and its best by the registered direction."""
    root = tiny_run.run_dir
    summary = json.loads((root / "run.json").read_text())["val"]
    assert set(summary) == {"val/loss", "val/accuracy", "val/ppl", "val/exact_match"}
    rows = [r for r in _rows(root) if r["val/loss"]]
    for name, higher in [("val/loss", False), ("val/accuracy", True), ("val/exact_match", True)]:
        values = [(float(r[name]), int(r["step"]) + 1) for r in rows]
        best = max(values, key=lambda v: v[0]) if higher else min(values, key=lambda v: v[0])
        got = summary[name]
        assert got["higher_is_better"] is higher
        assert (got["last"], got["last_step"]) == values[-1] and got["last_step"] == 6
        assert (
            got["best"] == best[0]
            and values[[v[1] for v in values].index(got["best_step"])][0] == best[0]
        )


def test_exported_model_reproduces_the_final_validation(tiny_run, tiny_spec) -> None:
    model = mixstack.from_pretrained(tiny_run.model_dir)
    metrics = evaluate(model, spec_for(model, tiny_spec()))
    for name in ("loss", "accuracy", "ppl"):
        assert metrics[name] == pytest.approx(tiny_run.metrics[f"val/{name}"], rel=1e-5)
    assert metrics["ppl"] == pytest.approx(math.exp(metrics["loss"]), rel=1e-5)


def _tree(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``root``: relative path -> (sha256, mtime in ns)."""
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_run_directory_mistakes_are_refused(
    tiny_run, tiny_spec, fit_quietly, tmp_path: Path
) -> None:
    before = _tree(tiny_run.run_dir)
    with pytest.raises(RunDirError, match="already holds a run; continue it with --resume"):
        fit_quietly(tiny_spec(), tiny_run.run_dir)
    with pytest.raises(RunDirError, match=r"spec differs from the run's in train\.max_steps"):
        fit_quietly(tiny_spec("train.max_steps=7"), tiny_run.run_dir, resume=True)
    with pytest.raises(RunDirError, match=r"has finished \(step 6\).*nothing to resume"):
        fit_quietly(tiny_spec(), tiny_run.run_dir, resume=True)
    assert _tree(tiny_run.run_dir) == before  # refusals write nothing
    with pytest.raises(RunDirError, match="nothing to resume"):
        fit_quietly(tiny_spec(), tmp_path / "empty", resume=True)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="exists and is not an empty directory"):
        fit_quietly(tiny_spec(), other, overwrite=True)
    assert (other / "notes.txt").read_text() == "mine"
    text = ["model.vocab_size=256", "train.task={type: text, files: [missing.txt], seq_len: 16}"]
    with pytest.raises(MixstackError, match=r"text file 'missing\.txt' does not exist"):
        fit_quietly(tiny_spec(*text), tmp_path / "never")
    assert not (tmp_path / "never").exists()  # refused before anything was written


@pytest.mark.slow(budget_s=30)
def test_byte_level_lm_loss_falls_on_the_bundled_text(fit_quietly, tmp_path: Path) -> None:
    spec = mixstack.load_spec(
        {
            "model": {
                "vocab_size": 256,
                "max_seq_len": 64,
                "d_model": 32,
                "layers": {
                    "pattern": "*-*-",
                    "symbols": {"*": {"type": "attention", "n_heads": 2}},
                },
            },
            "train": {
                "task": {"type": "text", "seq_len": 64, "documents": "paragraph", "val_size": 16},
                "optimizer": {"lr": 0.005, "weight_decay": 0.0},
                "schedule": {"type": "constant", "warmup_steps": 5},
                "max_steps": 40,
                "batch_size": 16,
                "val_every": 20,
                "log_every": 5,
            },
        }
    )
    untrained = mixstack.build(spec, seed=spec.train.seed)
    before = evaluate(untrained, spec)["loss"]
    result = fit_quietly(spec, tmp_path / "text")
    val = [r["val/loss"] for r in _numbers(_rows(tmp_path / "text")) if "val/loss" in r]
    assert before == pytest.approx(math.log(260), abs=0.3)  # about uniform over the ids
    assert len(val) == 2 and val[1] < val[0] < before - 2.0
    assert result.metrics["val/ppl"] == pytest.approx(
        math.exp(result.metrics["val/loss"]), rel=1e-5
    )


def test_overwrite_replaces_a_run_but_never_a_users_files(
    tiny_spec, fit_quietly, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    fit_quietly(tiny_spec("train.max_steps=2"), out)
    written = json.loads((out / "run.json").read_text())["written"]
    assert {
        "model/model.safetensors",
        "checkpoints/last.ckpt",
        "logs/version_0/metrics.csv",
    } <= set(written)
    # A user's files anywhere in the run, the folders the run writes included.
    mine = ["notes.txt", "model/my_eval.json", "checkpoints/best_by_hand.ckpt", "logs/notes.md"]
    for name in mine:
        (out / name).write_text("mine")
    before = _tree(out)
    with pytest.raises(RunDirError) as refused:
        fit_quietly(tiny_spec("train.max_steps=2"), out, overwrite=True)
    assert (
        "holds files the run did not write (checkpoints/best_by_hand.ckpt, logs/notes.md, "
        "model/my_eval.json, notes.txt)" in str(refused.value)
    )
    assert _tree(out) == before  # nothing deleted
    for name in mine:
        (out / name).unlink()
    replaced = fit_quietly(tiny_spec("train.max_steps=3"), out, overwrite=True)
    assert replaced.step == 3
    assert len(json.loads((out / "run.json").read_text())["segments"]) == 1


def _not_plain_data(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    state["callback"] = print  # a global the weights_only unpickler refuses
    torch.save(state, path)


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [(_truncated, "RuntimeError"), (_not_plain_data, "Unsupported global")],
)
def test_a_damaged_or_unsafe_checkpoint_is_refused_before_anything_is_written(
    tiny_spec, fit_quietly, tmp_path: Path, damage, fragment: str
) -> None:
    out = tmp_path / "run"
    fit_quietly(tiny_spec("run.stop_after=3"), out)
    damage(out / "checkpoints" / "last.ckpt")
    before = _tree(out)
    with pytest.raises(
        RunDirError, match=r"cannot resume from .*last\.ckpt.*weights_only=True"
    ) as e:
        fit_quietly(tiny_spec(), out, resume=True)
    assert fragment in str(e.value) and "\x1b" not in str(e.value)
    assert _tree(out) == before


def test_train_loss_is_the_loss_of_the_whole_global_batch(
    tiny_spec, fit_quietly, tmp_path: Path
) -> None:
    """With 2 micro-batches per step, the logged loss of step 0 is that of the initial
    model on all samples (0, 0..G-1), not of the last micro-batch."""
    spec = tiny_spec("model.dropout=0.0", "train.max_steps=1")
    fit_quietly(spec, tmp_path / "run")
    logged = [r["train/loss"] for r in _numbers(_rows(tmp_path / "run")) if "train/loss" in r]
    task = make_task(spec.train, spec.model)
    batch = [task.sample("train", 0, i) for i in range(spec.train.batch_size)]
    ids = torch.stack([b["input_ids"] for b in batch])
    labels = torch.stack([b["labels"] for b in batch])
    model = mixstack.build(spec, seed=spec.train.seed).eval()
    with torch.no_grad():
        whole = float(compute_loss("next_token", model(ids), labels))
        half = float(compute_loss("next_token", model(ids[4:]), labels[4:]))
    assert logged == [pytest.approx(whole, abs=1e-6)]
    assert abs(whole - half) > 1e-4  # the check can tell the two apart


def test_run_and_model_files_are_not_owner_only(tiny_run, tmp_path: Path) -> None:
    """Atomic writes must not leave tempfile's 0o600 / 0o700 modes behind."""
    probe = tmp_path / "probe"
    probe.write_text("")
    (tmp_path / "probe_dir").mkdir()
    file_mode = stat.S_IMODE(probe.stat().st_mode)
    dir_mode = stat.S_IMODE((tmp_path / "probe_dir").stat().st_mode)
    root = tiny_run.run_dir
    for path in [
        root / "spec.yaml",
        root / "run.json",
        root / "metrics.csv",
        *sorted((root / "model").iterdir()),
    ]:
        assert stat.S_IMODE(path.stat().st_mode) == file_mode, path
    assert stat.S_IMODE((root / "model").stat().st_mode) == dir_mode
    assert os.access(root / "model" / "model.safetensors", os.R_OK)


ENCODER = {
    "model": {
        "arch": "encoder",
        "vocab_size": 256,
        "max_seq_len": 32,
        "d_model": 32,
        "layers": {
            "pattern": "*-*-",
            "symbols": {"*": {"type": "attention", "n_heads": 2, "causal": False}},
        },
    },
    "train": {
        "task": {"type": "text", "seq_len": 32, "val_size": 16},
        "mlm": {"mask_rate": 0.3},
        "optimizer": {"lr": 0.005, "weight_decay": 0.0},
        "schedule": {"type": "constant"},
        "max_steps": 30,
        "batch_size": 16,
        "val_every": 15,
        "log_every": 5,
    },
}
CLASSIFIER = {
    "model": {
        "arch": "classifier",
        "vocab_size": 8,
        "max_seq_len": 16,
        "d_model": 32,
        "classifier": {"n_classes": 4},
        "layers": {"pattern": "*-", "symbols": {"*": {"type": "attention", "n_heads": 2}}},
    },
    "train": {
        "task": {"type": "majority", "seq_len": 16, "val_size": 64},
        "optimizer": {"lr": 0.005, "weight_decay": 0.0},
        "schedule": {"type": "constant"},
        "max_steps": 30,
        "batch_size": 32,
        "val_every": 15,
        "log_every": 5,
    },
}


@pytest.mark.slow(budget_s=30)
def test_encoder_learns_masked_lm_on_masked_positions_only(fit_quietly, tmp_path: Path) -> None:
    spec = mixstack.load_spec(ENCODER)
    dataset = TaskDataset(make_task(spec.train, spec.model), "val", spec)
    sample = dataset[(0, 3)]
    masked = sample["input_ids"] == spec.train.mlm.mask_id
    assert torch.equal(masked, sample["labels"] != -100)  # scored exactly where masked
    assert 0.1 < masked.float().mean() < 0.5 and torch.equal(
        sample["labels"], dataset[(0, 3)]["labels"]
    )
    before = evaluate(mixstack.build(spec, seed=spec.train.seed), spec)
    result = fit_quietly(spec, tmp_path / "mlm")
    assert result.metrics["val/loss"] < before["loss"] - 1.5
    assert result.metrics["val/ppl"] == pytest.approx(
        math.exp(result.metrics["val/loss"]), rel=1e-5
    )


@pytest.mark.slow(budget_s=20)
def test_classifier_learns_the_majority_task(fit_quietly, tmp_path: Path) -> None:
    spec = mixstack.load_spec(CLASSIFIER)
    before = evaluate(mixstack.build(spec, seed=spec.train.seed), spec)
    result = fit_quietly(spec, tmp_path / "cls")
    assert "val/ppl" not in result.metrics
    assert before["accuracy"] < 0.5 and result.metrics["val/accuracy"] >= 0.9
    model = mixstack.from_pretrained(result.model_dir)
    assert model(torch.zeros(2, 16, dtype=torch.long)).shape == (2, 4)
