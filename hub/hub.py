"""Push model directories to the Hugging Face Hub and pull them back (DESIGN §8).

* :func:`push` uploads a model directory as it is (``config.json``, ``spec.yaml``, the
  safetensors file(s) and any index) with a freshly rendered model card, in one
  commit through ``HfApi.create_commit``. A run directory pushes its ``model/`` and the
  card gets the run's task and metrics from ``run.json``. The directory is loaded
  first: a broken one is never pushed.
* :func:`download` resolves the revision to a commit sha, refuses a repository
  without safetensors weights (a pickle checkpoint is never downloaded, let alone
  unpickled), downloads only ``*.safetensors``, ``*.json``, ``*.yaml`` and ``*.md``
  through the Hub cache (``snapshot_download``), and checks every file against the
  digest the Hub lists (sha256 for LFS files, the git blob sha1 otherwise); a file that
  does not match is removed from the cache, so a retry downloads it again.
* :func:`pull` adds ``out=``: the checked model is copied to a temporary folder beside
  ``out`` and swapped in, so ``out`` is either the old content or the complete new one.
* :func:`from_hub` is ``from_pretrained("hf://...")``: download, then the strict local
  loader; the loaded spec remembers the commit (:mod:`mixstack.dsl.annotations`).

Endpoint, token and cache are passed explicitly; the token reaches huggingface_hub
only and is masked out of every message.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixstack.dsl import annotations
from mixstack.dsl.errors import CheckpointError, MixstackError
from mixstack.dsl.hubref import (
    HubOptions,
    HubRef,
    default_options,
    hub_api,
    hub_errors,
    parse_ref,
    scrub,
    source_record,
)
from mixstack.hub.modeldir import CARD, CONFIG, PICKLES

ALLOW_PATTERNS = ("*.safetensors", "*.json", "*.yaml", "*.md")
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle", *PICKLES)
RUN_FILE = "run.json"


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    revision: str
    commit: str
    url: str


@dataclass(frozen=True)
class Pulled:
    path: Path  # the checked model directory (``out`` when given, else the cache snapshot)
    repo_id: str
    revision: str
    commit: str


def _options(token: Any, endpoint: str | None, cache_dir: Any = None) -> HubOptions:
    return default_options().merged(HubOptions(endpoint=endpoint, token=token, cache_dir=cache_dir))


def _error(message: str) -> CheckpointError:
    return CheckpointError(message)


# -- push --------------------------------------------------------------------------------


def _source_folder(model_or_dir: Any, tmp: Path) -> tuple[Path, Path | None]:
    """(model directory to push, run directory or None)."""
    from mixstack.archs.models import MixStackModel
    from mixstack.hub.modeldir import save_model_dir

    if isinstance(model_or_dir, MixStackModel):
        return save_model_dir(model_or_dir, tmp / "model"), None
    if not isinstance(model_or_dir, (str, os.PathLike)):
        raise CheckpointError(
            f"cannot push a {type(model_or_dir).__name__}; expected a MixStackModel, a model "
            "directory or a run directory"
        )
    folder = Path(model_or_dir)
    if (folder / RUN_FILE).is_file() and (folder / "model").is_dir():
        return folder / "model", folder
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a directory (a model or run directory to push)")
    if not (folder / CONFIG).is_file() and (folder / RUN_FILE).is_file():
        raise CheckpointError(
            f"{folder} is a run directory without model/ (the run has not finished); "
            f"finish it with `mixstack train {folder} --resume` first"
        )
    run = folder.parent if (folder.parent / RUN_FILE).is_file() else None
    return folder, run


def _files(folder: Path) -> list[Path]:
    """Every file of a model directory, hidden ones and the card left out."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and p.relative_to(folder).as_posix() != CARD
    )


