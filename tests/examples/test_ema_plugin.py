"""The worked example of docs/adding-a-mixer.md, ``examples/plugins/ema.py``, loaded the
way users load it (``load_plugin_file``, i.e. ``mixstack --plugin``).

(a) Every contract test of tests/contract that takes a layer case runs on each of the
plugin's ``examples()``, with the same parametrizations (discovered, not listed, so a
new contract check covers the plugin too); the matrix view also matches the closed form
``M[i, j] = (1 − α)·α^{i−j}`` within a document, computed here independently.
(b) The CLI validates and trains a spec that binds a symbol to ``{type: ema}``.

The registry is process-global: the plugin is registered for this module only and the
previous registry is restored afterwards.
"""

from __future__ import annotations

import importlib.util
import inspect
import itertools
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import yaml

import mixstack
from mixstack.dsl import registry
from mixstack.dsl.errors import SpecError
from mixstack.dsl.registry import LayerEntry
from mixstack.mixers.base import materialize

REPO = Path(__file__).resolve().parents[2]
PLUGIN = REPO / "examples" / "plugins" / "ema.py"
CONTRACT = REPO / "tests" / "contract"
# Contract fixtures that stand for a layer case, and whether the EMA qualifies (it is a
# causal decoding mixer with a matrix view, so only ``nodecode_case`` is out).
CASE_FIXTURES = {"case", "matrix_case", "causal_case", "decode_case"}


