"""Running a grid: worker processes over a directory of points, resumable and kill-safe.

::

    OUT/
      grid.json                 the plan: grid settings and every point (id, cell, sizes)
      grid.yaml                 a copy of the grid file as given
      .grid.lock                held (flock) by the `grid run` process using OUT
      points/ID/
        point.json              the point: overrides, seed, sizes, and its resolved spec
        status.json             pending | running | finished | failed (+ error, wall time)
        .lock                   held (flock) by the worker running the point
        error.txt               the traceback of the last failure
        run/                    the training run directory (training/run.py's fit)
      logs/worker-K.log         each local worker's output

Workers claim points by taking the point's ``flock``; a lock dies with its process, so
a killed grid leaves no stale claim. A point whose status says ``running`` but whose
lock is free was interrupted: it resumes from its last checkpoint (or starts again
without one). Finished points are never touched again; failed ones wait for
``--retry-failed``. Every status file is written atomically. One worker runs its
points one after another in the same process, so Lightning's start-up is paid once per
worker, not per point. With ``executor="submitit"`` the workers are submitit jobs (a
Slurm array on a cluster, local processes elsewhere).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixstack.ablate.grid import Grid, load_grid
from mixstack.ablate.planner import Plan, plan
from mixstack.dsl.errors import MixstackError
from mixstack.training.rundir import now, write_atomic

GRID_FILE = "grid.json"
POINTS_DIR = "points"
STATES = ("pending", "running", "finished", "failed")
# Test hook (never set by users): after this many points are finished, the next point
# trains to half its steps (a checkpoint), then the worker kills its process group.
KILL_HOOK_ENV = "MIXSTACK_GRID_TEST_KILL_AFTER"
DEFAULT_TIMEOUT_MIN = 24 * 60  # a submitit worker's time limit unless given


class GridRunError(MixstackError):
    """A grid directory cannot be used as asked."""


@dataclass(frozen=True)
class GridDir:
    root: Path

    @property
    def plan_file(self) -> Path:
        return self.root / GRID_FILE

    def point(self, pid: str) -> Path:
        return self.root / POINTS_DIR / pid

    def status_file(self, pid: str) -> Path:
        return self.point(pid) / "status.json"

    def run_dir(self, pid: str) -> Path:
        return self.point(pid) / "run"

    def read_plan(self) -> dict[str, Any]:
        if not self.plan_file.is_file():
            raise GridRunError(
                f"{self.root} is not a grid directory (no {GRID_FILE}); start one with "
                "`mixstack grid run GRID --out DIR`"
            )
        try:
            return json.loads(self.plan_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise GridRunError(f"cannot read {self.plan_file}: {exc}") from None

    def read_status(self, pid: str) -> dict[str, Any]:
        path = self.status_file(pid)
        if not path.is_file():
            return {"id": pid, "state": "pending", "attempts": 0}
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise GridRunError(f"cannot read {path}: {exc}") from None

    def write_status(self, pid: str, status: dict[str, Any]) -> None:
        write_atomic(self.status_file(pid), json.dumps(status, indent=2) + "\n")

    def read_point(self, pid: str) -> dict[str, Any]:
        return json.loads((self.point(pid) / "point.json").read_text(encoding="utf-8"))


@contextlib.contextmanager
def _flock(path: Path, *, what: str) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise GridRunError(what) from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _plan_record(p: Plan, grid_text: str | None) -> dict[str, Any]:
    g = p.grid
    return {
        "name": g.name,
        "source": str(g.source) if g.source else None,
        "base": g.base,
        "metric": g.metric,
        "mode": g.mode,
        "axes": g.axis_keys,
        "variants": [v.name for v in g.variants],
        "seeds": list(g.seeds),
        "lrs": [s.value for s in g.lrs],
        "budget": {g.budget.kind: g.budget.amount} if g.budget else None,
        "match": (
            {
                "quantity": g.match.quantity,
                "to": g.match.to,
                "knob": g.match.knob,
                "tolerance": g.match.tolerance,
            }
            if g.match
            else None
        ),
        "points": [pt.to_dict() for pt in p.points],
        "grid_yaml": grid_text,
    }


def prepare(grid: Grid | str | os.PathLike[str], out: Path, *, retry_failed: bool) -> Plan:
    """Plan (every point checked), then write the grid directory's plan and each new
    point's files. Points already there keep their status; ``retry_failed`` turns
    failed points back to pending. The caller holds the grid lock."""
    source = grid if isinstance(grid, Grid) else load_grid(grid)
    p = plan(source)
    gd = GridDir(out)
    text = source.source.read_text(encoding="utf-8") if source.source else None
    write_atomic(gd.plan_file, json.dumps(_plan_record(p, text), indent=2) + "\n")
    if text is not None:
        write_atomic(out / "grid.yaml", text)
    for pt in p.points:
        record = {**pt.to_dict(), "spec": pt.spec.to_dict()}
        point_file = gd.point(pt.id) / "point.json"
        if not point_file.is_file():
            write_atomic(point_file, json.dumps(record, indent=2) + "\n")
        status = gd.read_status(pt.id)
        if not gd.status_file(pt.id).is_file() or (retry_failed and status["state"] == "failed"):
            status.update(state="pending", error=None)
            gd.write_status(pt.id, status)
    return p


@dataclass
class GridSummary:
    out: Path
    counts: dict[str, int]
    errors: list[str]

    @property
    def ok(self) -> bool:
        return self.counts.get("finished", 0) == sum(self.counts.values())


def run_grid(
    grid: Grid | str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    workers: int = 1,
    executor: str = "local",
    retry_failed: bool = False,
    cluster: str | None = None,
    submitit_params: dict[str, Any] | None = None,
    threads: int | None = None,
) -> GridSummary:
    """Run every point of ``grid`` not finished yet into ``out`` (see the module
    docstring). ``executor``: ``local`` (worker subprocesses) or ``submitit``
    (``cluster``: None lets submitit pick Slurm when present, ``local`` or ``debug`` force
    one; ``submitit_params`` go to ``update_parameters``, e.g. ``slurm_partition``).
    ``threads``: torch threads of each worker (None: for local workers the machine's
    cores divided among them, for submitit jobs torch's default)."""
    if workers < 1:
        raise GridRunError(f"--workers must be >= 1, got {workers}")
    if threads is not None and threads < 1:
        raise GridRunError(f"--threads must be >= 1, got {threads}")
    if executor not in ("local", "submitit"):
        raise GridRunError(f"unknown executor {executor!r}; use local or submitit")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    busy = (
        f"{root} is in use by another `mixstack grid run` (its lock {root / '.grid.lock'} is held)"
    )
    with _flock(root / ".grid.lock", what=busy):
        p = prepare(grid, root, retry_failed=retry_failed)
        gd = GridDir(root)
        todo = [pt for pt in p.points if gd.read_status(pt.id)["state"] in ("pending", "running")]
        n = min(workers, len(todo))
        errors: list[str] = []
        if n:
            if executor == "local":
                errors = _run_local(root, n, threads)
            else:
                errors = _run_submitit(root, n, cluster, submitit_params or {}, threads)
        return summarize(root, errors)


def summarize(out: Path, errors: list[str] | None = None) -> GridSummary:
    gd = GridDir(out)
    counts = dict.fromkeys(STATES, 0)
    for pt in gd.read_plan()["points"]:
        counts[gd.read_status(pt["id"])["state"]] += 1
    return GridSummary(out, counts, errors or [])


def _run_local(root: Path, n: int, threads: int | None = None) -> list[str]:
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    procs = []
    for k in range(n):
        log = open(logs / f"worker-{k}.log", "ab")  # noqa: SIM115 (closed below)
        cmd = [sys.executable, "-m", "mixstack.ablate.worker", str(root), "--worker", str(k)]
        # Share the cores instead of oversubscribing them (each torch would take them all).
        # On a machine that other jobs also use, fewer threads can be much faster: a
        # 2-thread worker beside another busy process ran small models ~60x slower
        # than a 1-thread one (threads spinning on a core the other job holds).
        share = threads if threads is not None else max(1, (os.cpu_count() or 1) // n)
        cmd += ["--threads", str(share)]
        endpoint = _hub_endpoint()
        if endpoint is not None:  # `mixstack --hub-endpoint URL grid run ...`
            cmd += ["--hub-endpoint", endpoint]
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log, k))
    errors = []
    try:
        for proc, log, k in procs:
            code = proc.wait()
            log.close()
            if code != 0:
                errors.append(f"worker {k} exited with {code} (see {logs / f'worker-{k}.log'})")
    except BaseException:
        for proc, log, _ in procs:
            proc.terminate()
            log.close()
        raise
    return errors


