"""``hf://org/name[@revision]`` references and the Hub options that reach them (DESIGN §8).

A spec source may live on the Hugging Face Hub: ``load_spec("hf://org/name")``,
``base: hf://org/name@v1`` inside a file, ``mixstack train hf://org/name``. The
reference names a model repository; its ``spec.yaml`` (the spec as authored, see
:mod:`mixstack.hub.modeldir`) is the spec. A branch, a tag or no revision at all is
resolved to a commit sha first, and that sha is what the origin of every value read
from the file says (``hf://org/name@<sha>/spec.yaml:3:5``) and what
:func:`mixstack.dsl.annotations.hub_sources` lists for ``run.json``.

:class:`HubOptions` carries the endpoint, token and cache folder; they are passed
explicitly (``load_spec(..., hub=HubOptions(...))``) down to every ``base:`` entry,
never read back from the environment after import, so tests can point at a local
Hub-compatible server. A token is never part of a message, a ``repr`` or a record.

``huggingface_hub`` is imported inside the functions that use it.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mixstack.dsl.errors import MixstackError

HF_PREFIX = "hf://"
SPEC_FILE = "spec.yaml"
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class HubOptions:
    """Where and how to reach the Hub. ``None`` fields fall back to huggingface_hub's
    own defaults (``HF_ENDPOINT`` / ``HF_TOKEN`` / the ``hf auth login`` token / the
    default cache). The token is left out of ``repr``."""

    endpoint: str | None = None
    token: str | bool | None = field(default=None, repr=False)
    cache_dir: str | os.PathLike[str] | None = None

    def merged(self, other: HubOptions | None) -> HubOptions:
        """``other``'s set fields over these."""
        if other is None:
            return self
        return replace(
            self,
            endpoint=other.endpoint if other.endpoint is not None else self.endpoint,
            token=other.token if other.token is not None else self.token,
            cache_dir=other.cache_dir if other.cache_dir is not None else self.cache_dir,
        )


# The command line sets this once (`mixstack --hub-endpoint URL ...`); every load_spec and
# push of that process starts from it.
_DEFAULT = HubOptions()


def set_default_options(options: HubOptions) -> None:
    global _DEFAULT
    _DEFAULT = options


def default_options() -> HubOptions:
    return _DEFAULT


@dataclass(frozen=True)
class HubRef:
    """A parsed ``hf://`` reference (or bare ``org/name``)."""

    repo_id: str
    revision: str | None = None

    def text(self, commit: str | None = None) -> str:
        rev = commit or self.revision
        return f"{HF_PREFIX}{self.repo_id}" + (f"@{rev}" if rev else "")


