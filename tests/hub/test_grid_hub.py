"""``run.hub`` in an ablation grid: each point pushes to its own branch of the grid's
repository; a failed push marks the point failed, and --retry-failed pushes again
without training again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import mixstack
from mixstack.ablate import plan
from mixstack.ablate.runner import GridDir, prepare, work

BASE = """\
model:
  vocab_size: 16
  max_seq_len: 16
  d_model: 16
  layers:
    pattern: "*-"
    symbols:
      "*": {type: attention, n_heads: 2}
      "-": {type: mlp, hidden: 32}
train:
  task: {type: mqar, n_pairs: 2, seq_len: 16, val_size: 8}
  optimizer: {type: adamw, lr: 0.01}
  max_steps: 2
  batch_size: 4
  val_every: 2
  log_every: 1
"""

GRID = """\
base: base.yaml
set: {run.hub.repo_id: me/grid}
seeds: [0, 1]
metric: val/accuracy
"""


@pytest.mark.slow(budget_s=60)
def test_each_point_pushes_to_its_own_branch(hub, tmp_path: Path, monkeypatch) -> None:
    import mixstack.training.run as run_module

    (tmp_path / "base.yaml").write_text(BASE)
    (tmp_path / "grid.yaml").write_text(GRID)
    p = plan(tmp_path / "grid.yaml")
    ids = [pt.id for pt in p.points]
    assert [pt.hub for pt in p.points] == [f"hf://me/grid@{i}" for i in ids]
    assert [pt.spec.run.hub.revision for pt in p.points] == ids

    # No token: the pushes fail, the points are failed with the error, the runs are kept.
    out = tmp_path / "out"
    prepare(tmp_path / "grid.yaml", out, retry_failed=False)
    assert work(out, hub_endpoint=hub.endpoint) == 2
    gd = GridDir(out)
    for pid in ids:
        status = gd.read_status(pid)
        assert status["state"] == "failed"
        assert status["error"].startswith("push to the Hub failed: ")
        assert "--retry-failed pushes again" in status["error"]
        assert (gd.run_dir(pid) / "model" / "config.json").is_file()
    assert "me/grid" not in hub.state.repos
    metrics = {pid: (gd.run_dir(pid) / "metrics.csv").read_bytes() for pid in ids}

    # With the token, --retry-failed pushes each trained point without training it again.
    monkeypatch.setenv("HF_TOKEN", hub.token)

    def no_fit(*args, **kw):
        raise AssertionError("a point whose push failed was trained again")

    monkeypatch.setattr(run_module, "fit", no_fit)
    prepare(tmp_path / "grid.yaml", out, retry_failed=True)
    assert work(out, hub_endpoint=hub.endpoint) == 2
    repo = hub.state.repos["me/grid"]
    assert "main" not in repo.branches or repo.branches["main"] not in {
        repo.branches[i] for i in ids
    }
    for pid in ids:
        status = gd.read_status(pid)
        assert status["state"] == "finished" and status["error"] is None
        assert status["hub"]["revision"] == pid
        assert status["hub"]["commit"] == repo.branches[pid]
        meta = json.loads((gd.run_dir(pid) / "run.json").read_text())
        assert meta["hub"]["commit"] == repo.branches[pid]
        assert (gd.run_dir(pid) / "metrics.csv").read_bytes() == metrics[pid]
        # the branch holds this point's weights, bit for bit
        local = (gd.run_dir(pid) / "model" / "model.safetensors").read_bytes()
        oid, lfs_sha, _ = repo.commits[repo.branches[pid]]["model.safetensors"]
        assert hub.state.blobs[lfs_sha or oid] == local
        pulled = mixstack.from_pretrained(
            f"hf://me/grid@{pid}", endpoint=hub.endpoint, cache_dir=tmp_path / "c"
        )
        mine = mixstack.from_pretrained(gd.run_dir(pid) / "model").state_dict()
        assert all(torch.equal(t, mine[k]) for k, t in pulled.state_dict().items())
    # two seeds, two different models on two branches
    a, b = (repo.commits[repo.branches[i]]["model.safetensors"][1] for i in ids)
    assert a != b
    written = "\n".join(
        f.read_text(errors="replace") for f in out.rglob("*") if f.is_file() and f.suffix != ".ckpt"
    )
    assert hub.token not in written
