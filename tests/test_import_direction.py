"""Imports point down the layers: no lower layer imports the root package, and no mixer
module imports another mixer module.

The root package (``mixstack/__init__.py``) is the public API over everything; a
module under it importing it back ties the layers in a cycle (and makes the builder
depend on what the API re-exports). Mixers share code through ``mixers/base.py``,
``blocks/`` and ``kernels/``, never through each other, so one can be removed or
replaced alone. Both rules are checked on the source (ast), not by importing it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LOWER_LAYERS = ("dsl", "kernels", "blocks", "mixers", "archs", "tasks", "training", "hub")


def module_name(path: Path) -> str:
    """``ROOT/mixers/hydra.py`` -> ``mixstack.mixers.hydra`` (a package: its ``__init__``)."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(("mixstack", *(parts[:-1] if parts[-1] == "__init__" else parts)))


def imported_modules(source: str, module: str, is_package: bool = False) -> list[tuple[str, str]]:
    """(absolute module, import as written) for every import in ``source``, the text of
    ``module``; ``from a import b`` gives ``a`` and ``a.b`` (``b`` may be a module)."""
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(alias.name, f"import {alias.name}") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: up (level - 1) packages from this one
                anchor = package.split(".")[: package.count(".") + 2 - node.level]
                base = ".".join([*anchor, *([base] if base else [])])
            names = [alias.name for alias in node.names]
            written = f"from {base} import {', '.join(names)}"
            out += [(base, written), *((f"{base}.{name}", written) for name in names)]
    return out


def root_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    """The imports in ``source`` of the root package or of a name from it."""
    found = imported_modules(source, module, is_package)
    return list(dict.fromkeys(written for target, written in found if target == "mixstack"))


def _sources(*folders: str) -> list[tuple[Path, str]]:
    files = sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))
    return [(p, p.read_text(encoding="utf-8")) for p in files]


def _defines_a_mixer(source: str) -> bool:
    """A ``Mixer`` subclass at top level (``mixers/base.py`` defines ``Mixer`` itself)."""
    return any(
        isinstance(node, ast.ClassDef)
        and any(isinstance(base, ast.Name) and base.id == "Mixer" for base in node.bases)
        for node in ast.parse(source).body
    )


def sibling_mixer_imports(source: str, module: str, mixer_modules: set[str]) -> set[str]:
    """The other mixer modules that ``source`` (of ``module``) imports."""
    targets = {target for target, _ in imported_modules(source, module)}
    return (targets & mixer_modules) - {module}


def test_no_lower_layer_imports_the_root_package() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}: {line}"
        for path, source in _sources(*LOWER_LAYERS)
        for line in root_imports(source, module_name(path), path.name == "__init__.py")
    ]
    assert not offenders, (
        "import from the submodule that defines it (e.g. mixstack.dsl.loader.load_spec, "
        "mixstack._version.__version__), not from the root package:\n" + "\n".join(offenders)
    )


def test_no_mixer_imports_another_mixer() -> None:
    sources = {module_name(p): s for p, s in _sources("mixers") if p.name != "__init__.py"}
    mixers = {name for name, source in sources.items() if _defines_a_mixer(source)}
    assert {"mixstack.mixers.attention", "mixstack.mixers.mamba2"} <= mixers
    assert "mixstack.mixers.base" not in mixers
    offenders = sorted(
        (name, target)
        for name, source in sources.items()
        for target in sibling_mixer_imports(source, name, mixers)
    )
    assert not offenders, "mixers share code through mixers/base.py, blocks/ or kernels/: " + (
        ", ".join(f"{name} imports {target}" for name, target in offenders)
    )


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import mixstack\n", ["import mixstack"]),
        ("import mixstack as ms\n", ["import mixstack"]),
        ("from mixstack import load_spec, build\n", ["from mixstack import load_spec, build"]),
        ("from .. import load_spec\n", ["from mixstack import load_spec"]),
        ("def f():\n    from mixstack import __version__\n", ["from mixstack import __version__"]),
        ("from mixstack.dsl.loader import load_spec\nimport mixstack.zoo\n", []),
        ("from . import spec\nfrom .errors import SpecError\n", []),
    ],
)
def test_root_imports_are_found_in_every_form(source: str, expected: list[str]) -> None:
    assert root_imports(source, "mixstack.dsl.loader") == expected


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from mixstack.mixers.mamba2 import check_heads\n", {"mixstack.mixers.mamba2"}),
        ("from mixstack.mixers import mamba2, base\n", {"mixstack.mixers.mamba2"}),
        ("from .mamba2 import Mamba2Config\n", {"mixstack.mixers.mamba2"}),
        ("import mixstack.mixers.attention as attn\n", {"mixstack.mixers.attention"}),
        ("from .base import Mixer\nfrom .hydra import HydraConfig\n", set()),  # own module
    ],
)
def test_sibling_mixer_imports_are_found_in_every_form(source: str, expected: set[str]) -> None:
    mixers = {"mixstack.mixers.mamba2", "mixstack.mixers.attention", "mixstack.mixers.hydra"}
    assert sibling_mixer_imports(source, "mixstack.mixers.hydra", mixers) == expected
