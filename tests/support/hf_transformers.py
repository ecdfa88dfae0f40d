"""Importing transformers next to a checkout whose root is the mixstack package (one
helper for every test that compares against transformers: interop, benchmarks).

``python -m pytest`` run from the repository root puts the root on ``sys.path``, where
our ``kernels/`` folder then shadows the Hugging Face ``kernels`` distribution that
transformers probes for (``from kernels import CUDAProperties`` fails). The modules that
probe are imported here once with the root left out of ``sys.path``.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]  # tests/support/ -> the checkout
MODELING = [
    "transformers.integrations.hub_kernels",
    *(f"transformers.models.{m}.modeling_{m}" for m in ("llama", "mamba", "mamba2", "bamba")),
    "transformers.models.nemotron_h.modeling_nemotron_h",
]


def _is_root(entry: str) -> bool:
    try:
        return Path(entry or ".").resolve() == ROOT
    except OSError:
        return False


def import_transformers() -> ModuleType:
    saved = list(sys.path)
    shadow = sys.modules.get("kernels")
    sys.path[:] = [p for p in sys.path if not _is_root(p)]
    try:
        if (
            shadow is not None
            and Path(getattr(shadow, "__file__", "") or "").parent == ROOT / "kernels"
        ):
            del sys.modules["kernels"]
        module = pytest.importorskip("transformers")
        for name in MODELING:
            importlib.import_module(name)
        return module
    finally:
        sys.path[:] = saved
