"""pyproject's explicit package list must cover every package directory of the checkout.

The repository root is the package (``package-dir = {"mixstack" = "."}``), so setuptools
cannot discover sub-packages: one left out of the list installs fine from the checkout
(editable) and is missing from the wheel. CI also installs the wheel; this catches it
before.
"""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parent.parent
NOT_SHIPPED = {"tests", "build", "dist"}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _package_dirs() -> set[str]:
    found = {"mixstack"}
    for init in ROOT.rglob("__init__.py"):
        rel = init.parent.relative_to(ROOT)
        if rel.parts and (
            rel.parts[0] in NOT_SHIPPED
            or any(p.startswith(".") or p.endswith(".egg-info") for p in rel.parts)
        ):
            continue
        if rel.parts:
            found.add(".".join(("mixstack", *rel.parts)))
    return found


def test_every_package_directory_is_listed() -> None:
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    missing = _package_dirs() - listed
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(missing)}"


def test_every_listed_package_exists() -> None:
    for name in _pyproject()["tool"]["setuptools"]["packages"]:
        folder = ROOT.joinpath(*name.split(".")[1:])
        assert (folder / "__init__.py").is_file(), (
            f"{name} is listed but {folder} has no __init__.py"
        )


def test_zoo_presets_are_package_data_and_the_cli_is_the_entry_point() -> None:
    config = _pyproject()
    assert "*.yaml" in config["tool"]["setuptools"]["package-data"]["mixstack.zoo"]
    assert config["project"]["scripts"]["mixstack"] == "mixstack.cli.main:main"
    assert config["tool"]["setuptools"]["package-dir"] == {"mixstack": "."}
    assert list((ROOT / "zoo").glob("*.yaml")), "zoo/ holds no preset"
