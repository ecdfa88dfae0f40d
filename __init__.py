"""mixstack: sequence models made of matrix mixers, from one typed spec.

Public API::

    import mixstack as ms
    spec = ms.load_spec("my_arch.yaml", overrides=["model.d_model=128"])
    model = ms.build(spec, seed=0)
    logits = model(input_ids)
    model = ms.from_pretrained("runs/my_arch/model")   # a trained model directory

``import mixstack`` loads torch, pydantic and pyyaml, nothing heavier: lightning,
huggingface_hub and plotting are imported inside the functions that use them.
"""

from __future__ import annotations

import sys as _sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

# The repository root is the package. Under pytest (or `python -c` from the checkout)
# this file may be imported under another name; alias it so `mixstack.*` imports
# resolve to one module instead of a second copy.
if __name__ != "mixstack":
    _sys.modules.setdefault("mixstack", _sys.modules[__name__])

from mixstack._version import __version__
from mixstack.dsl import registry
from mixstack.dsl.errors import BackendError, CheckpointError, MixstackError, SpecError
from mixstack.dsl.spec import ModelSpec, Spec

if TYPE_CHECKING:
    from mixstack.archs.models import MixStackModel


def load_spec(source: Any, overrides: Sequence[str] = (), *, hub: Any = None) -> Spec:
    """Load and validate a spec: a YAML path, ``zoo:NAME``, ``hf://ORG/NAME[@REV]``, a
    dict or a ``Spec``. ``hub``: a :class:`mixstack.dsl.hubref.HubOptions` (endpoint,
    token, cache) for every ``hf://`` reference, ``base:`` entries included.

    See :func:`mixstack.dsl.loader.load_spec`.
    """
    from mixstack.dsl.loader import load_spec as _load_spec

    return _load_spec(source, overrides=overrides, hub=hub)


def build(
    spec: Any,
    *,
    seed: int | None = None,
    device: Any = None,
    dtype: Any = None,
) -> MixStackModel:
    """Build a model from a spec (``Spec``, ``ModelSpec``, path, ``zoo:NAME`` or dict).

    See :func:`mixstack.archs.build`.
    """
    from mixstack.archs.builder import build as _build

    return _build(spec, seed=seed, device=device, dtype=dtype)


def materialize(target: Any, inputs: Any, *, layer: int | None = None, **kwargs: Any) -> Any:
    """The explicit L×L mixing matrices of a mixer on ``x``, or of a model's ``layer``
    on ``input_ids`` (fed its real, normed input).

    See :func:`mixstack.archs.matrix.materialize`.
    """
    from mixstack.archs.matrix import materialize as _materialize

    return _materialize(target, inputs, layer=layer, **kwargs)


def from_pretrained(
    path: Any,
    *,
    device: Any = None,
    dtype: Any = None,
    revision: str | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
    cache_dir: Any = None,
    allow_unverified: bool = False,
) -> MixStackModel:
    """Load a model directory (``config.json``, ``spec.yaml``, ``model.safetensors``):
    a local folder, or ``hf://ORG/NAME[@REVISION]`` downloaded through the Hub cache
    (``revision`` / ``token`` / ``endpoint`` / ``cache_dir``; see :mod:`mixstack.hub.hub`).
    A transformers checkpoint folder or Hub repository (``config.json`` with
    ``model_type``) is imported (:func:`mixstack.interop.load_transformers`,
    docs/interop.md). Shards with ``model.safetensors.index.json`` load too;
    ``allow_unverified``: accept weights without the spec hash and data digest.

    Safetensors only, strict: a missing, unexpected, mis-shaped or non-float tensor, a
    spec-hash or data-digest mismatch, NaN / inf weights or ``config.json`` / ``spec.yaml``
    disagreeing raise :class:`~mixstack.dsl.errors.CheckpointError` naming them, before
    any tensor is built. Weights without the spec hash or digest are refused unless
    ``allow_unverified=True``. See :func:`mixstack.hub.modeldir.load_model_dir`.
    """
    from mixstack.dsl.hubref import is_hub_ref
    from mixstack.hub.modeldir import load_model_dir
    from mixstack.interop.transformers import is_transformers_dir, load_transformers

    if is_hub_ref(path) or any(v is not None for v in (revision, token, endpoint, cache_dir)):
        from mixstack.hub.hub import from_hub

        return from_hub(
            path,
            revision=revision,
            token=token,
            endpoint=endpoint,
            cache_dir=cache_dir,
            device=device,
            dtype=dtype,
        )
    if is_transformers_dir(path):
        return load_transformers(path, device=device, dtype=dtype)
    return load_model_dir(path, device=device, dtype=dtype, allow_unverified=allow_unverified)


def export(source: Any, out: Any, *, to: str = "mixstack") -> Any:
    """Write the model of a run directory, model directory or transformers checkpoint
    folder to ``out`` as a mixstack model directory or (``to="transformers"``) a
    transformers checkpoint. See :func:`mixstack.interop.export`."""
    from mixstack.interop.export import export as _export

    return _export(source, out, to=to)  # type: ignore[arg-type]


def push(
    model_or_dir: Any,
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
) -> Any:
    """Upload a model, a model directory or a run directory's model to a Hub model
    repository in one commit (config.json, spec.yaml, weights, model card); returns a
    :class:`mixstack.hub.hub.PushResult` with the commit sha. See :func:`mixstack.hub.hub.push`.
    """
    from mixstack.hub.hub import push as _push

    return _push(
        model_or_dir,
        repo_id,
        revision=revision,
        private=private,
        commit_message=commit_message,
        token=token,
        endpoint=endpoint,
    )


def pull(
    repo_id: str,
    *,
    revision: str | None = None,
    out: Any = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
    cache_dir: Any = None,
) -> Any:
    """Download a Hub model repository (safetensors, JSON, YAML, Markdown only) and check
    it loads; ``out``: also write it there atomically. Returns a
    :class:`mixstack.hub.hub.Pulled` (local folder, resolved commit). See
    :func:`mixstack.hub.hub.pull`.
    """
    from mixstack.hub.hub import pull as _pull

    return _pull(
        repo_id, revision=revision, out=out, token=token, endpoint=endpoint, cache_dir=cache_dir
    )


__all__ = [
    "BackendError",
    "CheckpointError",
    "MixstackError",
    "ModelSpec",
    "Spec",
    "SpecError",
    "__version__",
    "build",
    "export",
    "from_pretrained",
    "load_spec",
    "pull",
    "push",
    "registry",
]
