"""The ``native`` provider: compiled C kernels (kernels/native.py, kernels/csrc/).

Numbers: the native SSD scan (fp32) against the step-by-step recurrence in fp64 on
outputs, final states and every gradient, at sizes that reach every code path of the C
(full 64-float tiles and partial ones, row blocks of 4 and their remainder, padding to
whole chunks, groups, D per head and per channel, initial and final states, packed
documents); results independent of the thread count. Building: where the library is
cached, that a missing or failing compiler leaves a provider that says why (and an
``auto`` policy on the torch path), and the switch that turns it off.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from mixstack.dsl.errors import BackendError
from mixstack.kernels import backends as kb
from mixstack.kernels import gated_norm, native, ssd
from tests.kernels.test_ssd import make_inputs, run_with_grads

CPU = torch.device("cpu")

needs_native = pytest.mark.skipif(
    native.unavailable("ssd") is not None, reason=f"no native kernels: {native.unavailable('ssd')}"
)


def assert_near_fp64(fast, ref, rel: float = 2e-5) -> None:
    """fp32 results within ``rel`` of the fp64 ones, relative to each tensor's scale."""
    pairs = [("y", fast[0], ref[0]), ("final", fast[1], ref[1])]
    pairs += [(f"d{k}", fast[2][k], ref[2][k]) for k in ref[2]]
    for name, a, b in pairs:
        assert a.dtype == torch.float32, name
        scale = b.abs().max().item()
        err = (a.double() - b).abs().max().item()
        assert err <= rel * scale + 1e-6, f"{name}: {err:.3g} off fp64 (scale {scale:.3g})"


# (bsz, length, heads, hdim, groups, nstate), chunk, D, initial
SHAPES = [
    ((2, 100, 4, 85, 2, 20), 37, "channel", True),  # tiles 64 + 21, rows 37 = 9·4 + 1, padding
    ((1, 128, 2, 64, 1, 64), 32, "head", False),  # whole tiles everywhere
    ((2, 45, 6, 16, 3, 8), 64, None, True),  # L < chunk: one short chunk
    ((1, 7, 1, 3, 1, 5), 4, "head", True),  # everything smaller than a vector
]


@needs_native
@pytest.mark.parametrize(("dims", "chunk", "D", "initial"), SHAPES)
def test_native_scan_matches_the_recurrence_in_fp64(dims, chunk, D, initial):
    inputs64 = make_inputs(11, *dims, D=D, initial=initial)
    inputs32 = {k: v.detach().float().requires_grad_(True) for k, v in inputs64.items()}
    ref = run_with_grads(ssd.ssd_scan_reference, inputs64, chunk)
    fast = run_with_grads(ssd.ssd_scan_native, inputs32, chunk)
    assert_near_fp64(fast, ref)


@needs_native
@pytest.mark.parametrize("chunk", [16, 64])
def test_native_diagonal_with_packed_documents_matches_the_recurrence(chunk, random_packing):
    inputs64 = make_inputs(12, 2, 90, 2, 70, 1, 8, D="head", initial=True)
    inputs32 = {k: v.detach().float().requires_grad_(True) for k, v in inputs64.items()}
    packing = {"seq_idx": random_packing(90, seed=5)}
    ref = run_with_grads(ssd.ssd_scan_reference, inputs64, chunk, **packing)
    fast = run_with_grads(ssd.ssd_scan_native, inputs32, chunk, **packing)
    assert_near_fp64(fast, ref)


@needs_native
def test_results_do_not_depend_on_the_thread_count():
    inputs = make_inputs(13, 2, 96, 4, 64, 2, 16, D="head", initial=True, dtype=torch.float32)
    threads = torch.get_num_threads()
    try:
        runs = []
        for count in (1, 3):
            torch.set_num_threads(count)
            for t in inputs.values():
                t.grad = None
            runs.append(run_with_grads(ssd.ssd_scan_native, inputs, 32))
    finally:
        torch.set_num_threads(threads)
    (y1, s1, g1), (y3, s3, g3) = runs
    assert torch.equal(y1, y3) and torch.equal(s1, s3)
    for name in g1:
        assert torch.equal(g1[name], g3[name]), name


@needs_native
def test_large_decays_stay_finite_and_correct():
    """Δ up to 60 with A = −16: every exp in the C code underflows to 0, none is NaN."""
    g = torch.Generator().manual_seed(0)
    inp = ssd.random_inputs(g, 1, 300, 2, 4, 1, 4)
    inp["dt"] = torch.empty(1, 300, 2).uniform_(5.0, 60.0, generator=g)
    inp["A"] = torch.tensor([-1.0, -16.0])
    inputs32 = {k: v.requires_grad_(True) for k, v in inp.items()}
    inputs64 = {k: v.detach().double().requires_grad_(True) for k, v in inp.items()}
    fast = run_with_grads(ssd.ssd_scan_native, inputs32, 128)
    ref = run_with_grads(ssd.ssd_scan_reference, inputs64, 128)
    for t in [fast[0], fast[1], *fast[2].values()]:
        assert torch.isfinite(t).all()
    assert_near_fp64(fast, ref)


