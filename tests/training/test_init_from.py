"""``train.init_from``: tensors matched by key and shape, the head new, every other
mismatch refused by name; run.json records it; a resumed run never re-reads it; the
path is relative to the spec file that sets it."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import mixstack
from mixstack.dsl.errors import CheckpointError
from mixstack.hub.modeldir import save_model_dir
from mixstack.training.init_from import describe, init_from

LAYERS = {
    "pattern": "*-",
    "symbols": {"*": {"type": "attention", "n_heads": 2}, "-": {"type": "mlp", "hidden": 32}},
}
TASK = {"type": "listops", "seq_len": 24, "max_depth": 2, "max_args": 3, "val_size": 8}


def _model(arch: str, **model: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "arch": arch,
        "vocab_size": 17,
        "max_seq_len": 32,
        "d_model": 16,
        "layers": copy.deepcopy(LAYERS),
    }
    if arch == "classifier":
        out["classifier"] = {"n_classes": 10, "pooling": "last"}
    return {**out, **model}


def _spec(arch: str, objective: str = "label", model: dict[str, Any] | None = None, **train: Any):
    return mixstack.load_spec(
        {
            "model": _model(arch, **(model or {})),
            "train": {
                "task": {**TASK, "objective": objective},
                "optimizer": {"type": "adamw", "lr": 0.01},
                "max_steps": 2,
                "batch_size": 4,
                "val_every": 2,
                "log_every": 1,
                "seed": 5,
                **train,
            },
        }
    )


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A phase-1 model directory (a causal LM, tied head) and its tensors."""
    model = mixstack.build(_spec("causal_lm", "lm"), seed=11)
    folder = save_model_dir(model, tmp_path_factory.mktemp("phase1") / "model")
    return folder, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_body_is_loaded_and_the_head_is_new(source: Any) -> None:
    folder, tensors = source
    spec = _spec("classifier")
    model = mixstack.build(spec, seed=2)
    fresh = mixstack.build(spec, seed=2)  # the same draw, never touched
    report = init_from(model, folder)
    state = model.state_dict()
    body = [k for k in state if not k.startswith("classifier.")]
    # every body tensor is the source's, bit for bit, and differs from the fresh draw
    for name in body:
        assert torch.equal(state[name], tensors[name]), name
    assert any(not torch.equal(state[n], fresh.state_dict()[n]) for n in body)
    for name in ("classifier.weight", "classifier.bias"):
        assert torch.equal(state[name], fresh.state_dict()[name])
    assert sorted(report.loaded) == sorted(body)
    assert sorted(report.new) == ["classifier.bias", "classifier.weight"]
    assert "embedding.weight" in report.loaded and "norm_f.weight" in report.loaded
    record = report.record()
    assert (record["loaded"], record["new"], record["refused"]) == (len(body), 2, 0)
    assert describe(record) == (
        f"{len(body)} loaded, 2 new (classifier.weight, classifier.bias), 0 refused"
    )


def test_a_run_directory_gives_its_model(source: Any, tmp_path: Path) -> None:
    folder, tensors = source
    run = tmp_path / "run"
    shutil.copytree(folder, run / "model")
    (run / "run.json").write_text("{}", encoding="utf-8")
    model = mixstack.build(_spec("classifier"), seed=2)
    assert init_from(model, run).source == str(run / "model")
    assert torch.equal(model.embedding.weight, tensors["embedding.weight"])


