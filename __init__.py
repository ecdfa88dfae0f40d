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


def load_spec(source: Any, overrides: Sequence[str] = ()) -> Spec:
    """Load and validate a spec: a YAML path, ``zoo:NAME``, a dict or a ``Spec``.

    See :func:`mixstack.dsl.loader.load_spec`.
    """
    from mixstack.dsl.loader import load_spec as _load_spec

    return _load_spec(source, overrides=overrides)


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


def from_pretrained(
    path: Any,
    *,
    device: Any = None,
    dtype: Any = None,
    allow_unverified: bool = False,
) -> MixStackModel:
    """Load a local model directory (``config.json``, ``spec.yaml``, ``model.safetensors``
    or shards with ``model.safetensors.index.json``).

    Safetensors only, strict: a missing, unexpected, mis-shaped or non-float tensor, a
    spec-hash or data-digest mismatch, NaN / inf weights or ``config.json`` / ``spec.yaml``
    disagreeing raise :class:`~mixstack.dsl.errors.CheckpointError` naming them, before
    any tensor is built. Weights without the spec hash or digest are refused unless
    ``allow_unverified=True``. See :func:`mixstack.hub.modeldir.load_model_dir`.
    """
    from mixstack.hub.modeldir import load_model_dir

    return load_model_dir(path, device=device, dtype=dtype, allow_unverified=allow_unverified)


__all__ = [
    "BackendError",
    "CheckpointError",
    "MixstackError",
    "ModelSpec",
    "Spec",
    "SpecError",
    "__version__",
    "build",
    "from_pretrained",
    "load_spec",
    "registry",
]
