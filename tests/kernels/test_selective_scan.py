"""Selective scan (Mamba-1, docs/math.md#mamba-1): the reference against a closed form written here,
the chunked torch path against the reference (outputs, final states, gradients), packed
documents against separate runs, decoding steps, extreme decays, and memory."""

from __future__ import annotations

import ctypes

import pytest
import torch

from mixstack.kernels import selective_scan as ss
from mixstack.kernels.selective_scan import (
    selective_scan_chunked,
    selective_scan_reference,
    selective_scan_step,
)

F64 = torch.float64


def inputs(
    seed: int,
    bsz: int,
    length: int,
    channels: int,
    nstate: int,
    groups: int = 0,
    *,
    extras: bool = True,
    dtype: torch.dtype = F64,
) -> dict:
    """Random problem; ``groups`` 0 gives B, C as (B, L, N). ``extras``: D, z, h0."""
    g = torch.Generator().manual_seed(seed)
    case = ss.random_inputs(g, bsz, length, channels, nstate, groups, dtype=dtype)
    if extras:
        case["D"] = torch.randn(channels, generator=g).to(dtype)
        case["z"] = torch.randn(bsz, length, channels, generator=g).to(dtype)
        case["initial_state"] = torch.randn(bsz, channels, nstate, generator=g).to(dtype)
    return case


def closed_form(u, delta, A, B, C, D=None, z=None, initial_state=None):
    """docs/math.md#mamba-1 as sums, no recurrence: for j <= i,
    ``y_i[d] = Σ_j Σ_n C_i[n] B_j[n] exp(A[d,n] Σ_{k=j+1..i} Δ_k[d]) Δ_j[d] u_j[d]
    + Σ_n C_i[n] exp(A[d,n] Σ_{k<=i} Δ_k[d]) h0[d,n] + D[d] u_i[d]``, times silu(z_i[d]);
    the final state is the same sums taken at i = L−1 before contracting with C."""
    bsz, length, channels = u.shape
    if B.dim() == 3:
        B, C = B[:, :, None], C[:, :, None]
    per = channels // B.shape[2]
    Bd = B.repeat_interleave(per, dim=2)  # (B, L, Dn, N)
    Cd = C.repeat_interleave(per, dim=2)
    y = torch.zeros_like(u)
    final = torch.zeros(bsz, channels, A.shape[1], dtype=u.dtype)
    for i in range(length):
        for j in range(i + 1):
            span = delta[:, j + 1 : i + 1].sum(dim=1)  # (B, Dn): Σ_{k=j+1..i} Δ_k
            term = torch.exp(A * span[..., None]) * (delta[:, j] * u[:, j])[..., None] * Bd[:, j]
            y[:, i] += (term * Cd[:, i]).sum(-1)
            if i == length - 1:
                final += term
        if initial_state is not None:
            carried = torch.exp(A * delta[:, : i + 1].sum(dim=1)[..., None]) * initial_state
            y[:, i] += (carried * Cd[:, i]).sum(-1)
            if i == length - 1:
                final += carried
    if D is not None:
        y = y + D * u
    if z is not None:
        y = y * z * torch.sigmoid(z)
    return y, final


def outputs_and_grads(fn, case: dict, seed: int = 0, **kwargs):
    """Outputs (y, final state) and gradients of every float input under a random
    cotangent on both outputs."""
    leaves = {
        k: v.detach().clone().requires_grad_() if torch.is_tensor(v) and v.is_floating_point()
        else v
        for k, v in case.items()
    }  # fmt: skip
    y, final = fn(**leaves, return_final_state=True, **kwargs)
    g = torch.Generator().manual_seed(seed)
    # cotangents drawn in fp64 whatever the dtype, so fp32 and fp64 runs share them
    loss = (y * torch.randn(y.shape, generator=g, dtype=F64).to(y.dtype)).sum()
    loss = loss + (final * torch.randn(final.shape, generator=g, dtype=F64).to(final.dtype)).sum()
    loss.backward()
    grads = {k: v.grad for k, v in leaves.items() if torch.is_tensor(v) and v.grad is not None}
    return y.detach(), final.detach(), grads


