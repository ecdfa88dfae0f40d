"""The train and run sections: typed, resolved against the model, errors with lines."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

import mixstack
from mixstack.dsl.errors import SpecError
from mixstack.tasks.mqar import MQARTask
from mixstack.tasks.text import TextTask

MODEL = """\
model:
  vocab_size: 64
  max_seq_len: 64
  d_model: 16
  layers:
    pattern: "*-"
    symbols:
      "*": {type: attention, n_heads: 2}
      "-": {type: mlp, hidden: 32}
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(MODEL + textwrap.dedent(text))
    return path


def _issues(tmp_path: Path, text: str) -> dict[str, str]:
    """``{yaml path: rendered issue}`` of a spec that must fail."""
    with pytest.raises(SpecError) as info:
        mixstack.load_spec(_write(tmp_path, text))
    from mixstack.dsl.errors import format_path

    return {format_path(i.path): i.render() for i in info.value.issues}


def test_train_defaults_resolve_against_the_model_and_round_trip(tmp_path: Path) -> None:
    spec = mixstack.load_spec(_write(tmp_path, "train: {task: {type: mqar}, max_steps: 10}\n"))
    train = spec.train
    assert isinstance(train.task, MQARTask)
    assert train.task.vocab_size == 64  # null -> the model's vocab_size
    assert train.optimizer.type == "adamw" and train.schedule.type == "cosine"
    assert spec.run.logger.type == "csv" and spec.run.trainer.devices == 1
    assert mixstack.load_spec(yaml.safe_load(spec.dump())) == spec


def test_train_and_run_stay_out_of_the_model_hash(tmp_path: Path) -> None:
    path = _write(tmp_path, "train: {task: {type: mqar}, max_steps: 10}\n")
    a = mixstack.load_spec(path)
    b = mixstack.load_spec(
        path, ["train.max_steps=99", "run.precision=bf16-mixed", "run.trainer.devices=2"]
    )
    assert a.spec_hash == b.spec_hash and a != b
    assert mixstack.load_spec(path, ["model.d_model=32"]).spec_hash != a.spec_hash


def test_every_mistake_is_reported_with_line_path_allowed_and_suggestion(tmp_path: Path) -> None:
    issues = _issues(
        tmp_path,
        """\
        train:
          task: {type: mqar, n_pairs: 4, vocab_sz: 32}
          optimizer: {type: adamv, lr: 0.1}
          schedule: {type: cosin}
          batch_size: 0
          max_steps: 10
        run:
          precision: bf16-tru
          trainer: {strategi: ddp}
          logger: {type: tensorbord}
        """,
    )
    name = str(tmp_path / "spec.yaml")
    expected = {
        "train.task.vocab_sz": (
            f"{name}:11:",
            "unknown key 'vocab_sz'",
            "did you mean 'vocab_size'",
        ),
        "train.optimizer.type": (
            f"{name}:12:",
            "unknown optimizer type 'adamv'",
            "adamw, adam, sgd",
        ),
        "train.schedule.type": (f"{name}:13:", "'cosine', 'linear', 'constant'", "'cosine'?"),
        "train.batch_size": (f"{name}:14:", "got: 0", "allowed: >= 1"),
        "run.precision": (f"{name}:17:", "bf16-tru", "did you mean 'bf16-true'"),
        "run.trainer.strategi": (f"{name}:18:", "unknown key", "did you mean 'strategy'"),
        "run.logger.type": (f"{name}:19:", "tensorbord", "did you mean 'tensorboard'"),
    }
    assert set(issues) == set(expected)
    for path, fragments in expected.items():
        for fragment in fragments:
            assert fragment in issues[path], (path, fragment, issues[path])


