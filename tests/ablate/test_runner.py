"""Running grids: kill-safe resume, failures recorded, retry, submitit's local executor."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mixstack.ablate.runner import KILL_HOOK_ENV, GridDir, prepare, run_grid, work

GRID = """\
base: base.yaml
axes:
  model.d_model: [16, 32]
variants:
  att: {model.layers.pattern: "*-"}
seeds: [0, 1]
metric: val/accuracy
"""


def _val_rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open(newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("val/accuracy")]


def _states(out: Path) -> list[str]:
    gd = GridDir(out)
    return [gd.read_status(p["id"])["state"] for p in gd.read_plan()["points"]]


def _grid_cmd(path: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-c",
        "from mixstack.cli.main import main; main()",
        "grid",
        "run",
        str(path),
        "--out",
        str(out),
    ]


@pytest.mark.slow(budget_s=90)
def test_killed_grid_resumes_without_duplicates(write_grid, tmp_path):
    path = write_grid(GRID)
    out = tmp_path / "out"
    k = 2
    env = {**os.environ, KILL_HOOK_ENV: str(k)}
    # its own session: the hook kills the whole process group (grid run + worker)
    proc = subprocess.run(
        _grid_cmd(path, out), env=env, start_new_session=True, capture_output=True, text=True
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    gd = GridDir(out)
    points = gd.read_plan()["points"]
    assert _states(out) == ["finished"] * k + ["running"] + ["pending"] * (len(points) - k - 1)
    victim = points[k]["id"]
    # the hook stopped point k+1 at half its steps, with a checkpoint
    assert (gd.run_dir(victim) / "checkpoints" / "last.ckpt").is_file()
    before = {p["id"]: (gd.run_dir(p["id"]) / "run.json").read_bytes() for p in points[:k]}
    mtimes = {p["id"]: (gd.run_dir(p["id"]) / "run.json").stat().st_mtime_ns for p in points[:k]}

    env.pop(KILL_HOOK_ENV)
    proc = subprocess.run(_grid_cmd(path, out), env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _states(out) == ["finished"] * len(points)
    for pid, data in before.items():  # finished points were not run again
        assert (gd.run_dir(pid) / "run.json").read_bytes() == data
        assert (gd.run_dir(pid) / "run.json").stat().st_mtime_ns == mtimes[pid]
        assert gd.read_status(pid)["attempts"] == 1
    status = gd.read_status(victim)
    assert status["attempts"] == 2 and status["resumed"] is True
    meta = json.loads((gd.run_dir(victim) / "run.json").read_text())
    assert [s["start_step"] for s in meta["segments"]] == [0, 2]
    for p in points:  # one history per point: every validation step once
        steps = [r["step"] for r in _val_rows(gd.run_dir(p["id"]))]
        assert len(steps) == len(set(steps)) == 2, (p["id"], steps)

    from mixstack.ablate import report

    table = report(out)
    assert len(table) == 2 and list(table["n_seeds"]) == [2, 2]


def test_failed_point_is_recorded_and_retried(write_grid, tmp_path, monkeypatch):
    import mixstack.training.run as run_module

    path = write_grid(GRID)
    out = tmp_path / "out"
    plan = prepare(path, out, retry_failed=False)
    doomed = plan.points[1].id
    real_fit = run_module.fit
    calls = []

    def fit(spec, out_dir, **kw):
        calls.append(Path(out_dir).parent.name)
        if Path(out_dir).parent.name == doomed:
            raise RuntimeError("boom: simulated failure\nsecond line")
        return real_fit(spec, out_dir, **kw)

    monkeypatch.setattr(run_module, "fit", fit)
    assert work(out) == 4
    gd = GridDir(out)
    assert _states(out) == ["finished", "failed", "finished", "finished"]
    status = gd.read_status(doomed)
    assert status["error"] == "RuntimeError: boom: simulated failure"
    assert "Traceback" in (gd.point(doomed) / "error.txt").read_text()

    calls.clear()
    assert work(out) == 0 and calls == []  # nothing pending: failed waits for a retry
    monkeypatch.setattr(run_module, "fit", real_fit)
    prepare(path, out, retry_failed=True)
    assert work(out) == 1
    assert _states(out) == ["finished"] * 4
    assert gd.read_status(doomed)["attempts"] == 2

    # killed after training ended but before its status said so: not trained again
    first = plan.points[0].id
    run_json = (gd.run_dir(first) / "run.json").read_bytes()
    status = gd.read_status(first)
    status["state"] = "running"
    gd.write_status(first, status)
    calls.clear()
    monkeypatch.setattr(run_module, "fit", fit)
    assert work(out) == 1 and calls == []
    assert gd.read_status(first)["state"] == "finished"
    assert (gd.run_dir(first) / "run.json").read_bytes() == run_json


def test_second_runner_on_the_same_directory_is_refused(write_grid, tmp_path):
    import fcntl

    from mixstack.ablate.runner import GridRunError

    path = write_grid(GRID)
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".grid.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        with pytest.raises(GridRunError, match="in use by another `mixstack grid run`"):
            run_grid(path, out)


@pytest.mark.slow(budget_s=90)
def test_submitit_local_executor(write_grid, tmp_path):
    pytest.importorskip("submitit")
    path = write_grid(GRID.replace("[16, 32]", "[16]"))
    out = tmp_path / "out"
    summary = run_grid(path, out, executor="submitit", cluster="local", workers=2)
    assert summary.ok and summary.counts["finished"] == 2, summary.errors
    gd = GridDir(out)
    workers = {gd.read_status(p["id"])["worker"] for p in gd.read_plan()["points"]}
    assert workers <= {0, 1}
    assert list((out / "submitit").glob("*_result.pkl")) or list((out / "submitit").iterdir())
    for p in gd.read_plan()["points"]:
        assert len(_val_rows(gd.run_dir(p["id"]))) == 2


def test_local_workers_get_the_cores_shared_or_the_threads_asked(write_grid, tmp_path, monkeypatch):
    """Each local worker's torch threads: the cores divided among the workers, or
    ``--threads`` (fewer threads beside other jobs avoid oversubscribing the cores)."""
    import mixstack.ablate.runner as runner_mod
    from mixstack.ablate.runner import GridRunError

    launched: list[list[str]] = []

    class _Done:  # a worker that exits at once, leaving the points pending
        def __init__(self, cmd: list[str], **_: object) -> None:
            launched.append(cmd)

        def wait(self) -> int:
            return 0

    monkeypatch.setattr(runner_mod.subprocess, "Popen", _Done)
    monkeypatch.setattr(runner_mod.os, "cpu_count", lambda: 8)
    path = write_grid(GRID)

    def threads_of(**kwargs: object) -> list[str]:
        launched.clear()
        run_grid(path, tmp_path / "out", **kwargs)
        return [cmd[cmd.index("--threads") + 1] for cmd in launched]

    assert threads_of(workers=2) == ["4", "4"]
    assert threads_of(workers=3) == ["2", "2", "2"]
    assert threads_of(workers=2, threads=1) == ["1", "1"]
    with pytest.raises(GridRunError, match="--threads must be >= 1, got 0"):
        run_grid(path, tmp_path / "out", threads=0)
    # the worker itself (local subprocess or submitit job) sets them before any point
    set_to: list[int] = []
    import torch

    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    monkeypatch.setattr(runner_mod, "run_point", lambda gd, pid, worker: set_to.append(-1))
    assert work(tmp_path / "out", threads=3) == 4
    assert set_to == [3, -1, -1, -1, -1]
    set_to.clear()
    work(tmp_path / "out")  # None: torch's default, untouched
    assert -1 in set_to and 3 not in set_to