@pytest.mark.parametrize(
    ("model", "arch", "lines"),
    [
        (
            {"d_model": 24},
            "classifier",
            ["embedding.weight: this model [24, 24], the source [24, 16]"],
        ),
        (
            {"layers": {**LAYERS, "pattern": "*-*"}},
            "classifier",
            ["layers.2.", "the source has no such tensor"],
        ),
        ({"layers": {**LAYERS, "pattern": "*"}}, "classifier", ["layers.1.", "not in this model"]),
    ],
)
def test_mismatches_are_refused_by_name_and_shape(
    source: Any, model: dict[str, Any], arch: str, lines: list[str]
) -> None:
    folder, _ = source
    target = mixstack.build(_spec(arch, model=model), seed=2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        init_from(target, folder)
    text = str(err.value)
    assert f"train.init_from: {folder} does not fit this model" in text
    assert all(line in text for line in lines), text
    assert "classifier.weight" not in text  # the head is never refused
    # nothing was copied before the refusal
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


def test_sources_that_are_not_models_are_refused(tmp_path: Path) -> None:
    model = mixstack.build(_spec("classifier"), seed=2)
    with pytest.raises(CheckpointError, match=r"does not exist \(resolved to"):
        init_from(model, tmp_path / "nowhere")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text("{}", encoding="utf-8")
    with pytest.raises(CheckpointError, match="run directory without an exported model"):
        init_from(model, tmp_path / "run")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(CheckpointError):  # the model directory's own checks
        init_from(model, tmp_path / "model")


def test_a_pickle_is_never_loaded(source: Any, tmp_path: Path) -> None:
    folder, _ = source
    copy_dir = tmp_path / "model"
    shutil.copytree(folder, copy_dir)
    (copy_dir / "model.safetensors").unlink()
    torch.save({}, copy_dir / "pytorch_model.bin")
    model = mixstack.build(_spec("classifier"), seed=2)
    with pytest.raises(CheckpointError, match="pickled weights are never loaded"):
        init_from(model, copy_dir)


def test_the_path_is_relative_to_the_spec_file_that_sets_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import yaml

    spec = _spec("classifier").to_dict()
    spec["train"]["init_from"] = "../phase1/model"
    (tmp_path / "specs" / "sub").mkdir(parents=True)
    (tmp_path / "specs" / "base.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    (tmp_path / "specs" / "sub" / "child.yaml").write_text(
        "base: ../base.yaml\ntrain: {seed: 6}\n", encoding="utf-8"
    )
    (tmp_path / "specs" / "sub" / "own.yaml").write_text(
        "base: ../base.yaml\ntrain: {init_from: p1}\n", encoding="utf-8"
    )
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    base = mixstack.load_spec(tmp_path / "specs" / "base.yaml")
    assert base.train.init_from == str(tmp_path / "phase1" / "model")
    # a value from a base file stays relative to the base file
    child = mixstack.load_spec(tmp_path / "specs" / "sub" / "child.yaml")
    assert child.train.init_from == str(tmp_path / "phase1" / "model")
    own = mixstack.load_spec(tmp_path / "specs" / "sub" / "own.yaml")
    assert own.train.init_from == str(tmp_path / "specs" / "sub" / "p1")
    # an override is the user's own path: it stays as given (relative to the cwd)
    over = mixstack.load_spec(tmp_path / "specs" / "base.yaml", ["train.init_from=x/m"])
    assert over.train.init_from == "x/m"


def test_fit_records_the_keys_and_resume_never_reloads(
    source: Any, tmp_path: Path, fit_quietly: Any
) -> None:
    folder, tensors = source
    phase1 = tmp_path / "phase1"
    shutil.copytree(folder, phase1)
    slow_lr = {"type": "adamw", "lr": 1e-3}  # 4 steps move each weight by ~4e-3 at most
    spec = _spec("classifier", init_from=str(phase1), max_steps=4, optimizer=slow_lr)
    whole = fit_quietly(spec, tmp_path / "whole")
    meta = json.loads((tmp_path / "whole" / "run.json").read_text(encoding="utf-8"))
    record = meta["init_from"]
    assert record == whole.init_from
    assert record["source"] == str(phase1) and record["refused"] == 0
    assert record["new_keys"] == ["classifier.weight", "classifier.bias"]
    assert "embedding.weight" in record["loaded_keys"]
    # stopped at step 2, then resumed without the source: the checkpoint holds the weights
    stopped = mixstack.load_spec(spec, ["run.stop_after=2"])
    assert fit_quietly(stopped, tmp_path / "split").status == "stopped"
    shutil.rmtree(phase1)
    resumed = fit_quietly(spec, tmp_path / "split", resume=True)
    assert resumed.status == "finished" and resumed.init_from is None
    meta = json.loads((tmp_path / "split" / "run.json").read_text(encoding="utf-8"))
    assert meta["init_from"] == record  # recorded once, by the first segment
    a = mixstack.from_pretrained(tmp_path / "whole" / "model").state_dict()
    b = mixstack.from_pretrained(tmp_path / "split" / "model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # it trained from the source: near it, far from the draw of train.seed it replaced
    drawn = mixstack.build(spec, seed=spec.train.seed).state_dict()
    for name in ("embedding.weight", "layers.0.mixer.q_proj.weight"):
        assert not torch.equal(a[name], tensors[name]), name
        assert (a[name] - tensors[name]).norm() < 0.5 * (a[name] - drawn[name]).norm(), name


def test_a_missing_source_fails_before_the_run_writes(tmp_path: Path, fit_quietly: Any) -> None:
    spec = _spec("classifier", init_from=str(tmp_path / "absent"))
    with pytest.raises(CheckpointError, match="absent does not exist"):
        fit_quietly(spec, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_the_train_summary_shows_the_keys(tmp_path: Path) -> None:
    from rich.console import Console

    from mixstack.cli.main import _summary
    from mixstack.training.run import RunResult

    record = {
        "source": "/x/model",
        "loaded": 11,
        "new": 2,
        "refused": 0,
        "loaded_keys": [f"k{i}" for i in range(11)],
        "new_keys": ["classifier.weight", "classifier.bias"],
    }
    result = RunResult(tmp_path, "finished", 2, 2, 0.5, init_from=record)
    console = Console(width=200, record=True)
    console.print(_summary(result))
    text = console.export_text()
    # 11 loaded keys are more than are listed; 2 new ones are named
    assert "/x/model: 11 loaded, 2 new (classifier.weight, classifier.bias), 0 refused" in text


def test_an_mlm_encoder_initialises_a_classifier(tmp_path: Path) -> None:
    """Phase 1 under objective mlm (an encoder, '=' as the mask id, so the vocabulary is
    the classifier's): everything but the LM head carries over."""
    encoder = _spec("encoder", "mlm", mlm={"mask_id": 16})
    source = mixstack.build(encoder, seed=4)
    folder = save_model_dir(source, tmp_path / "mlm")
    target = mixstack.build(_spec("classifier"), seed=2)
    report = init_from(target, folder)
    assert sorted(report.new) == ["classifier.bias", "classifier.weight"]
    state, src = target.state_dict(), source.state_dict()
    assert sorted(report.loaded) == sorted(k for k in state if not k.startswith("classifier."))
    assert all(torch.equal(state[k], src[k]) for k in report.loaded)