def assert_rel(got: torch.Tensor, want: torch.Tensor, rel: float, what: str) -> None:
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    assert err <= rel * max(scale, 1e-30), f"{what}: max error {err:.3g} vs scale {scale:.3g}"


@pytest.fixture
def segments(monkeypatch):
    """Set the segment size in chunks (None: the default budget) for a problem."""

    def set_segments(case: dict, chunk: int, chunks_per_segment: int | None) -> None:
        if chunks_per_segment is not None:
            per_step = case["u"].shape[0] * case["u"].shape[2] * case["A"].shape[1]
            monkeypatch.setattr(ss, "SEGMENT_ELEMENTS", per_step * chunk * chunks_per_segment)

    return set_segments


# -- the reference against the closed form -------------------------------------------------------


@pytest.mark.parametrize("groups", [0, 1, 3])
def test_reference_equals_closed_form(groups: int) -> None:
    case = inputs(1, 2, 9, 6, 4, groups)
    y, final = selective_scan_reference(**case, return_final_state=True)
    want_y, want_final = closed_form(**case)
    torch.testing.assert_close(y, want_y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(final, want_final, rtol=1e-12, atol=1e-12)


def test_reference_is_linear_in_u_without_initial_state() -> None:
    """The matrix view relies on it: y(a·u1 + u2) = a·y(u1) + y(u2) (no z, no h0)."""
    case = inputs(2, 1, 11, 4, 3, extras=False)
    u2 = torch.randn(case["u"].shape, dtype=F64, generator=torch.Generator().manual_seed(3))
    both = selective_scan_reference(
        **{**case, "u": 2.5 * case["u"] + u2}, D=torch.ones(4, dtype=F64)
    )
    parts = [
        selective_scan_reference(**{**case, "u": v}, D=torch.ones(4, dtype=F64))
        for v in (case["u"], u2)
    ]
    torch.testing.assert_close(both, 2.5 * parts[0] + parts[1], rtol=1e-12, atol=1e-12)


# -- fast path against the reference ------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 7, 63, 64, 65, 1000])
@pytest.mark.parametrize("chunk", [8, 64])
@pytest.mark.parametrize("chunks_per_segment", [None, 3])
def test_chunked_matches_reference_fp64(length, chunk, chunks_per_segment, segments) -> None:
    """Groups, D, gate and an initial state; gradients of every input and of h0."""
    case = inputs(length + chunk, 2, length, 6, 4, groups=2)
    segments(case, chunk, chunks_per_segment)
    fast = outputs_and_grads(selective_scan_chunked, case, chunk_size=chunk)
    ref = outputs_and_grads(selective_scan_reference, case)
    assert_rel(fast[0], ref[0], 1e-12, "y")
    assert_rel(fast[1], ref[1], 1e-12, "final state")
    assert set(fast[2]) == set(ref[2]) == {"u", "delta", "A", "B", "C", "D", "z", "initial_state"}
    for name, grad in ref[2].items():
        assert_rel(fast[2][name], grad, 1e-11, f"d{name}")


@pytest.mark.parametrize("length", [1, 33, 200])
@pytest.mark.parametrize("chunks_per_segment", [None, 1, 2])
def test_chunked_matches_reference_without_extras(length, chunks_per_segment, segments) -> None:
    """Plain (B, L, N) B and C, no D, no gate, zero initial state; chunk 16."""
    case = inputs(7 * length, 3, length, 5, 3, extras=False)
    segments(case, 16, chunks_per_segment)
    fast = outputs_and_grads(selective_scan_chunked, case, chunk_size=16)
    ref = outputs_and_grads(selective_scan_reference, case)
    for got, want, what in zip(fast[:2], ref[:2], ("y", "final"), strict=True):
        assert_rel(got, want, 1e-12, what)
    for name, grad in ref[2].items():
        assert_rel(fast[2][name], grad, 1e-11, f"d{name}")


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("length", [65, 300, 1000])
def test_chunked_matches_fp64_reference_in_fp32(length: int, packed: bool, random_packing) -> None:
    case64 = inputs(5, 2, length, 8, 6, groups=2)
    case32 = {k: v.float() if torch.is_tensor(v) else v for k, v in case64.items()}
    kw = {"seq_idx": random_packing(length, seed=length)} if packed else {}
    fast = outputs_and_grads(selective_scan_chunked, case32, **kw)
    ref = outputs_and_grads(selective_scan_reference, case64, **kw)
    assert fast[0].dtype == torch.float32 and fast[1].dtype == torch.float32
    assert_rel(fast[0].double(), ref[0], 1e-5, "y")
    assert_rel(fast[1].double(), ref[1], 1e-5, "final state")
    for name, grad in ref[2].items():
        assert_rel(fast[2][name].double(), grad, 1e-4, f"d{name}")


def test_bf16_inputs_are_computed_in_fp32() -> None:
    case = inputs(6, 2, 40, 4, 3)
    y16, final16 = selective_scan_chunked(
        **{k: v.bfloat16() for k, v in case.items()}, return_final_state=True
    )
    assert y16.dtype == torch.bfloat16 and final16.dtype == torch.float32
    want = selective_scan_reference(**{k: v.bfloat16().double() for k, v in case.items()})
    assert_rel(y16.double(), want, 2e-2, "bf16 y")


def test_large_decays_stay_finite_and_exact() -> None:
    """Δ·A down to −800 per step and whole chunks far below exp's range: no inf/NaN in
    forward or backward (decays are masked before exp, never divided)."""
    case = inputs(8, 2, 100, 4, 3)
    case["delta"] = case["delta"] * 50.0  # up to 50
    case["A"] = case["A"] - 10.0
    for dtype in (torch.float32, F64):
        cast = {k: v.to(dtype) for k, v in case.items()}
        fast = outputs_and_grads(selective_scan_chunked, cast, chunk_size=32)
        ref = outputs_and_grads(selective_scan_reference, {k: v.double() for k, v in case.items()})
        for t in (fast[0], fast[1], *fast[2].values()):
            assert torch.isfinite(t).all()
        assert_rel(fast[0].double(), ref[0], 1e-5 if dtype == torch.float32 else 1e-12, "y")
        for name, grad in ref[2].items():
            rel = 1e-4 if dtype == torch.float32 else 1e-11
            assert_rel(fast[2][name].double(), grad, rel, f"d{name}")


# -- packed documents ----------------------------------------------------------------------------

# Per row: (id, length); -1 is padding. Odd lengths, a 1-token document, padding at the
# start, between documents and at the end.
ROWS = [
    [(0, 5), (-1, 2), (1, 9), (2, 1), (3, 20), (-1, 3)],
    [(-1, 3), (4, 17), (5, 4), (6, 16)],
]


def packed_layout() -> torch.Tensor:
    return torch.tensor([[i for i, n in row for _ in range(n)] for row in ROWS])


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_packed_documents_equal_separate_runs(backend: str) -> None:
    """Each document alone gives the same outputs; only the first document of a row sees
    the initial state; the final state is the last document's; padding outputs 0."""
    fn = selective_scan_reference if backend == "reference" else selective_scan_chunked
    kw = {} if backend == "reference" else {"chunk_size": 8}
    seq_idx = packed_layout()
    case = inputs(9, 2, seq_idx.shape[1], 6, 4, groups=3)
    case["u"] = torch.where((seq_idx < 0)[..., None], 1e3, case["u"])  # garbage in padding
    y, final = fn(**case, seq_idx=seq_idx, return_final_state=True, **kw)
    for b, row in enumerate(ROWS):
        start, first, last_state = 0, True, None
        for doc, n in row:
            part = slice(start, start + n)
            if doc < 0:
                assert (y[b, part] == 0).all(), "padding must output 0"
            else:
                alone = {
                    k: (v[b : b + 1, part] if v.dim() >= 2 and v.shape[:2] == seq_idx.shape else v)
                    for k, v in case.items()
                    if k != "initial_state"
                }
                h0 = case["initial_state"][b : b + 1] if first else None
                want, last_state = selective_scan_reference(
                    **alone, initial_state=h0, return_final_state=True
                )
                assert_rel(y[b : b + 1, part], want, 1e-12, f"row {b} doc {doc}")
                first = False
            start += n
        assert_rel(final[b : b + 1], last_state, 1e-12, f"row {b} final state")


def test_padding_inside_a_document_is_transparent() -> None:
    """A pad between two tokens of one document neither decays nor feeds the state."""
    case = inputs(10, 1, 12, 4, 3)
    seq_idx = torch.tensor([[0] * 4 + [-1] * 3 + [0] * 5])
    keep = (seq_idx[0] >= 0).nonzero().squeeze(1)
    y, final = selective_scan_chunked(
        **case, seq_idx=seq_idx, chunk_size=4, return_final_state=True
    )
    squeezed = {
        k: (v[:, keep] if v.dim() == 3 and v.shape[1] == 12 else v) for k, v in case.items()
    }
    want, want_final = selective_scan_reference(**squeezed, return_final_state=True)
    assert_rel(y[:, keep], want, 1e-12, "tokens")
    assert_rel(final, want_final, 1e-12, "final state")


@pytest.mark.parametrize("initial", [False, True])
@pytest.mark.parametrize(
    ("length", "chunk", "chunks_per_segment"),
    [
        (1, 8, None),
        (7, 4, 1),
        (63, 8, None),
        (64, 8, 3),
        (65, 16, 2),
        (1000, 32, None),
        (1000, 8, 5),
    ],
)
@pytest.mark.parametrize("groups", [0, 3])
def test_packed_chunked_matches_reference_fp64(
    groups, length, chunk, chunks_per_segment, initial, segments, random_packing
) -> None:
    """Packed rows, also across segment boundaries: outputs, final state and gradients of
    every input (initial state included); the reference is tied to separate runs by
    test_packed_documents_equal_separate_runs."""
    seq_idx = random_packing(length, seed=length + chunk)
    case = inputs(length + groups, 2, length, 6, 4, groups)
    if not initial:
        del case["initial_state"]
    segments(case, chunk, chunks_per_segment)
    fast = outputs_and_grads(selective_scan_chunked, case, seq_idx=seq_idx, chunk_size=chunk)
    ref = outputs_and_grads(selective_scan_reference, case, seq_idx=seq_idx)
    assert_rel(fast[0], ref[0], 1e-12, "y")
    assert_rel(fast[1], ref[1], 1e-12, "final state")
    assert set(fast[2]) == set(ref[2])
    for name, grad in ref[2].items():
        assert_rel(fast[2][name], grad, 1e-11, f"d{name}")


def test_packed_gradients_match_reference() -> None:
    seq_idx = packed_layout()
    case = inputs(11, 2, seq_idx.shape[1], 4, 2)
    fast = outputs_and_grads(selective_scan_chunked, case, seq_idx=seq_idx, chunk_size=16)
    ref = outputs_and_grads(selective_scan_reference, case, seq_idx=seq_idx)
    for name, grad in ref[2].items():
        assert_rel(fast[2][name], grad, 1e-11, f"d{name}")


# -- decoding ------------------------------------------------------------------------------------


def run_steps(state: torch.Tensor, case: dict[str, torch.Tensor]) -> torch.Tensor:
    """selective_scan_step over every position of ``case`` (updating ``state``) -> y."""
    steps = [
        selective_scan_step(
            state,
            case["u"][:, t],
            case["delta"][:, t],
            case["A"],
            case["B"][:, t],
            case["C"][:, t],
            D=case["D"],
            z=case["z"][:, t],
        )
        for t in range(case["u"].shape[1])
    ]
    return torch.stack(steps, dim=1)


@pytest.mark.parametrize("groups", [0, 2])
def test_steps_equal_the_scan(groups: int) -> None:
    case = inputs(12, 2, 13, 6, 4, groups)
    want, want_final = selective_scan_reference(**case, return_final_state=True)
    state = case["initial_state"].clone()
    steps = run_steps(state, case)
    torch.testing.assert_close(steps, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, want_final, rtol=1e-12, atol=1e-12)


def test_backward_through_steps_equals_the_reference() -> None:
    """selective_scan_step overwrites the state in place; under autograd it must not
    corrupt what backward needs: a step-by-step run has the reference's gradients."""
    case = {k: v.requires_grad_() for k, v in inputs(17, 2, 9, 6, 4, groups=2).items()}
    g = torch.Generator().manual_seed(2)
    cot, cot_final = (
        torch.randn(2, 9, 6, generator=g, dtype=F64),
        torch.randn(2, 6, 4, generator=g, dtype=F64),
    )
    y, final = selective_scan_reference(**case, return_final_state=True)
    want = torch.autograd.grad((y * cot).sum() + (final * cot_final).sum(), list(case.values()))
    state = torch.zeros(2, 6, 4, dtype=F64)
    state.copy_(case["initial_state"])  # the state tensor itself is not a leaf
    steps = run_steps(state, case)
    loss = (steps * cot).sum() + (state * cot_final).sum()
    got = torch.autograd.grad(loss, list(case.values()))
    for name, a, b in zip(case, got, want, strict=True):
        assert_rel(a, b, 1e-12, f"d{name}")


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"A": torch.zeros(5, 3)}, r"expects u \(B, L, Dn\) and A \(Dn, N\)"),
        ({"delta": torch.zeros(2, 9, 6)}, r"delta must have u's shape \(2, 8, 6\)"),
        ({"B": torch.zeros(2, 8, 4, 3)}, r"G dividing Dn=6"),
        ({"C": torch.zeros(2, 8, 2)}, r"must both be \(B, L, N\) or \(B, L, G, N\)"),
        ({"D": torch.zeros(5)}, r"D must be \(Dn,\) = \(6,\)"),
        ({"seq_idx": torch.zeros(2, 7, dtype=torch.long)}, r"seq_idx must be \(B, L\)"),
        ({"initial_state": torch.zeros(2, 6, 2)}, r"initial_state must be \(B, Dn, N\)"),
        ({"chunk_size": 0}, r"chunk_size and length must be >= 1, got chunk_size 0"),
    ],
)
def test_shape_errors_name_the_mismatch(change: dict, message: str) -> None:
    case = {**inputs(13, 2, 8, 6, 3, extras=False), **change}
    for fn in (selective_scan_reference, selective_scan_chunked):
        with pytest.raises(ValueError, match=message):
            fn(**case)


