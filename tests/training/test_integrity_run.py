"""Runs that go wrong: non-finite losses, failures before the first step, batch splits
checked at load, resuming what is not a run, Ctrl-C, and eval/verify on run directories."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import mixstack
from mixstack.cli.main import app
from mixstack.dsl.errors import MixstackError, SpecError
from mixstack.hub import integrity
from mixstack.training.lit import NonFiniteLossError
from mixstack.training.rundir import RunDirError

runner = CliRunner()
# An lr this large makes the tiny model's loss overflow within a few steps.
NAN_LR = "train.optimizer={type: sgd, lr: 1.0e30, momentum: 0.0}"


def _losses(run: Path) -> list[float]:
    text = (run / "metrics.csv").read_text().splitlines()
    header = text[0].split(",")
    col = header.index("train/loss")
    return [float(line.split(",")[col]) for line in text[1:] if line.split(",")[col]]


def _poison_from_step(monkeypatch: pytest.MonkeyPatch, step: int, accumulate: int) -> None:
    """Make the training loss NaN from optimizer step ``step`` on (each training
    micro-batch calls compute_loss once; ``accumulate`` of them make a step)."""
    from mixstack.training import lit

    real = lit.compute_loss
    calls = [0]

    def poisoned(*args, **kwargs):
        loss = real(*args, **kwargs)
        calls[0] += 1
        return loss * float("nan") if (calls[0] - 1) // accumulate >= step else loss

    monkeypatch.setattr(lit, "compute_loss", poisoned)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    tiny_spec, fit_quietly, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _poison_from_step(monkeypatch, 2, accumulate=2)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as info:
        fit_quietly(tiny_spec("train.checkpoint_every=1"), out)
    text = str(info.value)
    assert "the training loss is nan at optimizer step 2 (train.on_nonfinite: stop)" in text
    assert "checkpoints/last.ckpt (step 2), is kept" in text
    assert f"mixstack train {out} --resume train.on_nonfinite=skip_step" in text
    meta = json.loads((out / "run.json").read_text())
    assert meta["status"] == "failed" and meta["step"] == 2
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 2
    assert not (out / "model").exists()  # no model exported from a failed run


def test_skip_step_applies_no_update_for_a_nan_step(
    tiny_spec, fit_quietly, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Steps 1 and 2 are NaN and skipped: the exported weights are those after step 0,
    i.e. those of a one-step run (constant schedule, plain SGD)."""
    common = (
        "train.optimizer={type: sgd, lr: 0.1, momentum: 0.0}",
        "train.schedule={type: constant, warmup_steps: 0}",
        "model.dropout=0",
    )
    one = fit_quietly(tiny_spec(*common, "train.max_steps=1"), tmp_path / "one")
    _poison_from_step(monkeypatch, 1, accumulate=2)
    spec = tiny_spec(*common, "train.max_steps=3", "train.on_nonfinite=skip_step")
    result = fit_quietly(spec, tmp_path / "run")
    assert result.status == "finished" and result.step == 3
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["segments"][0]["skipped_steps"] == 2
    assert all(math.isfinite(v) for v in _losses(tmp_path / "run"))  # only step 0's loss
    skipped = mixstack.from_pretrained(result.model_dir).state_dict()
    reference = mixstack.from_pretrained(one.model_dir).state_dict()
    initial = mixstack.build(spec, seed=spec.train.seed).state_dict()
    for name, tensor in reference.items():
        assert torch.equal(skipped[name], tensor), name
    assert not torch.equal(reference["norm_f.weight"], initial["norm_f.weight"])


def test_a_run_failing_before_its_first_step_leaves_nothing_behind(
    tiny_spec, fit_quietly, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _poison_from_step(monkeypatch, 0, accumulate=2)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="loss is nan at optimizer step 0"):
        fit_quietly(tiny_spec(), out)
    assert not out.exists()  # a retry with the same --out is not blocked
    out.mkdir()  # an empty folder the user made stays, empty
    with pytest.raises(NonFiniteLossError):
        fit_quietly(tiny_spec(), out)
    assert out.is_dir() and not any(out.iterdir())


