"""mixstack's compiled CPU kernels: the ``native`` provider (docs/performance.md).

The C sources live in ``kernels/csrc/``, one file per kernel family (``common.h``
holds what they share), written against the plain C11 standard library (no torch
headers: a build takes about a second). On
first use a source is compiled with the system C compiler (``$CC``, else ``cc``,
``gcc`` or ``clang``) for this CPU (``-march=native``, retried without it) into a
per-user cache, ``$MIXSTACK_NATIVE_CACHE`` or ``~/.cache/mixstack/native``, under a
name that hashes the sources, the flags, the compiler's version and the CPU; the
library is loaded with :mod:`ctypes`. A machine without a compiler, or with
``MIXSTACK_NATIVE=0`` in the environment, simply has no ``native`` provider (the
reason is what :func:`unavailable` returns, and what ``auto`` logs when it passes it
over), so every caller keeps the ``torch`` path.

Threads: a C entry point takes a range ``[lo, hi)`` of independent work units;
:func:`run_units` splits the units over ``torch.get_num_threads()`` Python threads.
ctypes releases the GIL for the call, so the pieces run in parallel, and the result
never depends on the thread count (each unit is computed by one thread, in one order).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import itertools
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).with_name("csrc")
ENV_CACHE = "MIXSTACK_NATIVE_CACHE"
ENV_SWITCH = "MIXSTACK_NATIVE"  # "0": no native provider
INSTALL_HINT = "needs a C compiler (cc, gcc or clang, or $CC); see docs/performance.md"
# -fno-math-errno lets math calls vectorize; no -ffast-math: the kernels
# rely on IEEE comparisons and infinities.
BASE_FLAGS = (
    "-O3",
    "-std=c11",
    "-shared",
    "-fPIC",
    "-fno-math-errno",
    "-ffp-contract=fast",  # fused multiply-adds (ISO C mode turns them off by default)
    "-fopenmp-simd",
)
# Tried in order: this CPU's full instruction set (with 512-bit vectors where it has
# them), then its instruction set alone (a compiler or CPU without that option), then
# portable code.
ARCH_FLAGS = (("-march=native", "-mprefer-vector-width=512"), ("-march=native",), ())


class NativeUnavailable(RuntimeError):
    """The native library cannot be built or loaded here; the message says why."""


def _compiler() -> str | None:
    return os.environ.get("CC") or next(
        (found for name in ("cc", "gcc", "clang") if (found := shutil.which(name))), None
    )


def _cpu_identity() -> str:
    """What ``-march=native`` depends on: the CPU's model and flags where Linux says so."""
    try:
        info = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    keep = [line for line in info if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(keep))) or platform.machine()


def cache_dir() -> Path:
    root = os.environ.get(ENV_CACHE)
    return Path(root) if root else Path.home() / ".cache" / "mixstack" / "native"


