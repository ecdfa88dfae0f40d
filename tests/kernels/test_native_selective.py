"""The ``native`` selective scan (``kernels/csrc/selective.c``) against the step-by-step
``reference`` backend run in float64, the arbiter: y, the final state and every
gradient (u, delta, A, B, C, D, z, initial_state), at shapes that reach the channel
tails (a group's width not a multiple of the vector), N = 5 and the specialised N = 16,
one and two groups, L = 1 and L not a multiple of the checkpoint interval."""

from __future__ import annotations

import pytest
import torch

from mixstack.kernels import native
from mixstack.kernels import selective_scan as ss
from mixstack.kernels.backends import BackendPolicy
from tests.kernels.native_builds import portable_build

F64 = torch.float64
REASON = native.unavailable("selective")
needs_native = pytest.mark.skipif(REASON is not None, reason=f"no native provider: {REASON}")


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max error relative to the reference's max magnitude (0 for two zero tensors)."""
    return ((got.double() - want).abs().max() / want.abs().max().clamp(min=1e-300)).item()


def _leaves(seed: int, bsz: int, length: int, channels: int, nstate: int, groups: int,
            *, skip: bool, gate: bool, state: bool) -> dict:  # fmt: skip
    """Float64 inputs (``groups`` 0: B, C as (B, L, N)); D, z, initial_state or None."""
    g = torch.Generator().manual_seed(seed)
    leaves = ss.random_inputs(g, bsz, length, channels, nstate, groups, dtype=F64)
    leaves["D"] = torch.randn(channels, generator=g, dtype=F64) if skip else None
    leaves["z"] = torch.randn(bsz, length, channels, generator=g, dtype=F64) if gate else None
    leaves["initial_state"] = (
        torch.randn(bsz, channels, nstate, generator=g, dtype=F64) if state else None
    )
    return leaves


def _outputs_and_grads(fn, leaves: dict, cots: list, dtype: torch.dtype, **kwargs) -> list:
    """Outputs of ``fn`` on ``leaves`` cast to ``dtype``, then the gradients of
    Σ out·cot with respect to every given leaf."""
    cast = {k: v.to(dtype).requires_grad_() if v is not None else None for k, v in leaves.items()}
    out = fn(**cast, **kwargs)
    outs = list(out) if isinstance(out, tuple) else [out]
    loss = sum((o * c.to(dtype)).sum() for o, c in zip(outs, cots, strict=True))
    used = [v for v in cast.values() if v is not None]
    return [o.detach() for o in outs] + list(torch.autograd.grad(loss, used))


def _compare(leaves: dict, *, final: bool, fn=ss.selective_scan_native) -> None:
    bsz, length, channels = leaves["u"].shape
    g = torch.Generator().manual_seed(99)
    cots = [torch.randn(bsz, length, channels, generator=g, dtype=F64)]
    if final:
        cots.append(torch.randn(bsz, channels, leaves["A"].shape[1], generator=g, dtype=F64))
    kwargs = {"return_final_state": final}
    want = _outputs_and_grads(ss.selective_scan_reference, leaves, cots, F64, **kwargs)
    got = _outputs_and_grads(fn, leaves, cots, torch.float32, **kwargs)
    names = [
        "y",
        *(["final_state"] if final else []),
        *(k for k, v in leaves.items() if v is not None),
    ]
    assert len(names) == len(got) == len(want)
    for name, a, b in zip(names, got, want, strict=True):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        assert torch.isfinite(a).all(), name
        assert _rel(a, b) <= 2e-5, f"{name}: {_rel(a, b):.2e}"


SHAPES = [
    # (B, L, Dn, N, G): G = 0 is B, C of shape (B, L, N)
    (2, 37, 21, 5, 0),  # one vector's tail, N = 5, L not a multiple of 32
    (2, 70, 42, 16, 2),  # two groups of 21 channels: a full vector and a tail each
    (1, 1, 16, 16, 1),  # L = 1, one full vector
    (2, 64, 35, 16, 0),  # L a multiple of the checkpoint interval, two vectors and a tail
    (1, 33, 133, 5, 0),  # backward blocks of 4 vectors: two full ones, then 5 channels
]


@needs_native
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("skip", "gate", "state"), [(True, True, True), (False, False, False)])
def test_native_matches_float64_reference(shape, skip, gate, state):
    _compare(_leaves(0, *shape, skip=skip, gate=gate, state=state), final=True)