def test_empty_sequences_are_refused() -> None:
    case = inputs(16, 2, 0, 6, 3, extras=False)
    for fn in (selective_scan_reference, selective_scan_chunked):
        with pytest.raises(ValueError, match=r"length must be >= 1, .* u \(2, 0, 6\)"):
            fn(**case)


# -- memory ----------------------------------------------------------------------------------------


def _malloc_live_bytes():
    """Bytes currently allocated through glibc malloc (torch's CPU allocator uses it), or
    None where mallinfo2 does not exist."""
    libc = ctypes.CDLL(None)  # the process's own symbols: libc is among them on Linux
    if not hasattr(libc, "mallinfo2"):
        return None

    class MallInfo2(ctypes.Structure):
        _fields_ = [
            (f, ctypes.c_size_t)
            for f in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                      "uordblks", "fordblks", "keepcost")
        ]  # fmt: skip

    libc.mallinfo2.restype = MallInfo2
    return lambda: libc.mallinfo2().uordblks + libc.mallinfo2().hblkhd


@pytest.mark.slow(budget_s=20)
def test_chunked_path_keeps_no_state_history_for_backward() -> None:
    """What autograd holds between forward and backward: the reference keeps every step's
    (B, Dn, N) state (more than the whole history), the chunked path only boundary
    states, its output and the graph's bookkeeping (a fraction of one history)."""
    live = _malloc_live_bytes()
    if live is None:
        pytest.skip("needs glibc's mallinfo2 to count allocated bytes")
    bsz, length, channels, nstate = 1, 128, 128, 64
    history = bsz * length * channels * nstate * 4  # fp32 bytes of all states: 4 MiB
    case = {
        k: v.requires_grad_()
        for k, v in inputs(
            14, bsz, length, channels, nstate, dtype=torch.float32, extras=False
        ).items()
    }
    retained = {}
    for fn in (selective_scan_chunked, selective_scan_reference):
        fn(**case).sum().backward()  # warm-up: one-time allocations of libraries
        before = live()
        y = fn(**case)
        retained[fn.__name__] = live() - before
        y.sum().backward()
        del y
    assert retained["selective_scan_reference"] > history, retained  # the measure sees it
    assert retained["selective_scan_chunked"] < history / 4, retained
