"""The run section: backend, logger and the other run fields; activation-checkpointing
selectors checked against the model's layers."""

from __future__ import annotations

from typing import Any

from mixstack.dsl.spec import LOGGER_TYPES, CSVLoggerConfig, ModelSpec, RunSpec
from mixstack.dsl.validate.common import Checker
from mixstack.dsl.validate.overrides import layer_selectors


def run_section(ck: Checker, data: Any) -> RunSpec | None:
    """The run section (defaults when absent); ``backend`` is a name or a mapping."""
    path = ("run",)
    if data is None:
        return RunSpec()
    if not isinstance(data, dict):
        ck.add("run must be a mapping", path, value=data, allowed="a mapping")
        return None
    backend = data.get("backend", "auto")
    if not (
        isinstance(backend, str)
        or (
            isinstance(backend, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in backend.items())
        )
    ):
        ck.add(
            "invalid backend",
            (*path, "backend"),
            value=backend,
            allowed="auto, a provider name, or a {kernel: provider} mapping of strings",
        )
        return None
    logger = ck.tagged(data.get("logger"), (*path, "logger"), LOGGER_TYPES, "csv")
    run = ck.pydantic(RunSpec, {**data, "logger": logger or CSVLoggerConfig()}, path)
    return run if logger is not None else None


def run_against(ck: Checker, run: RunSpec, model: ModelSpec) -> None:
    """Activation-checkpointing selectors must name layers of the model."""
    selectors = run.activation_checkpointing
    if isinstance(selectors, list):
        layer_selectors(ck, selectors, ("run", "activation_checkpointing"), model.n_layers)