def push(
    model_or_dir: Any,
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
) -> PushResult:
    """Upload a model / model directory / run directory to ``repo_id`` in one commit.

    Creates the repository (``private``) and the branch ``revision`` when missing.
    Returns the commit sha. Raises :class:`CheckpointError` with what to do on failure.
    """
    from huggingface_hub import CommitOperationAdd

    from mixstack.hub.card import RunInfo, render, run_info
    from mixstack.hub.modeldir import load_model_dir

    options = _options(token, endpoint)
    ref = parse_ref(repo_id, revision, error=_error)
    branch = ref.revision or "main"
    with tempfile.TemporaryDirectory(prefix="mixstack-push-") as tmp:
        folder, run = _source_folder(model_or_dir, Path(tmp))
        model = load_model_dir(folder)  # the directory must load before it is shared
        info = run_info(run) if run is not None else RunInfo()
        card = render(model, run=info, repo_id=ref.repo_id)
        operations = [
            CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=p)
            for p in _files(folder)
        ]
        operations.append(CommitOperationAdd(path_in_repo=CARD, path_or_fileobj=card.encode()))
        message = commit_message or (
            f"mixstack {model.spec.arch} `{model.spec.layers.pattern}` "
            f"(spec {model.spec.spec_hash[:12]})"
        )
        api = hub_api(options)
        with hub_errors(f"cannot push {folder} to {ref.repo_id}", ref, options, _error):
            api.create_repo(ref.repo_id, private=private, exist_ok=True)
            if branch != "main":
                api.create_branch(ref.repo_id, branch=branch, exist_ok=True)
            commit = api.create_commit(
                ref.repo_id, operations, commit_message=message, revision=branch
            )
    url = f"{(options.endpoint or 'https://huggingface.co').rstrip('/')}/{ref.repo_id}"
    return PushResult(ref.repo_id, branch, commit.oid, url)


# -- download and pull -----------------------------------------------------------------------


def _wanted(name: str) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in ALLOW_PATTERNS)


def _git_blob_sha1(path: Path) -> str:
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode(), usedforsecurity=False)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_digests(folder: Path, siblings: list[Any], ref: HubRef, commit: str) -> None:
    """Every downloaded file against the Hub's digest; a mismatching one is removed from
    the cache (snapshot link and blob) so the next attempt downloads it again."""
    bad = []
    for sibling in siblings:
        path = folder / sibling.rfilename
        if not path.is_file():
            raise CheckpointError(
                f"download of {ref.repo_id}@{commit[:12]} is incomplete: {sibling.rfilename} "
                "is missing; run the same command again"
            )
        lfs = getattr(sibling, "lfs", None)
        expected = lfs.sha256 if lfs is not None else sibling.blob_id
        actual = _sha256(path) if lfs is not None else _git_blob_sha1(path)
        if expected and actual != expected:
            bad.append((sibling.rfilename, expected, actual))
            blob = Path(os.path.realpath(path))
            path.unlink(missing_ok=True)
            if blob != path:
                blob.unlink(missing_ok=True)
    if bad:
        lines = "\n".join(f"  {name}: expected {e[:16]}..., got {a[:16]}..." for name, e, a in bad)
        raise CheckpointError(
            f"download of {ref.repo_id}@{commit[:12]} is corrupted (digest mismatch):\n{lines}\n"
            "the damaged files were removed from the cache; run the same command again to "
            "download them anew"
        )


def download(
    repo: str,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
    cache_dir: Any = None,
) -> Pulled:
    """Download the mixstack files of a Hub model repository into the Hub cache."""
    from huggingface_hub import snapshot_download

    options = _options(token, endpoint, cache_dir)
    ref = parse_ref(repo, revision, error=_error)
    what = f"cannot download {ref.text()}"
    with hub_errors(what, ref, options, _error):
        info = hub_api(options).model_info(ref.repo_id, revision=ref.revision, files_metadata=True)
        commit = info.sha
        siblings = list(info.siblings or [])
        names = [s.rfilename for s in siblings]
        if not any(n.endswith(".safetensors") for n in names):
            pickles = [n for n in names if any(fnmatch.fnmatch(n, p) for p in PICKLE_PATTERNS)]
            found = (
                f"it has only pickle checkpoints ({', '.join(sorted(pickles))}), which mixstack "
                "never downloads or unpickles"
                if pickles
                else f"it has no safetensors weights (files: {', '.join(sorted(names)) or 'none'})"
            )
            raise CheckpointError(f"{what}@{commit[:12]}: {found}")
        path = snapshot_download(
            ref.repo_id,
            revision=commit,
            allow_patterns=list(ALLOW_PATTERNS),
            cache_dir=options.cache_dir,
            token=options.token,
            endpoint=options.endpoint,
        )
    _check_digests(Path(path), [s for s in siblings if _wanted(s.rfilename)], ref, commit)
    return Pulled(Path(path), ref.repo_id, ref.revision or "main", commit)


