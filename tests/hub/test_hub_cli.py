"""``mixstack push / pull``, hf:// sources on the command line, ``run.hub`` at the end of
training, and the token never showing up anywhere (against the local Hub server)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import mixstack
from mixstack.cli.main import app
from mixstack.hub.modeldir import save_model_dir

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>'")

runner = CliRunner()
SPEC = {
    "model": {
        "vocab_size": 16,
        "max_seq_len": 16,
        "d_model": 16,
        "layers": {
            "pattern": "*-",
            "symbols": {"*": {"type": "attention", "n_heads": 2}, "-": {"type": "mlp"}},
        },
    }
}
# A cheap mqar-tiny run: a few steps, one validation at the end.
TRAIN = [
    "train.max_steps=4",
    "train.val_every=4",
    "train.batch_size=8",
    "train.task.val_size=16",
    "train.early_stop=null",
    "train.log_every=1",
]


def _everything_written(*roots: Path) -> str:
    return "\n".join(
        p.read_bytes().decode("utf-8", "replace")
        for root in roots
        for p in root.rglob("*")
        if p.is_file() and not p.is_symlink()
    )


def _server_bytes(hub) -> bytes:
    return b"\n".join(hub.state.blobs.values())


def test_push_pull_commands_print_the_commit(hub, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", hub.token)
    model = mixstack.build(SPEC, seed=2)
    folder = save_model_dir(model, tmp_path / "model")
    pushed = runner.invoke(
        app, ["--hub-endpoint", hub.endpoint, "push", str(folder), "me/cli", "--private"]
    )
    assert pushed.exit_code == 0, pushed.output
    commit = pushed.output.split("commit: ")[1].split()[0]
    assert hub.state.repos["me/cli"].private
    assert hub.state.repos["me/cli"].branches["main"] == commit
    out = tmp_path / "pulled"
    args = ["--hub-endpoint", hub.endpoint, "pull", "me/cli", "--out", str(out)]
    pulled = runner.invoke(app, [*args, "--cache-dir", str(tmp_path / "c")])
    assert pulled.exit_code == 0, pulled.output
    assert f"commit: {commit}" in pulled.output
    loaded = mixstack.from_pretrained(out)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    validated = runner.invoke(app, ["--hub-endpoint", hub.endpoint, "validate", "hf://me/cli"])
    assert validated.exit_code == 0, validated.output
    assert model.spec.spec_hash in validated.output
    # without the token the private repository is invisible; the message says what to do
    monkeypatch.delenv("HF_TOKEN")
    refused = runner.invoke(app, [*args, "--cache-dir", str(tmp_path / "c2")])
    assert refused.exit_code == 1
    assert "private and no valid token" in refused.output
    for text in (pushed.output, pulled.output, validated.output, refused.output):
        assert hub.token not in text


@pytest.mark.slow(budget_s=60)
def test_train_with_run_hub_pushes_card_with_the_runs_metrics(
    hub, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", hub.token)
    run_dir = tmp_path / "run"
    args = ["--hub-endpoint", hub.endpoint, "train", "zoo:mqar-tiny", "run.hub.repo_id=me/x"]
    result = runner.invoke(app, [*args, *TRAIN, "--out", str(run_dir)])
    assert result.exit_code == 0, result.output
    meta = json.loads((run_dir / "run.json").read_text())
    repo = hub.state.repos["me/x"]
    commit = repo.branches["main"]
    assert meta["hub"]["commit"] == commit
    oid, _, _ = repo.commits[commit]["README.md"]
    card = hub.state.blobs[oid].decode()
    assert card.startswith("---\n") and "library_name: mixstack" in card
    assert "pipeline_tag: text-generation" in card
    assert "| pattern | `M-*-` (4 layers) |" in card
    assert "| mamba2 | 1 |" in card and "| attention | 1 |" in card and "| mlp | 2 |" in card
    assert "| task | mqar |" in card and "| steps | 4 |" in card
    accuracy = meta["metrics"]["val/accuracy"]
    assert f"| val/accuracy | {accuracy:.6g} |" in card
    config = json.loads((run_dir / "model" / "config.json").read_text())
    assert config["spec_hash"] in card
    # the model directory keeps the spec as authored beside the resolved config.json
    authored = yaml.safe_load((run_dir / "model" / "spec.yaml").read_text())["model"]
    assert authored["layers"]["symbols"]["*"] == {"type": "attention", "n_heads": 4}
    assert config["model"]["layers"]["symbols"]["*"]["head_dim"] == 16
    # the pulled model is the run's model
    loaded = mixstack.from_pretrained("hf://me/x", endpoint=hub.endpoint, cache_dir=tmp_path / "c")
    local = mixstack.from_pretrained(run_dir / "model")
    for name, tensor in local.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    # the token is nowhere: output, run directory, what the server stored
    assert hub.token not in result.output
    assert hub.token not in _everything_written(run_dir)
    assert hub.token.encode() not in _server_bytes(hub)


@pytest.mark.slow(budget_s=45)
def test_failed_push_keeps_the_run_and_says_how_to_retry(hub, tmp_path: Path, monkeypatch):
    # the architecture comes from the Hub (base: hf://...), the train section from the file
    base = mixstack.push(
        mixstack.build("zoo:mqar-tiny", seed=0), "me/base", token=hub.token, endpoint=hub.endpoint
    )
    spec_file = tmp_path / "from-hub.yaml"
    spec_file.write_text(
        "base: hf://me/base\ntrain: {task: {type: mqar, n_pairs: 4, seq_len: 32}, max_steps: 4}\n"
    )
    monkeypatch.setenv("HF_TOKEN", "hf_FAKEwrongTOKENnotKnownToTheServer")
    run_dir = tmp_path / "run"
    args = ["--hub-endpoint", hub.endpoint, "train", str(spec_file), "run.hub.repo_id=me/y"]
    result = runner.invoke(app, [*args, *TRAIN, "--out", str(run_dir)])
    assert result.exit_code == 0, result.output  # the run itself succeeded
    (source,) = json.loads((run_dir / "run.json").read_text())["sources"]
    assert source["commit"] == base.commit and source["source"] == "hf://me/base"
    assert "hub push FAILED" in result.output
    retry = f"mixstack push {run_dir / 'model'} me/y"
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["hub"]["retry"] == retry and "me/y" in meta["hub"]["error"]
    assert mixstack.from_pretrained(run_dir / "model") is not None  # the run is intact
    assert "hf_FAKEwrongTOKEN" not in result.output + _everything_written(run_dir)
    # the printed retry works once a valid token is there
    monkeypatch.setenv("HF_TOKEN", hub.token)
    again = runner.invoke(
        app, ["--hub-endpoint", hub.endpoint, "push", str(run_dir / "model"), "me/y"]
    )
    assert again.exit_code == 0, again.output
    oid, _, _ = hub.state.repos["me/y"].commits[hub.state.repos["me/y"].branches["main"]][
        "README.md"
    ]
    assert "| task | mqar |" in hub.state.blobs[oid].decode()  # the run's card
