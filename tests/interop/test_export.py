"""``mixstack export``: a run directory (interrupted or finished) or a model directory
-> a mixstack model directory or a transformers checkpoint."""

from __future__ import annotations

import copy
import os
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import mixstack
from mixstack.cli.main import app
from mixstack.dsl.errors import MixstackError
from mixstack.hub.modeldir import save_model_dir
from mixstack.interop.export import export, load_source
from tests.support.hf_transformers import import_transformers

runner = CliRunner()

TINY: dict[str, Any] = {
    "model": {
        "vocab_size": 16,
        "max_seq_len": 32,
        "d_model": 16,
        "layers": {
            "pattern": "*-*-",
            "symbols": {
                "*": {"type": "attention", "n_heads": 2, "n_kv_heads": 1},
                "-": {"type": "mlp", "hidden": 32},
            },
        },
    },
    "train": {
        "task": {"type": "mqar", "n_pairs": 2, "seq_len": 16, "val_size": 16},
        "optimizer": {"type": "adamw", "lr": 0.01},
        "max_steps": 4,
        "batch_size": 4,
        "val_every": 2,
        "log_every": 1,
        "seed": 5,
    },
    "run": {"stop_after": 2},
}


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run stopped after 2 of 4 steps: checkpoints/last.ckpt, no model/."""
    from mixstack.training.run import fit

    out = tmp_path_factory.mktemp("runs") / "stopped"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*(num_workers|LeafSpec|does not have many).*")
        fit(mixstack.load_spec(copy.deepcopy(TINY)), out, progress=False)
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert not (out / "model").exists()
    return out


def _checkpoint_weights(run: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return {k.removeprefix("model."): v for k, v in state["state_dict"].items()}


@pytest.mark.slow(budget_s=60)
def test_stopped_run_exports_its_checkpoint(stopped_run: Path, tmp_path: Path) -> None:
    out = export(stopped_run, tmp_path / "model")
    model = mixstack.from_pretrained(out)
    saved = _checkpoint_weights(stopped_run)
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    # the weights were trained (2 steps), not a fresh init of the same spec and seed
    fresh = mixstack.build(model.spec, seed=5)
    assert not torch.equal(fresh.embedding.weight, model.embedding.weight)


@pytest.mark.slow(budget_s=60)
def test_the_newer_of_model_and_checkpoint_is_used(stopped_run: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    ckpt = run / "checkpoints" / "last.ckpt"
    other = mixstack.build(load_source(run)[0].spec, seed=123)
    save_model_dir(other, run / "model")
    past = time.time() - 1000
    os.utime(ckpt, (past, past))
    model, what = load_source(run)
    assert what.startswith("model directory")
    assert torch.equal(model.embedding.weight, other.embedding.weight)
    future = time.time() + 1000
    os.utime(ckpt, (future, future))
    model, what = load_source(run)
    assert what.startswith("checkpoint")
    assert torch.equal(model.embedding.weight, _checkpoint_weights(run)["embedding.weight"])


@pytest.mark.slow(budget_s=60)
def test_cli_export_to_transformers_from_a_run(stopped_run: Path, tmp_path: Path) -> None:
    transformers = import_transformers()
    result = runner.invoke(
        app, ["export", str(stopped_run), "--out", str(tmp_path / "hf"), "--to", "transformers"]
    )
    assert result.exit_code == 0, result.output
    assert "transformers llama" in result.output and "checkpoint" in result.output
    ours, _ = load_source(stopped_run)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, ours.spec.total_vocab, (2, 19), generator=generator)
    with torch.no_grad():
        theirs = hf(ids).logits[..., : ours.spec.total_vocab]  # specials inside, padding rows after
        mine = ours(ids)
    assert float((theirs - mine).abs().max() / mine.abs().max()) < 1e-5
    assert hf.config.eos_token_id == ours.spec.special_ids["eos"]


def test_export_errors_are_clear(tmp_path: Path) -> None:
    result = runner.invoke(app, ["export", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "is not a directory" in result.output
    (tmp_path / "empty").mkdir()
    with pytest.raises(MixstackError, match=r"neither a run directory"):
        export(tmp_path / "empty", tmp_path / "o")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "spec.yaml").write_text("model: {}\n")
    with pytest.raises(MixstackError, match=r"run directory without a model"):
        export(tmp_path / "run", tmp_path / "o")
    model = mixstack.build(copy.deepcopy({"model": TINY["model"]}), seed=0)
    src = save_model_dir(model, tmp_path / "m")
    result = runner.invoke(app, ["export", str(src), "--out", str(tmp_path / "o"), "--to", "onnx"])
    assert result.exit_code == 1 and "--to 'onnx' is not a target" in result.output
    with pytest.raises(MixstackError, match=r"is the source itself"):
        export(src, src)
    assert not (tmp_path / "o").exists()


def test_export_of_a_model_directory_is_bit_exact(tmp_path: Path) -> None:
    model = mixstack.build(copy.deepcopy({"model": TINY["model"]}), seed=0)
    src = save_model_dir(model, tmp_path / "m")
    result = runner.invoke(app, ["export", str(src), "--out", str(tmp_path / "copy")])
    assert result.exit_code == 0, result.output
    again = mixstack.from_pretrained(tmp_path / "copy")
    assert again.spec == model.spec
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