def _remember(model: Any, pulled: Pulled, options: HubOptions) -> None:
    ref = HubRef(pulled.repo_id, pulled.revision)
    annotations.attach(model.spec, hub_sources=[source_record(ref, pulled.commit, options)])


def from_hub(
    path: Any,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
    cache_dir: Any = None,
    device: Any = None,
    dtype: Any = None,
) -> Any:
    """``from_pretrained("hf://org/name[@rev]")``: download through the cache, load strictly
    (a transformers-format repository through the importer of :mod:`mixstack.interop`)."""
    text = os.fspath(path) if isinstance(path, os.PathLike) else path
    if not isinstance(text, str) or not text.startswith("hf://"):
        raise CheckpointError(
            f"revision=, token=, endpoint= and cache_dir= apply to hf://ORG/NAME sources, not "
            f"to the local path {text!r}"
        )
    pulled = download(text, revision=revision, token=token, endpoint=endpoint, cache_dir=cache_dir)
    model = _load_checked(pulled, load_any, device=device, dtype=dtype)
    _remember(model, pulled, _options(token, endpoint, cache_dir))
    return model


def load_any(path: Path, **kwargs: Any) -> Any:
    """A mixstack model directory, or a transformers checkpoint folder (``config.json``
    with ``model_type``: mamba, mamba2, llama, bamba, nemotron_h) imported."""
    from mixstack.hub.modeldir import load_model_dir
    from mixstack.interop.transformers import is_transformers_dir, load_transformers

    if is_transformers_dir(path):
        return load_transformers(path, **kwargs)
    return load_model_dir(path, **kwargs)


def _load_checked(pulled: Pulled, loader: Any, **kwargs: Any) -> Any:
    try:
        return loader(pulled.path, **kwargs)
    except CheckpointError as exc:
        raise CheckpointError(
            f"{pulled.repo_id}@{pulled.commit[:12]} is not a loadable mixstack model:\n{exc}"
        ) from None


def pull(
    repo: str,
    *,
    revision: str | None = None,
    out: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
    cache_dir: Any = None,
) -> Pulled:
    """Download and check a model; with ``out``, also write it there atomically (a
    folder that exists must be a model directory, which is then replaced)."""
    from mixstack.hub.modeldir import _replaceable, _swap_in

    target = Path(out) if out is not None else None
    if target is not None and target.exists() and not _replaceable(target):
        raise CheckpointError(
            f"{target} exists and is not a model directory; refusing to replace it"
        )
    pulled = download(repo, revision=revision, token=token, endpoint=endpoint, cache_dir=cache_dir)
    if target is None:
        _load_checked(pulled, load_any)
        return pulled
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    try:
        shutil.copytree(pulled.path, tmp, symlinks=False)  # cache links -> real files
        _load_checked(Pulled(tmp, pulled.repo_id, pulled.revision, pulled.commit), load_any)
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Pulled(target, pulled.repo_id, pulled.revision, pulled.commit)


def retry_hint(run_dir: Path, repo_id: str, revision: str | None, private: bool) -> str:
    extra = (f" --revision {revision}" if revision else "") + (" --private" if private else "")
    return f"mixstack push {run_dir / 'model'} {repo_id}{extra}"


def push_run(run_dir: Path, hub: Any, options: HubOptions | None = None) -> dict[str, Any]:
    """``run.hub``: push a finished run. Never raises for a Hub failure: returns what
    ``run.json`` records (the commit, or the error and the command that retries)."""
    options = options or default_options()
    try:
        result = push(
            run_dir,
            hub.repo_id,
            revision=hub.revision,
            private=hub.private,
            token=options.token,
            endpoint=options.endpoint,
        )
    except MixstackError as exc:
        return {
            "repo_id": hub.repo_id,
            "error": scrub(str(exc), options.token),
            "retry": retry_hint(run_dir, hub.repo_id, hub.revision, hub.private),
        }
    return {
        "repo_id": result.repo_id,
        "revision": result.revision,
        "commit": result.commit,
        "url": result.url,
    }