@pytest.mark.parametrize(
    ("train", "path", "fragment"),
    [
        ("{task: {type: mqar}}", "train.max_steps", "train needs max_steps or max_epochs"),
        ("{max_steps: 3}", "train.task", "missing required key 'task'"),
        (
            "{task: {type: mqar, seq_len: 80}, max_steps: 3}",
            "train.task.seq_len",
            "seq_len 80 exceeds the model's max_seq_len 64",
        ),
        (
            "{task: {type: mqar, vocab_size: 100}, max_steps: 3}",
            "train.task.vocab_size",
            "uses ids 0..99 but the model's vocab_size is 64",
        ),
        (
            "{task: {type: mqar, n_pairs: 13, seq_len: 50}, max_steps: 3}",
            "train.task.n_pairs",
            "13 pairs need seq_len >= 4·n_pairs = 52",
        ),
        (
            "{task: {type: selective_copy, n_tokens: 30, seq_len: 50}, max_steps: 3}",
            "train.task.n_tokens",
            "30 tokens need seq_len >= 2·n_tokens = 60",
        ),
        (
            "{task: {type: text}, max_steps: 3}",
            "train.task.type",
            "byte-level text needs ids 0..255",
        ),
        (
            "{task: {type: majority}, max_steps: 3}",
            "train.task.type",
            "task 'majority' does not train arch causal_lm",
        ),
        (
            "{task: {type: mqar}, max_epochs: 2}",
            "train.max_epochs",
            "endless stream: epochs need task.epoch_size",
        ),
    ],
)
def test_task_is_checked_against_the_model(
    tmp_path: Path, train: str, path: str, fragment: str
) -> None:
    issues = _issues(tmp_path, f"train: {train}\n")
    assert path in issues, issues
    assert fragment in issues[path]
    assert str(tmp_path / "spec.yaml") + ":" in issues[path]


def test_encoder_needs_a_mask_id_and_resolves_it(tmp_path: Path) -> None:
    text = "train: {task: {type: text, seq_len: 16}, max_steps: 3}\n"
    with pytest.raises(SpecError, match="arch encoder trains masked-LM and needs a mask id"):
        mixstack.load_spec(
            _write(tmp_path, text),
            ["model.arch=encoder", "model.special_tokens=[pad]", "model.vocab_size=256"],
        )
    spec = mixstack.load_spec(
        _write(tmp_path, text), ["model.arch=encoder", "model.vocab_size=256"]
    )
    assert spec.train.mlm.mask_id == spec.model.special_ids["mask"] == 259
    assert isinstance(spec.train.task, TextTask)


def test_activation_checkpointing_selectors_name_layers(tmp_path: Path) -> None:
    issues = _issues(
        tmp_path,
        "train: {task: {type: mqar}, max_steps: 3}\nrun: {activation_checkpointing: [0, 5]}\n",
    )
    assert "layer index 5 is out of range for 2 layers" in issues["run.activation_checkpointing[1]"]


def test_overrides_reach_the_typed_sections(tmp_path: Path) -> None:
    path = _write(tmp_path, "train: {task: {type: mqar}, max_steps: 3}\n")
    spec = mixstack.load_spec(
        path,
        ["train.task.n_pairs=2", "train.optimizer={type: sgd, lr: 0.5}", "run.logger.type=wandb"],
    )
    assert spec.train.task.n_pairs == 2
    assert spec.train.optimizer.type == "sgd" and spec.train.optimizer.momentum == 0.9
    assert spec.run.logger.type == "wandb" and spec.run.logger.mode == "offline"
    with pytest.raises(SpecError, match=r"<override train.optimizer.lr=-1>") as info:
        mixstack.load_spec(path, ["train.optimizer.lr=-1"])
    assert "allowed: > 0" in str(info.value)


@pytest.mark.parametrize(
    ("devices", "fragment"),
    [
        ("0", "greater than or equal to 1"),
        ("[]", "at least 1 item"),
        ("[-1]", "greater than or equal to 0"),
    ],
)
def test_trainer_devices_are_checked_at_load(tmp_path: Path, devices: str, fragment: str) -> None:
    issues = _issues(
        tmp_path,
        "train: {task: {type: mqar}, max_steps: 3}\n"
        f"run: {{trainer: {{devices: {devices}}}}}\n",
    )
    hits = [text for path, text in issues.items() if path.startswith("run.trainer.devices")]
    assert hits and any(fragment in t for t in hits), issues
    assert all(str(tmp_path / "spec.yaml") + ":11:" in t for t in hits)


def test_early_stop_reads_the_metric_direction_from_the_registry(tmp_path: Path) -> None:
    def early_stop(metric: str) -> str:
        return (
            "train:\n  task: {type: mqar}\n  max_steps: 10\n"
            f"  early_stop: {{metric: {metric}, threshold: 0.5}}\n"
        )

    spec = mixstack.load_spec(_write(tmp_path, early_stop("val/exact_match")))
    assert spec.train.early_stop.mode == "max"  # MQAR's own metric, higher is better
    assert (
        mixstack.load_spec(_write(tmp_path, early_stop("val/ppl"))).train.early_stop.mode == "min"
    )
    issues = _issues(tmp_path, early_stop("val/exact_mach"))
    text = issues["train.early_stop.metric"]
    assert "task 'mqar' on arch causal_lm logs no metric 'val/exact_mach'" in text
    assert "did you mean 'val/exact_match'?" in text
    assert "val/accuracy, val/exact_match, val/loss, val/ppl" in text