def test_non_finite_gradients_stop_the_run(tiny_spec, fit_quietly, tmp_path: Path) -> None:
    """lr 1e30: step 0 is finite, step 1's loss is finite but its gradients overflow."""
    spec = tiny_spec(NAN_LR, "train.grad_clip=null", "train.checkpoint_every=1")
    with pytest.raises(NonFiniteLossError, match="a gradient is NaN or inf at optimizer step 1"):
        fit_quietly(spec, tmp_path / "run")
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 1


def test_an_update_that_overflows_the_weights_is_refused(tiny_spec) -> None:
    """Finite gradients, an update that overflows: refused under either policy (an
    applied update cannot be skipped after the fact)."""
    from mixstack.training.lit import LitModel

    for policy in ("stop", "skip_step"):
        lit = LitModel(tiny_spec(f"train.on_nonfinite={policy}"))
        optimizer = torch.optim.SGD(lit.parameters(), lr=3.0e38)
        for p in lit.parameters():
            p.grad = torch.full_like(p, 10.0)
        with pytest.raises(NonFiniteLossError, match="NaN or inf in the update of optimizer step"):
            lit.optimizer_step(0, 0, optimizer)
        ok = LitModel(tiny_spec())
        optimizer = torch.optim.SGD(ok.parameters(), lr=0.1)
        for p in ok.parameters():
            p.grad = torch.ones_like(p)
        ok.optimizer_step(0, 0, optimizer)  # a finite update passes


def test_batch_split_is_checked_at_load_with_its_line(tmp_path: Path, tiny_data) -> None:
    tiny_data["train"].update(batch_size=3, accumulate_grad_batches=2)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(tiny_data, sort_keys=False))
    with pytest.raises(SpecError) as info:
        mixstack.load_spec(str(path))
    text = str(info.value)
    assert "train.batch_size: batch_size 3 does not split into accumulate_grad_batches 2" in text
    assert f"{path}:" in text and "a multiple of 2" in text
    tiny_data["train"].update(batch_size=4)
    tiny_data["run"] = {"trainer": {"devices": 4, "accelerator": "cpu"}}
    path.write_text(yaml.safe_dump(tiny_data, sort_keys=False))
    with pytest.raises(SpecError, match=r"× 4 processes \(run.trainer: devices 4, num_nodes 1\)"):
        mixstack.load_spec(str(path))


def test_resume_on_a_folder_that_is_not_a_run_says_so(tmp_path: Path, tiny_data) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"\xff\xd8")
    result = runner.invoke(app, ["train", str(folder), "--resume"])
    assert result.exit_code == 1
    assert f"{folder} is a directory but not a run directory (it has no spec.yaml)" in (
        result.stderr
    )
    assert "not a YAML file" not in result.stderr
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(tiny_data))
    result = runner.invoke(app, ["train", str(spec), "--out", str(folder), "--resume"])
    assert result.exit_code == 1
    assert f"nothing to resume: {folder} is not a run directory" in result.stderr


def test_uint8_input_ids_are_a_clear_error() -> None:
    layers = {"pattern": "*", "symbols": {"*": {"type": "attention", "n_heads": 2}}}
    spec = {"model": {"vocab_size": 16, "max_seq_len": 8, "d_model": 16, "layers": layers}}
    model = mixstack.build(spec, seed=0)
    ids = torch.tensor([[1, 2, 3]], dtype=torch.uint8)
    with pytest.raises(
        MixstackError, match=r"got dtype torch.uint8; allowed: torch.int64 or torch.int32"
    ):
        model(ids)
    with pytest.raises(MixstackError, match=r"got dtype torch.int16; .*convert with .long\(\)"):
        model(ids.to(torch.int16))
    state = model.init_state(1, 8)
    model(ids.long(), state=state)
    with pytest.raises(MixstackError, match="token_t must hold integer token ids"):
        model.step(ids[:, 0], state)
    assert model(ids.to(torch.int32)).shape == (1, 3, 20)


