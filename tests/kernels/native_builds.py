"""Builds of the native sources for no particular CPU, for the tests that check what a
machine without AVX-512 (or without x86 at all) runs: 4-lane vectors, the exp without
vscalefps; -O1 keeps a build under a second."""

from __future__ import annotations

import ctypes
import subprocess
from pathlib import Path

from mixstack.kernels import native

PORTABLE_FLAGS = ("-O1", "-std=c11", "-shared", "-fPIC", "-fno-math-errno", "-fopenmp-simd")


def portable_build(name: str, folder: Path) -> ctypes.CDLL:
    """``csrc/{name}.c`` compiled with :data:`PORTABLE_FLAGS` into ``folder``, loaded."""
    target = folder / f"{name}_portable.so"
    source = native.SOURCE_DIR / f"{name}.c"
    cc = native._compiler()
    assert cc is not None, "no C compiler"
    subprocess.run(
        [cc, *PORTABLE_FLAGS, "-o", str(target), str(source), "-lm"],
        check=True,
        capture_output=True,
    )
    return ctypes.CDLL(str(target))