def _compile(cc: str, source: Path, target: Path) -> None:
    """Build ``source`` into ``target`` atomically (a temporary file, then a rename):
    concurrent first uses (test workers) never load a half-written library."""
    errors = []
    for arch in ARCH_FLAGS:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
        except OSError as err:
            raise NativeUnavailable(
                f"cannot write the build cache {target.parent} ({err}); point "
                f"{ENV_CACHE} at a writable folder"
            ) from err
        os.close(fd)
        cmd = [cc, *BASE_FLAGS, *arch, "-o", tmp, str(source), "-lm"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as err:
            done = None
            errors.append(f"{' '.join(cmd)}: {err}")
        if done is not None and done.returncode == 0:
            os.replace(tmp, target)
            return
        if done is not None:
            errors.append(f"{' '.join(cmd)}: {done.stderr.strip()[-800:]}")
        Path(tmp).unlink(missing_ok=True)
    raise NativeUnavailable(f"compiling {source.name} failed: " + " | ".join(errors))


def load(name: str) -> ctypes.CDLL:
    """The compiled library of ``csrc/{name}.c`` (built on first use, then cached).

    Raises :class:`NativeUnavailable` saying why when it cannot be had here.
    """
    if os.environ.get(ENV_SWITCH, "1") == "0":
        raise NativeUnavailable(f"disabled by {ENV_SWITCH}=0")
    return _build_and_load(name)


@functools.cache
def _build_and_load(name: str) -> ctypes.CDLL:
    source = SOURCE_DIR / f"{name}.c"
    if not source.is_file():
        raise NativeUnavailable(f"the source {source} is not installed")
    cc = _compiler()
    if cc is None:
        raise NativeUnavailable("no C compiler found (set CC, or install cc, gcc or clang)")
    try:
        version = subprocess.run(
            [cc, "--version"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as err:
        raise NativeUnavailable(f"the C compiler {cc} does not run: {err}") from err
    headers = [h.read_text() for h in sorted(SOURCE_DIR.glob("*.h"))]  # included by sources
    flags = repr((BASE_FLAGS, ARCH_FLAGS))
    parts = [source.read_text(), *headers, flags, cc, version, _cpu_identity()]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    target = cache_dir() / f"{name}-{key}.so"
    if not target.is_file():
        log.info("building the native kernels %s with %s into %s", name, cc, target)
        _compile(cc, source, target)
    try:
        return ctypes.CDLL(str(target))
    except OSError as err:
        raise NativeUnavailable(f"loading {target} failed: {err}") from err


def declare(lib: ctypes.CDLL, argtypes: dict[str, list[Any]]) -> ctypes.CDLL:
    """Set each named entry point's argument types; every entry point of the native
    sources returns an ``int`` (0, or nonzero when its scratch allocation failed)."""
    for name, types in argtypes.items():
        fn = getattr(lib, name)
        fn.argtypes = types
        fn.restype = ctypes.c_int
    return lib


def unavailable(name: str) -> str | None:
    """Why the library ``name`` cannot be used here (None: it can)."""
    try:
        load(name)
    except NativeUnavailable as err:
        return str(err)
    return None


def applies(device: torch.device, dtype: torch.dtype) -> str | None:
    """Where the native kernels run: float32 on the CPU (bf16 and fp16 inputs compute in
    float32; float64, the exact tests' dtype, stays on the torch path)."""
    if device.type != "cpu":
        return f"CPU only, not {device.type}"
    return "float64 runs on the torch path" if dtype == torch.float64 else None


def register(kernel: str, library: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``register_backend(kernel, "native", ...)`` for a backend built on
    ``csrc/{library}.c``; under ``torch.compile`` the backend is an opaque step
    (``torch.compiler.disable``: no tracing into ctypes, the graph resumes after it)."""
    from mixstack.kernels.backends import register_backend

    register = register_backend(
        kernel,
        "native",
        available=lambda: unavailable(library),
        applies=applies,
        install_hint=INSTALL_HINT,
    )

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        return register(torch.compiler.disable(fn))

    return decorate


def pointer(t: Tensor | None) -> ctypes.c_void_p:
    """The data pointer of a contiguous CPU tensor (NULL for None)."""
    if t is None:
        return ctypes.c_void_p(None)
    if not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError(f"native kernels take contiguous CPU tensors, got {t.device} {t.stride()}")
    return ctypes.c_void_p(t.data_ptr())


@functools.cache
def _pool(workers: int, pid: int) -> ThreadPoolExecutor:
    """A pool per process: a forked child inherits the parent's pool object but not its
    threads, and would wait forever on work handed to it."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mixstack-native")


def run_units(fn: Callable[..., int], units: int, *args: object) -> None:
    """Call ``fn(lo, hi, *args)`` over ``[0, units)`` cut into one contiguous range per
    thread (``torch.get_num_threads()``, at most one per unit); returns when all are done.
    A nonzero return (the C code's scratch allocation failed) raises ``MemoryError``."""
    workers = max(1, min(torch.get_num_threads(), units))
    if workers == 1:
        codes = [fn(0, units, *args)]
    else:
        bounds = [units * k // workers for k in range(workers + 1)]
        pool = _pool(workers, os.getpid())
        codes = [
            future.result()
            for future in [pool.submit(fn, lo, hi, *args) for lo, hi in itertools.pairwise(bounds)]
        ]
    if any(codes):
        raise MemoryError(f"native kernel {getattr(fn, '__name__', fn)}: out of memory")