# -- the command line ------------------------------------------------------------------------
def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_eval_takes_a_run_directory_and_fails_on_non_finite_metrics(
    tiny_run, tmp_path: Path
) -> None:
    result = runner.invoke(app, ["eval", str(tiny_run.run_dir)])
    assert result.exit_code == 0, result.output
    assert "val/accuracy" in result.stdout and str(tiny_run.run_dir / "spec.yaml") in result.stdout
    # Finite but huge weights (re-saved with a valid digest): the logits overflow.
    folder = Path(shutil.copytree(tiny_run.run_dir, tmp_path / "run"))
    weights = folder / "model" / "model.safetensors"
    tensors = load_file(weights)
    tensors["norm_f.weight"] = torch.full_like(tensors["norm_f.weight"], 3.0e38)
    config = json.loads((folder / "model" / "config.json").read_text())
    meta = {"mixstack.spec_hash": config["spec_hash"]}
    integrity.write_safetensors(tensors, weights, meta, folder / "model" / "config.json")
    result = runner.invoke(app, ["eval", str(folder)])
    assert result.exit_code == 1
    assert "non-finite metrics (val/loss = " in result.stderr


def test_eval_of_an_unfinished_run_says_how_to_continue(tiny_spec, fit_quietly, tmp_path) -> None:
    out = tmp_path / "run"
    fit_quietly(tiny_spec("run.stop_after=3"), out)
    result = runner.invoke(app, ["eval", str(out)])
    assert result.exit_code == 1
    assert f"mixstack train {out} --resume" in result.stderr


def test_verify_command(tiny_run, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(tiny_run.model_dir, tmp_path / "model"))
    result = runner.invoke(app, ["verify", str(folder)])
    assert result.exit_code == 0, result.output
    digest = integrity.read_header(folder / "model.safetensors").digest
    assert digest in result.stdout and "all finite" in result.stdout
    raw = bytearray((folder / "model.safetensors").read_bytes())
    raw[-3] ^= 1
    (folder / "model.safetensors").write_bytes(bytes(raw))
    result = runner.invoke(app, ["verify", str(folder)])
    assert result.exit_code == 1
    assert "does not match its recorded digest" in result.stderr
    # Metadata stripped: refused, unless --allow-unverified (then no digest is shown).
    save_file(load_file(folder / "model.safetensors"), folder / "model.safetensors")
    result = runner.invoke(app, ["verify", str(folder)])
    assert result.exit_code == 1 and "unverified weights" in result.stderr
    result = runner.invoke(app, ["verify", str(folder), "--allow-unverified"])
    assert result.exit_code == 0, result.output
    assert "none recorded" in result.stdout


CHILD = """
import sys, warnings
warnings.filterwarnings("ignore")
from mixstack.cli.main import main
sys.argv = ["mixstack", "train", sys.argv[1], "--out", sys.argv[2]]
main()
"""


@pytest.mark.slow(budget_s=60)
def test_ctrl_c_prints_how_to_resume(tmp_path: Path, tiny_data) -> None:
    tiny_data["train"].update(max_steps=100000, checkpoint_every=1, val_every=100000)
    spec = _write(tmp_path, tiny_data)
    out = tmp_path / "run"
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    proc = subprocess.Popen(
        [sys.executable, str(child), str(spec), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 50
    while not (out / "checkpoints" / "last.ckpt").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "interrupted: the last checkpoint (step " in err
    assert f"mixstack train {out} --resume" in " ".join(err.split())
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"


def test_resume_may_switch_on_nonfinite_only(tiny_spec, fit_quietly, tmp_path: Path) -> None:
    out = tmp_path / "run"
    fit_quietly(tiny_spec("run.stop_after=3"), out)
    with pytest.raises(RunDirError, match=r"differs from the run's in train\.seed"):
        fit_quietly(tiny_spec("train.seed=4", "train.on_nonfinite=skip_step"), out, resume=True)
    result = fit_quietly(tiny_spec("train.on_nonfinite=skip_step"), out, resume=True)
    assert result.status == "finished" and result.step == 6