@needs_native
@pytest.mark.parametrize(("skip", "gate", "state"), [(True, False, True), (False, True, False)])
def test_native_without_final_state(skip, gate, state):
    """No final state asked for: its gradient never reaches the backward (NULL there)."""
    _compare(_leaves(1, 2, 45, 19, 16, 1, skip=skip, gate=gate, state=state), final=False)


@needs_native
def test_strong_decay_and_long_steps():
    """Δ up to 30 and A down to −16: decays underflow to 0 (exp clamped in C) and the
    state restarts from the input at every step; still the reference's numbers."""
    leaves = _leaves(2, 1, 40, 17, 5, 0, skip=True, gate=False, state=True)
    leaves["delta"] = leaves["delta"] * 30
    _compare(leaves, final=True)


@needs_native
def test_threads_do_not_change_results():
    """Bit for bit the same under one and three threads: every unit is one thread's, and
    the per-unit partial sums of dA, dB and dC are added in torch in a fixed order."""
    leaves = _leaves(3, 2, 50, 100, 16, 2, skip=True, gate=True, state=True)
    cot = torch.randn(2, 50, 100, generator=torch.Generator().manual_seed(4))
    runs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            cast = {k: v.float().requires_grad_() for k, v in leaves.items()}
            y, final = ss.selective_scan_native(**cast, return_final_state=True)
            loss = (y * cot).sum() + final.square().sum()
            runs.append([y, final, *torch.autograd.grad(loss, list(cast.values()))])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


@needs_native
def test_bfloat16_inputs_compute_in_float32():
    leaves = _leaves(5, 1, 20, 24, 16, 0, skip=True, gate=True, state=False)
    bf = {k: v.to(torch.bfloat16) for k, v in leaves.items() if v is not None}
    y = ss.selective_scan_native(**bf)
    want = ss.selective_scan_reference(**{k: v.double() for k, v in bf.items()})
    assert y.dtype == torch.bfloat16
    assert _rel(y, want) < 1e-2


@needs_native
def test_packed_calls_take_the_torch_path():
    leaves = _leaves(6, 1, 10, 5, 4, 0, skip=True, gate=True, state=True)
    f32 = {k: v.float() for k, v in leaves.items()}
    seq_idx = torch.tensor([[-1, -1, 0, 0, 0, 1, 1, 1, 1, 2]])
    kwargs = {"seq_idx": seq_idx, "return_final_state": True}
    got = ss.selective_scan_native(**f32, **kwargs)
    want = ss.selective_scan_chunked(**f32, **kwargs)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


@needs_native
def test_portable_build_matches_float64_reference(tmp_path, monkeypatch):
    """selective.c built for no particular CPU (4-lane vectors, the exp without
    AVX-512's vscalefps), as a machine without AVX-512 runs it: y, the final state and
    every gradient against the float64 reference, tails included."""
    lib = ss._declare_selective(portable_build("selective", tmp_path))
    assert lib.selective_lanes() == 4
    monkeypatch.setattr(ss, "_selective_library", lambda: lib)
    _compare(_leaves(7, 2, 35, 10, 5, 2, skip=True, gate=True, state=True), final=True)


def test_auto_picks_native_for_cpu_float32_and_torch_for_float64():
    cpu = torch.device("cpu")
    expected = "native" if REASON is None else "torch"
    assert BackendPolicy("auto").resolve(ss.KERNEL, cpu, torch.float32).provider == expected
    assert BackendPolicy("auto").resolve(ss.KERNEL, cpu, torch.float64).provider == "torch"


@needs_native
def test_no_grad_call_matches_the_grad_call():
    """Under no_grad (inputs that require grad, as a model's parameters at inference)
    no checkpoints are stored; the outputs are the same bits as with autograd on."""
    leaves = _leaves(8, 2, 40, 20, 16, 0, skip=True, gate=True, state=True)
    cast = {k: v.float().requires_grad_() for k, v in leaves.items()}
    with torch.no_grad():
        plain = ss.selective_scan_native(**cast, return_final_state=True)
    tracked = ss.selective_scan_native(**cast, return_final_state=True)
    assert tracked[0].requires_grad and not plain[0].requires_grad
    for a, b in zip(plain, tracked, strict=True):
        assert torch.equal(a, b.detach())