def _run_submitit(
    root: Path, n: int, cluster: str | None, params: dict[str, Any], threads: int | None = None
) -> list[str]:
    try:
        import submitit
    except ModuleNotFoundError:
        raise GridRunError(
            "--executor submitit needs the submitit package: pip install 'mixstack[cluster]'"
        ) from None
    ex = submitit.AutoExecutor(folder=str(root / "submitit"), cluster=cluster)
    # submitit's defaults (2 minutes locally) would cut a worker that runs many points;
    # on Slurm, pass the partition's limit (--submitit-param timeout_min=...).
    params = {"timeout_min": DEFAULT_TIMEOUT_MIN, **params}
    ex.update_parameters(name=f"grid-{root.name}", **params)
    jobs = [ex.submit(work, str(root), k, _hub_endpoint(), threads) for k in range(n)]
    errors = []
    for k, job in enumerate(jobs):
        try:
            job.result()
        except Exception as exc:  # a failed job: its stderr is in the submitit folder
            errors.append(f"submitit job {job.job_id} (worker {k}) failed: {exc}")
    return errors


def _hub_endpoint() -> str | None:
    from mixstack.dsl.hubref import default_options

    return default_options().endpoint


# -- the worker ---------------------------------------------------------------------------


def work(
    out: str | os.PathLike[str],
    worker: int = 0,
    hub_endpoint: str | None = None,
    threads: int | None = None,
) -> int:
    """Run pending (and interrupted) points of the grid in ``out`` one after another
    until none is left; returns how many this worker ran. Safe with any number of
    workers on the same directory (each point's flock is its claim). ``hub_endpoint``:
    the Hub that ``run.hub`` pushes go to (the token comes from the environment).
    ``threads``: this process's torch threads (None: torch's default)."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    if hub_endpoint is not None:
        from mixstack.dsl.hubref import HubOptions, default_options, set_default_options

        set_default_options(default_options().merged(HubOptions(endpoint=hub_endpoint)))
    gd = GridDir(Path(out))
    ran = 0
    for record in gd.read_plan()["points"]:
        pid = record["id"]
        try:
            with _flock(gd.point(pid) / ".lock", what="busy"):
                state = gd.read_status(pid)["state"]
                if state in ("pending", "running"):
                    run_point(gd, pid, worker)
                    ran += 1
        except GridRunError as exc:
            if str(exc) != "busy":
                raise
    return ran


def _kill_hook(gd: GridDir) -> bool:
    """Whether the test hook fires for the point about to run (see KILL_HOOK_ENV)."""
    k = os.environ.get(KILL_HOOK_ENV)
    if k is None or (gd.root / ".kill-hook-fired").exists():
        return False
    finished = sum(gd.read_status(p["id"])["state"] == "finished" for p in gd.read_plan()["points"])
    return finished == int(k)


def run_point(gd: GridDir, pid: str, worker: int) -> None:
    """Train one point (the caller holds its lock), recording its status atomically."""
    from mixstack.dsl.loader import load_spec
    from mixstack.training import rundir
    from mixstack.training.run import fit

    record = gd.read_point(pid)
    status = gd.read_status(pid)
    run = rundir.RunDir(gd.run_dir(pid))
    resume = status["state"] == "running" and run.checkpoint.is_file()
    status.update(
        state="running",
        attempts=status.get("attempts", 0) + 1,
        started=now(),
        worker=worker,
        host=socket.gethostname(),
        pid=os.getpid(),
        error=None,
        resumed=resume,
    )
    gd.write_status(pid, status)
    plan = gd.read_plan()
    os.environ["WANDB_RUN_GROUP"] = plan["name"]  # one W&B group per grid
    os.environ["WANDB_NAME"] = f"{plan['name']}-{pid}"
    began = time.monotonic()
    kill = _kill_hook(gd)
    try:
        overrides = [f"run.stop_after={max(1, record['steps'] // 2)}"] if kill else []
        spec = load_spec(record["spec"], overrides)
        pushed_only = status.get("hub") is not None and "error" in status["hub"]
        meta = run.read_metadata() if resume or pushed_only else {}
        if (resume or pushed_only) and (
            meta.get("status") == "finished" and (run.model_dir / "config.json").is_file()
        ):
            # Killed after training ended, before its status said so, or trained but its
            # run.hub push failed: nothing to train again, only the push (if any) to do.
            hub = _push_point(run, spec, meta)
            status.update(
                state="failed" if hub is not None and "error" in hub else "finished",
                ended=now(),
                wall_s=None if resume else status.get("wall_s"),
                step=meta.get("step"),
                params=meta.get("params"),
                hub=hub,
                error=_push_error(hub),
            )
            gd.write_status(pid, status)
            return
        try:
            result = fit(spec, run.root, resume=resume, overwrite=not resume, progress=False)
        except rundir.RunDirError:
            if not resume:
                raise
            # A damaged checkpoint or a run left half-written: start the point again.
            result = fit(spec, run.root, resume=False, overwrite=True, progress=False)
        if kill:
            (gd.root / ".kill-hook-fired").write_text(pid)
            os.killpg(os.getpgrp(), signal.SIGKILL)
        if result.status != "finished":
            raise GridRunError(
                f"the run stopped at step {result.step} of {result.total_steps} "
                "(run.stop_after in the base spec? a grid point trains to the end)"
            )
        status.update(
            state="finished" if result.hub is None or "error" not in result.hub else "failed",
            ended=now(),
            wall_s=time.monotonic() - began,  # this attempt (a resumed point: its last part)
            step=result.step,
            params=result.params,
            hub=result.hub,  # run.hub: the pushed commit, or the error (then: failed)
            error=_push_error(result.hub),
        )
    except Exception as exc:
        (gd.point(pid) / "error.txt").write_text(traceback.format_exc(), encoding="utf-8")
        status.pop("hub", None)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        status.update(
            state="failed",
            ended=now(),
            wall_s=time.monotonic() - began,
            error=f"{type(exc).__name__}: {first}",
        )
    gd.write_status(pid, status)


def _push_error(hub: dict[str, Any] | None) -> str | None:
    if hub is None or "error" not in hub:
        return None
    return f"push to the Hub failed: {hub['error']} (--retry-failed pushes again, no training)"


def _push_point(run: Any, spec: Any, meta: dict[str, Any]) -> dict[str, Any] | None:
    """``run.hub`` of a point trained earlier: push it unless ``run.json`` records a
    pushed commit. Returns what ``run.json`` then records (None without run.hub)."""
    if spec.run.hub is None:
        return None
    done = meta.get("hub")
    if (
        isinstance(done, dict)
        and done.get("commit")
        and done.get("revision") == (spec.run.hub.revision or "main")
    ):
        return done
    from mixstack.hub.hub import push_run

    hub = push_run(run.root, spec.run.hub)
    meta = run.read_metadata()
    meta["hub"] = hub
    run.write_metadata(meta)
    return hub
