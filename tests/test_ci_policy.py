"""The CI policy of tests/conftest.py, on a small test folder run by a child pytest:
under CI=true a skip fails unless the test is marked ``gpu``; a ``slow`` test without a
budget (or with one above 90 s) fails everywhere."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

# Two child pytest runs, started once for the module (the cost lands in the fixture).
pytestmark = pytest.mark.slow(budget_s=20)

CONFTEST = Path(__file__).with_name("conftest.py")

TESTS = """
import pytest

def test_plain():
    pass

def test_missing_package():
    pytest.importorskip("mixstack_no_such_package")

@pytest.mark.gpu
def test_gpu_only():
    pytest.skip("no CUDA device")

@pytest.mark.slow(budget_s=30)
def test_slow_with_budget():
    pass

@pytest.mark.slow
def test_slow_without_budget():
    pass

@pytest.mark.slow(budget_s=600)
def test_slow_over_the_limit():
    pass
"""
SKIPPED_MODULE = 'import pytest\n\npytest.importorskip("mixstack_no_such_package")\n'
Outcomes = dict[str, tuple[str, str]]  # test -> (outcome, message)
INI = "[pytest]\nmarkers =\n    gpu: needs a CUDA device\n    slow: longer than a few seconds\n"


def run_child(folder: Path, ci: str | None) -> Outcomes:
    """Outcome and message per test (``module.name``) of a child pytest over ``folder``."""
    folder.mkdir()
    (folder / "conftest.py").write_text(CONFTEST.read_text())
    (folder / "test_policy.py").write_text(TESTS)
    (folder / "test_skipped_module.py").write_text(SKIPPED_MODULE)
    (folder / "pytest.ini").write_text(INI)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    report = folder / "report.xml"
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--junitxml={report}"]
    command.append("--continue-on-collection-errors")  # the skipped module fails collection
    subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    outcomes = {}
    for case in ET.parse(report).iter("testcase"):
        name = f"{case.get('classname')}.{case.get('name')}"
        child = next(iter(case), None)
        outcome = "passed" if child is None else child.tag
        text = "" if child is None else f"{child.get('message', '')} {child.text or ''}"
        outcomes[name] = (outcome, text)
    return outcomes


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcomes]:
    """The child run's outcomes with CI=true and without CI."""
    root = tmp_path_factory.mktemp("policy")
    return {"ci": run_child(root / "ci", "true"), "local": run_child(root / "local", None)}


def test_skips_fail_under_ci_except_gpu(outcomes: dict[str, Outcomes]) -> None:
    got = outcomes["ci"]
    assert got["test_policy.test_plain"][0] == "passed"
    outcome, message = got["test_policy.test_missing_package"]
    assert outcome == "failure" and "only tests marked gpu may skip" in message
    assert "mixstack_no_such_package" in message
    assert got["test_policy.test_gpu_only"][0] == "skipped"
    module = [v for k, v in got.items() if "skipped_module" in k]
    assert [o for o, _ in module] == ["error"]
    assert "module skipped" in module[0][1] and "only tests marked gpu may skip" in module[0][1]


def test_skips_stay_skips_outside_ci(outcomes: dict[str, Outcomes]) -> None:
    got = outcomes["local"]
    assert got["test_policy.test_missing_package"][0] == "skipped"
    assert got["test_policy.test_gpu_only"][0] == "skipped"
    assert [o for k, (o, _) in got.items() if "skipped_module" in k] == ["skipped"]


@pytest.mark.parametrize("where", ["ci", "local"])
def test_slow_tests_state_a_budget_of_at_most_90_s(outcomes: dict[str, Outcomes], where) -> None:
    got = outcomes[where]
    assert got["test_policy.test_slow_with_budget"][0] == "passed"
    for name, shown in [("without_budget", "None"), ("over_the_limit", "600")]:
        outcome, message = got[f"test_policy.test_slow_{name}"]
        assert outcome == "error", (name, outcome)  # fails in setup, before it runs
        assert f"got budget_s={shown}" in message and "0 < budget_s <= 90" in message
