"""The run directory: what a ``mixstack train`` run leaves behind, and resuming it.

::

    RUN_DIR/
      spec.yaml           the resolved spec (model + train + run) of the run
      run.json            metadata: versions, git sha, resolved backends, segments, result
      metrics.csv         every logged metric (train rows, val rows), one run's history
      logs/version_K/     Lightning's CSV log of invocation K (merged into metrics.csv)
      checkpoints/last.ckpt   Lightning checkpoint (weights_only-loadable)
      model/              the exported model directory (config.json, spec.yaml,
                          model.safetensors, README.md)

A run may take several invocations (``run.stop_after``, an interruption, ``--resume``):
each is a *segment* starting at the global step restored from ``last.ckpt``. Every
file is written atomically (temporary file, then ``os.replace``).
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import re
import secrets
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from mixstack.dsl import registry
from mixstack.dsl.errors import MixstackError
from mixstack.dsl.spec import Spec
from mixstack.kernels import backends

SPEC_FILE = "spec.yaml"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.csv"
CHECKPOINT = Path("checkpoints") / "last.ckpt"
MODEL_DIR = "model"
LOGS_DIR = "logs"
# Everything a run writes at the top of its directory (optional loggers included).
RUN_ENTRIES = frozenset(
    (
        SPEC_FILE,
        RUN_FILE,
        METRICS_FILE,
        CHECKPOINT.parts[0],
        MODEL_DIR,
        LOGS_DIR,
        "tensorboard",
        "wandb",
    )
)


def _is_temporary(name: str) -> bool:
    """A leftover of an interrupted atomic write (``.NAME.*.tmp`` / ``.NAME.*.old``)."""
    return name.startswith(".") and name.endswith((".tmp", ".old"))


# ``run.json["written"]``: relative paths of the files the run wrote (its manifest), and
# folders a logger fills with names we cannot predict (entries ending in "/"); only those
# may be removed by --overwrite.
WRITTEN_KEY = "written"


def segment_paths(segment: int, logger: str) -> set[str]:
    """The paths an invocation writes, known before it starts."""
    paths = {
        SPEC_FILE,
        RUN_FILE,
        METRICS_FILE,
        CHECKPOINT.as_posix(),
        f"{LOGS_DIR}/version_{segment}/metrics.csv",
        f"{LOGS_DIR}/version_{segment}/hparams.yaml",
    }
    if logger == "tensorboard":
        paths.add(f"tensorboard/version_{segment}/")  # event files named by time and host
    elif logger == "wandb":
        paths.add("wandb/")
    return paths


def record_written(meta: dict[str, Any], paths: set[str]) -> None:
    meta[WRITTEN_KEY] = sorted(set(meta.get(WRITTEN_KEY, [])) | paths)


class RunDirError(MixstackError):
    """A run directory cannot be created, reused or resumed as asked."""


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write via a temporary file in the same folder and ``os.replace``: never half a file.

    The file gets the permissions of any new file (``0o666`` less the umask), not the
    owner-only mode of ``tempfile.mkstemp``: a run directory is meant to be shared.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def is_launching_process() -> bool:
    """False in the extra processes a multi-process strategy starts (Lightning sets
    ``LOCAL_RANK`` / ``NODE_RANK``, torchrun ``RANK``, ``srun`` with several tasks
    ``SLURM_PROCID``): only one process writes files."""
    if "RANK" in os.environ:
        return os.environ["RANK"] == "0"
    tasks = os.environ.get("SLURM_NTASKS", "1")
    if tasks.isdigit() and int(tasks) > 1 and "SLURM_PROCID" in os.environ:
        return os.environ["SLURM_PROCID"] == "0"
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


def _diff(old: Any, new: Any, path: str = "") -> list[str]:
    """Dotted paths where two plain-data trees differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out.extend(_diff(old.get(key), new.get(key), f"{path}.{key}" if path else str(key)))
        return out
    return [] if old == new else [path or "<root>"]