@needs_native
def test_auto_picks_native_on_the_cpu_in_fp32_and_torch_in_fp64():
    policy = kb.BackendPolicy("auto")
    assert policy.resolve("ssd_scan", CPU, torch.float32).provider == "native"
    assert policy.resolve("ssd_scan", CPU, torch.float64).provider == "torch"
    with pytest.raises(BackendError, match="float64 runs on the torch path"):
        kb.BackendPolicy("native").resolve("ssd_scan", CPU, torch.float64)


# -- building -----------------------------------------------------------------------------


@pytest.fixture
def fresh_build(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """An empty cache folder and no library loaded yet (restored afterwards)."""
    monkeypatch.setenv(native.ENV_CACHE, str(tmp_path / "cache"))
    native._build_and_load.cache_clear()
    yield tmp_path / "cache"
    native._build_and_load.cache_clear()


def test_switched_off_by_the_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    assert native.unavailable("ssd") == "disabled by MIXSTACK_NATIVE=0"
    assert kb.BackendPolicy("auto").resolve("ssd_scan", CPU, torch.float32).provider == "torch"
    with pytest.raises(BackendError, match=r"'native' for kernel 'ssd_scan' cannot run.*disabled"):
        kb.BackendPolicy("native").resolve("ssd_scan", CPU, torch.float32)


@needs_native
def test_the_build_is_cached_by_content_and_written_atomically(fresh_build: Path):
    native.load("ssd")
    built = sorted(fresh_build.iterdir())
    assert [p.suffix for p in built] == [".so"] and built[0].name.startswith("ssd-")
    stamp = built[0].stat().st_mtime_ns
    native._build_and_load.cache_clear()
    native.load("ssd")  # a second process: found in the cache, not rebuilt
    assert sorted(fresh_build.iterdir()) == built and built[0].stat().st_mtime_ns == stamp


def test_no_compiler_leaves_the_torch_path_and_says_why(
    fresh_build: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("CC", str(fresh_build.parent / "missing-cc"))
    reason = native.unavailable("ssd")
    assert reason is not None and "missing-cc" in reason and "does not run" in reason
    assert kb.BackendPolicy("auto").resolve("ssd_scan", CPU, torch.float32).provider == "torch"
    with pytest.raises(BackendError, match="needs a C compiler"):
        kb.BackendPolicy("native").resolve("ssd_scan", CPU, torch.float32)


def test_a_failing_compiler_is_reported_with_its_message(
    fresh_build: Path, monkeypatch: pytest.MonkeyPatch
):
    cc = fresh_build.parent / "bad-cc"
    cc.write_text(
        '#!/bin/sh\nif [ "$1" = --version ]; then echo "bad-cc 1.0"; exit 0; fi\n'
        'echo "bad-cc: error: no room at the inn" >&2\nexit 1\n'
    )
    cc.chmod(cc.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("CC", str(cc))
    reason = native.unavailable("ssd")
    assert reason is not None
    assert reason.startswith("compiling ssd.c failed") and "no room at the inn" in reason
    # every attempt (with and without the CPU's own instruction set) was tried, and no
    # half-written library is left behind
    assert reason.count("no room at the inn") == len(native.ARCH_FLAGS)
    assert not fresh_build.exists() or not os.listdir(fresh_build)


def test_a_kernel_without_source_is_unavailable():
    assert native.unavailable("no_such_kernel") == (
        f"the source {native.SOURCE_DIR / 'no_such_kernel.c'} is not installed"
    )


# -- gated RMSNorm --------------------------------------------------------------------------


@needs_native
@pytest.mark.parametrize(("width", "group", "before"), [(1024, 1024, False), (200, 40, True)])
@pytest.mark.parametrize("gated", [True, False])
def test_native_gated_norm_matches_fp64(width, group, before, gated):
    g = torch.Generator().manual_seed(width + group)
    y64 = torch.randn(3, 50, width, generator=g, dtype=torch.float64)
    z64 = 3 * torch.randn(3, 50, width, generator=g, dtype=torch.float64) if gated else None
    w64 = 1 + 0.3 * torch.randn(width, generator=g, dtype=torch.float64)
    cot = torch.randn(3, 50, width, generator=g, dtype=torch.float64)
    kw = {"group_size": group, "eps": 1e-5, "norm_before_gate": before}

    def run(fn, y, z, w):
        leaves = [t.detach().clone().requires_grad_() for t in (y, w) + ((z,) if gated else ())]
        out = fn(leaves[0], leaves[2] if gated else None, leaves[1], **kw)
        grads = torch.autograd.grad((out * cot.to(out.dtype)).sum(), leaves)
        return [out, *grads]

    want = run(gated_norm.gated_rms_norm_plain, y64, z64, w64)
    got = run(
        gated_norm.gated_rms_norm_native, y64.float(), z64.float() if gated else None, w64.float()
    )
    for name, a, b in zip(["out", "dy", "dw", "dz"], got, want, strict=False):
        assert a.dtype == torch.float32
        err = (a.double() - b).abs().max().item()
        assert err <= 1e-5 * b.abs().max().item(), f"{name}: {err:.3g}"


@needs_native
@pytest.mark.slow(budget_s=60)
def test_torch_compile_runs_the_native_kernels_as_opaque_steps():
    """Under torch.compile the native kernels (scan, conv, norm) are left out of the
    graph (no tracing into ctypes) and the compiled layer computes what the eager one
    does, gradients too."""
    from mixstack.dsl.context import LayerContext
    from mixstack.mixers.mamba2 import Mamba2, Mamba2Config

    torch.manual_seed(0)
    layer = Mamba2(Mamba2Config(d_state=16, headdim=16, chunk_size=16), LayerContext(d_model=32))
    x = torch.randn(2, 40, 32, requires_grad=True)
    eager = layer(x)
    (g_eager,) = torch.autograd.grad(eager.square().sum(), x)
    compiled = torch.compile(layer)(x)
    (g_compiled,) = torch.autograd.grad(compiled.square().sum(), x)
    # inductor fuses the torch ops around the scan: fp32 rounding differs, nothing more
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g_compiled, g_eager, rtol=1e-4, atol=1e-5)
    resolved = layer.backends.resolved()
    for kernel in ("ssd_scan", "causal_conv1d", "gated_rms_norm"):
        assert resolved[f"{kernel}@cpu/float32"] == "native", kernel


@needs_native
def test_a_forked_child_runs_native_kernels_with_its_own_threads():
    """A child forked after the parent used its thread pool gets a pool of its own (the
    inherited one has no threads and would hang)."""
    import multiprocessing

    inputs = {
        k: v.detach() for k, v in make_inputs(14, 1, 64, 4, 16, 1, 8, dtype=torch.float32).items()
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        want = ssd.ssd_scan_native(**inputs, chunk_size=16)  # the parent's pool now exists
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(1) as pool:
            got = pool.apply_async(_scan_in_child, (inputs,)).get(timeout=60)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got, want)


def _scan_in_child(inputs: dict) -> torch.Tensor:
    torch.set_num_threads(2)
    return ssd.ssd_scan_native(**inputs, chunk_size=16)


@pytest.fixture
def build_for(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """``build_for(flags)``: the native libraries rebuilt with ``flags`` only (in a fresh
    cache), as on a CPU with that instruction set; the usual build afterwards."""

    def clear() -> None:
        for cached in (native._build_and_load, ssd._ssd_library, gated_norm._norm_library):
            cached.cache_clear()

    def build(flags: tuple[str, ...]) -> None:
        monkeypatch.setattr(native, "ARCH_FLAGS", (flags,))
        monkeypatch.setenv(native.ENV_CACHE, str(tmp_path / "-".join(flags)))
        clear()

    yield build
    clear()


# AVX2 (8 lanes) and SSE2 (4 lanes) on x86-64; elsewhere the build without -march
NARROWER = [("-march=x86-64-v3",), ("-march=x86-64",)] if os.uname().machine == "x86_64" else [()]


@needs_native
@pytest.mark.parametrize("flags", NARROWER)
def test_narrower_vector_builds_compute_the_same(build_for, flags):
    """Builds of the same sources for older instruction sets: scan and norm against
    fp64, where the machine's own build uses its widest vectors."""
    build_for(flags)
    test_native_scan_matches_the_recurrence_in_fp64(*SHAPES[0])
    test_native_gated_norm_matches_fp64(200, 40, True, True)


def test_an_unwritable_cache_says_where_and_what_to_set(
    fresh_build: Path, monkeypatch: pytest.MonkeyPatch
):
    blocker = fresh_build.parent / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(native.ENV_CACHE, str(blocker / "cache"))
    reason = native.unavailable("ssd")
    assert reason is not None
    assert f"cannot write the build cache {blocker / 'cache'}" in reason
    assert "MIXSTACK_NATIVE_CACHE" in reason
    assert blocker.read_text() == "not a folder"