def _load(path: Path) -> ModuleType:
    """Import a contract file under a private name (tests/ has no packages)."""
    spec = importlib.util.spec_from_file_location(f"ema_contract_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


CONTRACT_HELPERS = _load(CONTRACT / "conftest.py")
FIXTURES: dict[str, Any] = {
    "near": CONTRACT_HELPERS.assert_near,
    "use_policy": CONTRACT_HELPERS.set_policy,
}


def _parametrizations(fn: Callable[..., None]) -> Iterator[dict[str, Any]]:
    """Every combination of the function's ``@pytest.mark.parametrize`` values."""
    axes = []
    for mark in getattr(fn, "pytestmark", []):
        if mark.name != "parametrize":
            continue
        names, values = mark.args[0], mark.args[1]
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        rows = [v if len(names) > 1 else (v,) for v in values]
        axes.append([dict(zip(names, row, strict=True)) for row in rows])
    for combo in itertools.product(*axes):
        yield {k: v for part in combo for k, v in part.items()}


def _contract_checks() -> list[Any]:
    """``pytest.param(check, kwargs)`` for every case-taking contract test and its params."""
    out = []
    for path in sorted(CONTRACT.glob("test_*.py")):
        for name, fn in vars(_load(path)).items():
            if not name.startswith("test_") or not inspect.isfunction(fn):
                continue
            first = next(iter(inspect.signature(fn).parameters), None)
            if first not in CASE_FIXTURES:
                continue
            for kwargs in _parametrizations(fn):
                label = "-".join(f"{v}" for v in kwargs.values())
                out.append(pytest.param(fn, kwargs, id=f"{path.stem}.{name}[{label}]"))
    return out


@pytest.fixture(scope="module")
def ema_entry() -> Iterator[LayerEntry]:
    with registry.scoped(), pytest.MonkeyPatch.context() as patch:
        registry.load_plugin_file(PLUGIN)
        yield registry.get("ema")
        patch.delitem(sys.modules, "mixstack_plugin_ema")


@pytest.fixture(params=["plain", "projections"])
def ema_case(request, ema_entry: LayerEntry) -> Any:
    examples = ema_entry.config_cls.examples()
    index = next(i for i, e in enumerate(examples) if e.name == request.param)
    return CONTRACT_HELPERS.LayerCase(ema_entry, examples[index], index)


def test_plugin_examples_cover_its_modes(ema_entry: LayerEntry) -> None:
    assert ema_entry.source == "mixstack_plugin_ema.EMA"
    assert sorted(e.name for e in ema_entry.config_cls.examples()) == ["plain", "projections"]


@pytest.mark.parametrize(("check", "kwargs"), _contract_checks())
def test_contract(
    ema_case, check: Callable[..., None], kwargs: dict[str, Any], tmp_path: Path
) -> None:
    needed = list(inspect.signature(check).parameters)[1:]
    available = {**FIXTURES, "tmp_path": tmp_path}
    fixtures = {n: available[n] for n in needed if n not in kwargs}  # KeyError: a new fixture
    check(ema_case, **kwargs, **fixtures)


def closed_form(alpha: torch.Tensor, seq_idx: torch.Tensor) -> torch.Tensor:
    """M (B, H, L, L) by the definition: ``(1 − α)·α^{n}`` for j <= i in the same
    document, n = non-padding positions in (j, i]; rows and columns of padding are 0."""
    bsz, length = seq_idx.shape
    M = torch.zeros(bsz, alpha.numel(), length, length, dtype=torch.float64)
    for b, i, j in itertools.product(range(bsz), range(length), range(length)):
        doc = int(seq_idx[b, i])
        if j > i or doc < 0 or int(seq_idx[b, j]) != doc:
            continue
        steps = int((seq_idx[b, j + 1 : i + 1] >= 0).sum())
        M[b, :, i, j] = (1 - alpha) * alpha**steps
    return M


def test_matrix_view_equals_closed_form(ema_entry: LayerEntry) -> None:
    case = CONTRACT_HELPERS.LayerCase(ema_entry, ema_entry.config_cls.examples()[0], 0)
    module = case.build()
    x, _ = case.inputs(2, 10)
    seq_idx = torch.tensor([[0, 0, 0, -1, 0, 1, 1, 1, 2, 2], [-1, -1, 4, 4, 4, 4, 5, 5, 5, -1]])
    for ids in (None, seq_idx):
        (M, v), *rest = materialize(module, x, seq_idx=ids)[0]
        assert not rest and M.shape == (2, case.d_model, 10, 10)
        assert torch.equal(v, x.permute(0, 2, 1)[..., None])  # no projections: v = x
        alpha = torch.sigmoid(module.decay_logit.detach())
        want = closed_form(alpha, torch.zeros(2, 10, dtype=torch.long) if ids is None else ids)
        if ids is not None:  # columns of padding multiply values the layer ignores
            M = M * (ids >= 0)[:, None, None, :]
        torch.testing.assert_close(M, want, rtol=1e-10, atol=1e-12)


def test_alpha_range_is_checked_at_load(ema_entry: LayerEntry) -> None:
    data = _spec_data()
    data["model"]["layers"]["symbols"]["E"].update(alpha_min=0.9, alpha_max=0.5)
    with pytest.raises(SpecError, match=r"symbols\.E\.alpha_max.*below alpha_min \(0\.9\)"):
        mixstack.load_spec(data)


# -- (b) the command line ----------------------------------------------------------------


def _spec_data() -> dict[str, Any]:
    return {
        "model": {
            "vocab_size": 16,
            "max_seq_len": 32,
            "d_model": 16,
            "layers": {
                "pattern": "E-E-",
                "symbols": {
                    "E": {"type": "ema", "projections": True},
                    "-": {"type": "mlp", "hidden": 32},
                },
            },
        },
        "train": {
            "task": {"type": "mqar", "n_pairs": 2, "seq_len": 16, "val_size": 16},
            "max_steps": 4,
            "batch_size": 8,
            "val_every": 2,
            "log_every": 1,
        },
    }


def _mixstack(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``mixstack ARGS`` in a child process, as a user would run it."""
    command = [sys.executable, "-m", "mixstack.cli.main", *args]
    # Not the plugin list of this process's scoped registry: the child starts clean.
    unset = ("RANK", "LOCAL_RANK", "WORLD_SIZE", registry.PLUGINS_ENV)
    env = {k: v for k, v in os.environ.items() if k not in unset}
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.mark.slow(budget_s=30)
def test_cli_validates_and_trains_with_the_plugin(tmp_path: Path) -> None:
    spec = tmp_path / "ema.yaml"
    spec.write_text(yaml.safe_dump(_spec_data()))
    done = _mixstack("validate", str(spec), cwd=tmp_path)
    assert done.returncode == 1 and "unknown layer type 'ema'" in done.stderr
    done = _mixstack("--plugin", str(PLUGIN), "validate", str(spec), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ok" in done.stdout and "E-E-" in done.stdout
    out = tmp_path / "run"
    done = _mixstack("--plugin", str(PLUGIN), "train", str(spec), "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mixstack train: finished" in done.stdout and "4 / 4" in done.stdout
    saved = yaml.safe_load((out / "model" / "spec.yaml").read_text())
    assert saved["model"]["layers"]["symbols"]["E"]["type"] == "ema"