@dataclass
class RunDir:
    """Paths of one run directory."""

    root: Path

    @property
    def spec_file(self) -> Path:
        return self.root / SPEC_FILE

    @property
    def run_file(self) -> Path:
        return self.root / RUN_FILE

    @property
    def metrics_file(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def checkpoint(self) -> Path:
        return self.root / CHECKPOINT

    @property
    def model_dir(self) -> Path:
        return self.root / MODEL_DIR

    @property
    def logs(self) -> Path:
        return self.root / LOGS_DIR

    def holds_run(self) -> bool:
        return self.spec_file.is_file() or self.run_file.is_file()

    def foreign_entries(self) -> list[str]:
        """Files in the directory (at any depth) that this run did not write, by relative
        path: a user's own files, which --overwrite must never delete. What the run wrote
        is its manifest (``run.json["written"]``); a run recorded before manifests existed
        owns the paths every invocation writes (:func:`segment_paths`)."""
        meta = self.read_metadata()
        owned = set(meta.get(WRITTEN_KEY, []))
        for k in range(len(meta.get("segments", []))):
            owned |= segment_paths(k, "none")
        folders = tuple(p for p in owned if p.endswith("/"))
        foreign = []
        for path in sorted(self.root.rglob("*")):
            rel = path.relative_to(self.root).as_posix()
            if path.is_dir() and not path.is_symlink():
                continue
            if rel in owned or rel.startswith(folders):
                continue
            if any(_is_temporary(part) for part in Path(rel).parts):
                continue
            foreign.append(rel)
        return foreign

    def remove_written(self) -> None:
        """Delete the files of :meth:`foreign_entries`' complement, then the folders left
        empty; anything else stays (the caller has refused a directory with foreign files)."""
        for path in sorted(self.root.rglob("*"), key=lambda p: -len(p.parts)):
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()

    def read_metadata(self) -> dict[str, Any]:
        if not self.run_file.is_file():
            return {}
        try:
            return json.loads(self.run_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise RunDirError(f"cannot read {self.run_file}: {exc}") from None

    def write_metadata(self, data: dict[str, Any]) -> None:
        write_atomic(self.run_file, json.dumps(data, indent=2, sort_keys=False) + "\n")


def check(root: Path, spec: Spec, *, resume: bool, overwrite: bool) -> RunDir:
    """Refuse what cannot be done with ``root``; writes nothing.

    New run: ``root`` must not hold a run (unless ``overwrite``) nor anything else.
    Resume: ``root`` must hold a run with a checkpoint, and the same model and train
    sections (the run section may change: devices, precision, stop_after...).
    """
    run = RunDir(Path(root))
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite exclude each other")
    if resume:
        _check_resumable(run, spec)
    elif run.holds_run():
        if not overwrite:
            raise RunDirError(
                f"{run.root} already holds a run; continue it with --resume, replace it with "
                "--overwrite, or pick another --out"
            )
        foreign = run.foreign_entries()
        if foreign:
            raise RunDirError(
                f"{run.root} holds files the run did not write ({', '.join(foreign[:8])}"
                f"{f' and {len(foreign) - 8} more' if len(foreign) > 8 else ''}); --overwrite "
                "only removes a run's own files: move them away or pick another --out"
            )
    elif run.root.exists() and (not run.root.is_dir() or any(run.root.iterdir())):
        raise RunDirError(f"{run.root} exists and is not an empty directory or a run directory")
    return run


def prepare(root: Path, spec: Spec, *, resume: bool, overwrite: bool) -> RunDir:
    """:func:`check`, then write the spec (a new run replaces an old one if ``overwrite``).
    Launching process only."""
    run = check(root, spec, resume=resume, overwrite=overwrite)
    if not resume and run.holds_run():
        run.remove_written()
    run.root.mkdir(parents=True, exist_ok=True)
    write_atomic(run.spec_file, spec.dump())  # on resume: this invocation's run section
    return run


def next_segment(run: RunDir, *, resume: bool) -> int:
    """Index of the invocation about to start (0 for a new or replaced run)."""
    return len(run.read_metadata().get("segments", [])) if resume else 0


def checkpoint_step(path: Path) -> int:
    """The global step of a Lightning checkpoint, read with ``weights_only=True`` (no code
    is unpickled); a damaged or unsafe file is a :class:`RunDirError`."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(state["global_step"])
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        raise RunDirError(
            f"cannot resume from {path}: it is damaged or not a plain-data Lightning "
            f"checkpoint (loaded with weights_only=True: {_first_line(exc)}); restore it, or "
            "start the run again with --overwrite"
        ) from None


def _first_line(exc: BaseException) -> str:
    """The telling line of a torch.load error (its 'Unsupported global' line, if any),
    without terminal colour codes."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(exc).splitlines()]
    lines = [line for line in lines if line]
    telling = [line for line in lines if "Unsupported global" in line]
    return f"{type(exc).__name__}: {(telling or lines or [''])[0]}"


# Train settings that change nothing a healthy run computes, so a resumed run may change
# them (a run stopped by a NaN loss continues with skip_step).
RESUME_MAY_CHANGE = frozenset({"train.on_nonfinite"})


def _check_resumable(run: RunDir, spec: Spec) -> None:
    if not run.spec_file.is_file():
        what = "does not exist" if not run.root.exists() else "is not a run directory"
        raise RunDirError(
            f"nothing to resume: {run.root} {what} (a run directory holds spec.yaml, "
            "run.json and checkpoints/ from an earlier mixstack train)"
        )
    if not run.checkpoint.is_file():
        raise RunDirError(
            f"nothing to resume: {run.checkpoint} does not exist (the run stopped before its "
            "first checkpoint; start it again with --overwrite)"
        )
    from mixstack.dsl.loader import load_spec

    old = load_spec(str(run.spec_file))
    old_data, new_data = old.to_dict(), spec.to_dict()
    changed = [
        p
        for section in ("model", "train")
        for p in _diff(old_data.get(section), new_data.get(section), section)
        if p not in RESUME_MAY_CHANGE
    ]
    if changed:
        raise RunDirError(
            f"cannot resume {run.root}: the spec differs from the run's in "
            f"{', '.join(changed[:8])}{' ...' if len(changed) > 8 else ''} (only the run "
            "section may change on --resume)"
        )
    meta = run.read_metadata()
    if meta.get("status") == "finished" and (run.model_dir / "config.json").is_file():
        raise RunDirError(
            f"{run.root} has finished (step {meta.get('step')}) and its model is in "
            f"{run.model_dir}; nothing to resume (to train longer, start a new run)"
        )
    checkpoint_step(run.checkpoint)


def versions() -> dict[str, str]:
    """Versions of mixstack and the libraries a run depends on."""
    from importlib import metadata

    from mixstack._version import __version__

    out = {"mixstack": __version__, "python": platform.python_version()}
    for name in ("torch", "lightning", "torchmetrics", "safetensors"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_revision() -> dict[str, Any] | None:
    """Commit (and whether the tree is dirty) of the mixstack checkout, if it is one."""
    where = Path(__file__).resolve().parent.parent  # the package root (training/..)
    try:
        sha = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"sha": sha, "dirty": bool(status.strip())}


def start_segment(run: RunDir, spec: Spec, start_step: int, *, world_size: int = 1) -> int:
    """Record a new invocation starting at ``start_step`` on ``world_size`` processes;
    returns its index."""
    meta = run.read_metadata() or {
        "spec_hash": spec.spec_hash,
        "created": now(),
        "segments": [],
    }
    meta.update(
        {
            "status": "running",
            "versions": versions(),
            "git": git_revision(),
            "platform": platform.platform(),
            # entry points (dist, version) and files (sha256), kernel providers included
            "plugins": registry.plugin_origins(backends.provider_origins().values()),
        }
    )
    meta["segments"].append({"start_step": start_step, "started": now(), "world_size": world_size})
    record_written(meta, segment_paths(len(meta["segments"]) - 1, spec.run.logger.type))
    run.write_metadata(meta)
    return len(meta["segments"]) - 1


def remove_if_unstarted(run: RunDir, created: bool) -> bool:
    """After a new run failed before its first optimizer step: remove what it wrote (and
    the folder, if this run created it), so the same ``--out`` can be used again at once.
    Returns whether it did."""
    if run.checkpoint.is_file() or run.foreign_entries():
        return False
    run.remove_written()
    if created and run.root.is_dir() and not any(run.root.iterdir()):
        run.root.rmdir()
    return True


def resume_hint(root: Path) -> str:
    """What to do after an interrupted run: resume from its checkpoint, or start again."""
    run = RunDir(Path(root))
    if not run.root.exists() or not run.holds_run():
        return "it stopped before its first step and left nothing; run the command again"
    if not run.checkpoint.is_file():
        return (
            f"no checkpoint was written yet, so there is nothing to resume in {run.root}; "
            f"start again with --overwrite --out {run.root}"
        )
    try:
        step = f" (step {checkpoint_step(run.checkpoint)})"
    except RunDirError:
        step = ""
    return (
        f"the last checkpoint{step} is {run.checkpoint}; continue with: "
        f"mixstack train {run.root} --resume"
    )


def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def merge_metrics(run: RunDir) -> list[dict[str, str]]:
    """Join the segments' CSV logs into ``metrics.csv`` as one uninterrupted history.

    Lightning logs a row at the 0-based index of the optimizer step it belongs to
    (training rows: the step taken; validation rows: the last step before it). A
    segment resumed from a checkpoint of global step ``S`` redoes everything from index
    ``S`` on, so its predecessor's rows from ``S`` on (logged after that checkpoint,
    before an interruption) are dropped.
    """
    segments = run.read_metadata().get("segments", [])
    rows: list[dict[str, str]] = []
    for k in range(len(segments)):
        part = read_csv(run.logs / f"version_{k}" / METRICS_FILE)
        if k + 1 < len(segments):
            resume = segments[k + 1]["start_step"]
            part = [row for row in part if int(row["step"]) < resume]
        rows.extend(part)
    columns = sorted(
        {key for row in rows for key in row}, key=lambda c: (c not in ("epoch", "step"), c)
    )
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(run.metrics_file, buffer.getvalue())
    return rows


def last_metrics(rows: list[dict[str, str]]) -> dict[str, float]:
    """The latest value of every metric in ``rows`` (empty cells skipped)."""
    out: dict[str, float] = {}
    for row in rows:
        for key, value in row.items():
            if key not in ("epoch", "step") and value not in ("", None):
                out[key] = float(value)
    return out


def spec_yaml_of(run: RunDir) -> dict[str, Any]:
    return yaml.safe_load(run.spec_file.read_text(encoding="utf-8"))
