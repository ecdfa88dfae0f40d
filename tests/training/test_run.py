"""Runs through Lightning: exact resume, the run directory, text LM, evaluation."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mixstack
from mixstack.dsl.errors import MixstackError
from mixstack.tasks import make_task
from mixstack.training.evaluate import evaluate, spec_for
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
    assert meta["backends"] == {"attention@cpu/float32": "torch"}
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


def test_exported_model_reproduces_the_final_validation(tiny_run, tiny_spec) -> None:
    model = mixstack.from_pretrained(tiny_run.model_dir)
    metrics = evaluate(model, spec_for(model, tiny_spec()))
    for name in ("loss", "accuracy", "ppl"):
        assert metrics[name] == pytest.approx(tiny_run.metrics[f"val/{name}"], rel=1e-5)
    assert metrics["ppl"] == pytest.approx(math.exp(metrics["loss"]), rel=1e-5)


def test_run_directory_mistakes_are_refused(
    tiny_run, tiny_spec, fit_quietly, tmp_path: Path
) -> None:
    with pytest.raises(RunDirError, match="already holds a run; continue it with --resume"):
        fit_quietly(tiny_spec(), tiny_run.run_dir)
    with pytest.raises(RunDirError, match=r"spec differs from the run's in train\.max_steps"):
        fit_quietly(tiny_spec("train.max_steps=7"), tiny_run.run_dir, resume=True)
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