def is_hub_ref(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(HF_PREFIX)


def parse_ref(
    text: str,
    revision: str | None = None,
    *,
    error: Callable[[str], MixstackError] = MixstackError,
) -> HubRef:
    """``hf://org/name[@rev]`` or ``org/name`` -> :class:`HubRef`. ``revision`` given
    as well must agree with an ``@rev`` in the text."""
    body = text[len(HF_PREFIX) :] if text.startswith(HF_PREFIX) else text
    repo_id, at, rev = body.partition("@")
    repo_id = repo_id.strip().strip("/")
    if not _REPO_ID.fullmatch(repo_id) or (at and not rev.strip()):
        raise error(
            f"{text!r} is not a Hub reference; expected hf://ORG/NAME or hf://ORG/NAME@REVISION "
            "(REVISION a branch, tag or commit sha)"
        )
    rev = rev.strip() or None
    if rev and revision and rev != revision:
        raise error(
            f"{text!r} names revision {rev!r} but revision={revision!r} was passed as well; "
            "give the revision once"
        )
    return HubRef(repo_id, rev or revision)


def scrub(message: str, token: Any) -> str:
    """``message`` with the token (if it is a string) masked out."""
    if isinstance(token, str) and token:
        message = message.replace(token, "***")
    return message


def hub_api(options: HubOptions) -> Any:
    from huggingface_hub import HfApi

    return HfApi(endpoint=options.endpoint, token=options.token)


@contextlib.contextmanager
def hub_errors(
    what: str, ref: HubRef, options: HubOptions, error: Callable[[str], MixstackError]
) -> Iterator[None]:
    """huggingface_hub / HTTP failures -> ``error`` with a message that says what to do
    (never containing the token)."""
    from huggingface_hub import errors as hf_errors

    where = options.endpoint or "the Hub"
    try:
        yield
    except MixstackError:
        raise
    except hf_errors.RevisionNotFoundError:
        raise error(
            f"{what}: revision {ref.revision!r} does not exist in {ref.repo_id} on {where}"
        ) from None
    except hf_errors.GatedRepoError:
        raise error(f"{what}: {ref.repo_id} on {where} is gated; request access first") from None
    except hf_errors.RepositoryNotFoundError:
        raise error(
            f"{what}: repository {ref.repo_id} not found on {where} (or it is private and no "
            "valid token was given: pass token=, set HF_TOKEN or run `hf auth login`)"
        ) from None
    except hf_errors.RemoteEntryNotFoundError as exc:
        raise error(f"{what}: {scrub(_first_line(exc), options.token)}") from None
    except hf_errors.HfHubHTTPError as exc:
        raise error(f"{what}: the Hub refused: {scrub(_first_line(exc), options.token)}") from None
    except (OSError, ValueError, RuntimeError) as exc:
        # an interrupted download, the endpoint unreachable, a malformed response
        raise error(
            f"{what}: {type(exc).__name__}: {scrub(_first_line(exc), options.token)} "
            "(nothing usable was kept; run the same command again to retry)"
        ) from None
    except Exception as exc:  # httpx errors are not OSErrors
        if type(exc).__module__.split(".")[0] not in ("httpx", "httpx2", "httpcore", "h11"):
            raise
        raise error(
            f"{what}: connection to {where} failed ({type(exc).__name__}: "
            f"{scrub(_first_line(exc), options.token)}); run the same command again to retry"
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def resolve_commit(ref: HubRef, options: HubOptions, *, files: bool = False) -> Any:
    """``model_info`` of ``ref`` (``.sha`` is the resolved commit; ``files``: with each
    file's size and digests)."""
    return hub_api(options).model_info(ref.repo_id, revision=ref.revision, files_metadata=files)


def fetch_spec(
    text: str, options: HubOptions, error: Callable[[str], MixstackError]
) -> tuple[Path, str, dict[str, Any]]:
    """Download the ``spec.yaml`` of an ``hf://`` reference.

    Returns (local path, display name with the resolved commit, source record for
    ``run.json``)."""
    from huggingface_hub import hf_hub_download

    ref = parse_ref(text, error=error)
    with hub_errors(f"cannot load {text}", ref, options, error):
        info = resolve_commit(ref, options)
        names = [s.rfilename for s in info.siblings or []]
        if SPEC_FILE not in names:
            raise error(
                f"cannot load {text}: the repository has no {SPEC_FILE} at commit "
                f"{info.sha[:12]} (files: {', '.join(sorted(names)[:12]) or 'none'}); a mixstack "
                "model repository holds config.json and spec.yaml"
            )
        path = hf_hub_download(
            ref.repo_id,
            SPEC_FILE,
            revision=info.sha,
            endpoint=options.endpoint,
            token=options.token,
            cache_dir=options.cache_dir,
        )
    display = f"{HF_PREFIX}{ref.repo_id}@{info.sha}/{SPEC_FILE}"
    record = source_record(ref, info.sha, options)
    return Path(path), display, record


def source_record(ref: HubRef, commit: str, options: HubOptions) -> dict[str, Any]:
    """What ``run.json`` and provenance keep of a Hub source (no token)."""
    return {
        "source": ref.text(),
        "repo_id": ref.repo_id,
        "revision": ref.revision or "main",
        "commit": commit,
        "endpoint": options.endpoint or "default",
    }
