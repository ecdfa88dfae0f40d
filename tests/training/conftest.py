"""Shared pieces of the training tests: a tiny MQAR spec and one finished run of it."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import mixstack
from mixstack.dsl.spec import Spec

TINY: dict[str, Any] = {
    "model": {
        "vocab_size": 16,
        "max_seq_len": 32,
        "d_model": 16,
        "dropout": 0.1,
        "layers": {
            "pattern": "*-",
            "symbols": {
                "*": {"type": "attention", "n_heads": 2},
                "-": {"type": "mlp", "hidden": 32},
            },
        },
    },
    "train": {
        "task": {"type": "mqar", "n_pairs": 2, "seq_len": 16, "val_size": 24},
        "optimizer": {"type": "adamw", "lr": 0.01},
        "schedule": {"type": "cosine", "warmup_steps": 0},
        "max_steps": 6,
        "batch_size": 8,
        "accumulate_grad_batches": 2,
        "val_every": 3,
        "log_every": 1,
        "seed": 3,
    },
}


def _tiny_spec(*overrides: str) -> Spec:
    return mixstack.load_spec(copy.deepcopy(TINY), overrides)


def _fit_quietly(spec: Spec, out: Path, **kwargs: Any) -> Any:
    from mixstack.training.run import fit

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*(num_workers|LeafSpec|does not have many).*")
        return fit(spec, out, progress=False, **kwargs)


@pytest.fixture(scope="session")
def tiny_spec() -> Callable[..., Spec]:
    """``tiny_spec(*overrides)``: the TINY spec, validated, with overrides applied."""
    return _tiny_spec


@pytest.fixture
def tiny_data() -> dict[str, Any]:
    """A fresh copy of the TINY spec as plain data."""
    return copy.deepcopy(TINY)


@pytest.fixture(scope="session")
def fit_quietly() -> Callable[..., Any]:
    """``fit`` without the progress bar and Lightning's advice warnings."""
    return _fit_quietly


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One uninterrupted 6-step run of TINY (dropout and accumulation on)."""
    return _fit_quietly(_tiny_spec(), tmp_path_factory.mktemp("runs") / "tiny")
