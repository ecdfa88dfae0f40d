"""SSD scan: the chunked fast path against the per-step recurrence and a closed form.

The recurrence (``reference`` backend) is itself checked against the semiseparable
matrix of docs/math.md#mamba-2 built here with explicit loops, and packed batches against each
document run alone, so no test relies only on agreement of two paths of the module.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from mixstack.kernels import native, ssd
from mixstack.kernels.common import document_runs

F64 = torch.float64
# ssd_minimal's quadratic state passing, the benchmark baseline
QUADRATIC_STATES = functools.partial(ssd.ssd_scan_chunked, quadratic_states=True)


def make_inputs(
    seed: int, *dims: int, dtype: torch.dtype = F64, D: str | None = "head", initial: bool = False
) -> dict[str, torch.Tensor]:
    """Random SSD inputs (leaf tensors with requires_grad); ``dims`` are
    ``(bsz, length, heads, hdim, groups, nstate)`` as for :func:`ssd.random_inputs`."""
    bsz, _, heads, hdim, _, nstate = dims
    g = torch.Generator().manual_seed(seed)
    out = ssd.random_inputs(g, *dims, dtype=dtype)
    if D == "head":
        out["D"] = torch.randn(heads, generator=g).to(dtype)
    elif D == "channel":
        out["D"] = torch.randn(heads, hdim, generator=g).to(dtype)
    if initial:
        out["initial_state"] = torch.randn(bsz, heads, hdim, nstate, generator=g).to(dtype)
    for t in out.values():
        t.requires_grad_(True)
    return out


def run_with_grads(fn, inputs, chunk_size, seed=0, **kw):
    """Outputs, final state and gradients of a fixed random linear functional of both."""
    y, final = fn(**inputs, chunk_size=chunk_size, return_final_state=True, **kw)
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g).to(y.dtype)
    gs = torch.randn(final.shape, generator=g).to(final.dtype)
    leaves = [t for t in inputs.values() if t.requires_grad]
    grads = torch.autograd.grad((y * gy).sum() + (final * gs).sum(), leaves)
    return (
        y,
        final,
        dict(zip([k for k, t in inputs.items() if t.requires_grad], grads, strict=True)),
    )


def assert_close_all(a, b, *, rtol=1e-9, atol=1e-10):
    ya, sa, ga = a
    yb, sb, gb = b
    torch.testing.assert_close(ya, yb, rtol=rtol, atol=atol)
    torch.testing.assert_close(sa, sb, rtol=rtol, atol=atol)
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=rtol, atol=atol, msg=name)


def closed_form(x, dt, A, B, C, D=None):
    """y from the materialized semiseparable matrix, built with explicit loops (fp64).

    M_h[i, j] = (C_i · B_j) · exp(A_h Σ_{k=j+1..i} Δ_k) · Δ_j for j <= i, + D_h on the diagonal.
    """
    bsz, length, heads, _ = x.shape
    rep = heads // B.shape[2]
    M = torch.zeros(bsz, heads, length, length, dtype=F64)
    for b in range(bsz):
        for h in range(heads):
            g = h // rep
            for i in range(length):
                for j in range(i + 1):
                    decay = math.exp(float(A[h]) * float(dt[b, j + 1 : i + 1, h].sum()))
                    M[b, h, i, j] = float(C[b, i, g] @ B[b, j, g]) * decay * float(dt[b, j, h])
                if D is not None:
                    M[b, h, i, i] += float(D[h])
    return torch.einsum("bhij,bjhp->bihp", M, x.double())


# -- chunked vs recurrence ------------------------------------------------------------------


@pytest.mark.parametrize("initial", [False, True])
@pytest.mark.parametrize("length", [1, 7, 63, 64, 65])
@pytest.mark.parametrize("chunk_size", [4, 16, 64])
@pytest.mark.parametrize("groups", [1, 2])
def test_chunked_matches_recurrence_fp64(groups, chunk_size, length, initial):
    inputs = make_inputs(length * 10 + groups, 2, length, 4, 3, groups, 5, initial=initial)
    fast = run_with_grads(ssd.ssd_scan_chunked, inputs, chunk_size)
    ref = run_with_grads(ssd.ssd_scan_reference, inputs, chunk_size)
    assert_close_all(fast, ref)


@pytest.mark.parametrize("initial", [False, True])
@pytest.mark.parametrize("groups", [1, 2])
def test_chunked_matches_recurrence_long_sequence(groups, initial):
    inputs = make_inputs(7, 1, 1000, 2, 2, groups, 3, initial=initial, D="channel")
    fast = run_with_grads(ssd.ssd_scan_chunked, inputs, 64)
    ref = run_with_grads(ssd.ssd_scan_reference, inputs, 64)
    assert_close_all(fast, ref)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize(("length", "chunk_size"), [(65, 16), (1000, 256)])
def test_fp32_within_tolerance_of_fp64(length, chunk_size, packed, random_packing):
    inputs64 = make_inputs(3, 2, length, 4, 4, 2, 8, initial=True)
    inputs32 = {k: v.detach().float().requires_grad_(True) for k, v in inputs64.items()}
    kw = {"seq_idx": random_packing(length, seed=length)} if packed else {}
    ref = run_with_grads(ssd.ssd_scan_reference, inputs64, chunk_size, **kw)
    fast = run_with_grads(ssd.ssd_scan_chunked, inputs32, chunk_size, **kw)
    assert fast[0].dtype == torch.float32 and fast[1].dtype == torch.float32
    for a, b in [(fast[0], ref[0]), (fast[1], ref[1])] + [(fast[2][k], ref[2][k]) for k in ref[2]]:
        scale = b.abs().max().item()
        assert (a.double() - b).abs().max().item() <= 2e-5 * scale + 1e-6


def test_quadratic_state_passing_matches_linear_scan():
    inputs = make_inputs(11, 2, 50, 4, 3, 2, 5, initial=True)
    seq_idx = torch.tensor([[0] * 20 + [1] * 30, [-1] * 3 + [2] * 40 + [-1] * 7])
    linear = run_with_grads(ssd.ssd_scan_chunked, inputs, 8, seq_idx=seq_idx)
    quadratic = run_with_grads(QUADRATIC_STATES, inputs, 8, seq_idx=seq_idx)
    assert_close_all(linear, quadratic)


# -- closed form ------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [ssd.ssd_scan_reference, ssd.ssd_scan_chunked])
def test_matches_semiseparable_closed_form(fn):
    inp = {k: v.detach() for k, v in make_inputs(5, 2, 13, 4, 3, 2, 4).items()}
    expected = closed_form(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], inp["D"])
    torch.testing.assert_close(fn(**inp, chunk_size=4), expected, rtol=1e-10, atol=1e-12)


def test_is_linear_in_x_for_any_head_dim():
    """The matrix view feeds P = L; the scan must accept it and stay linear in x."""
    inp = {k: v.detach() for k, v in make_inputs(6, 1, 9, 2, 1, 1, 3, D=None).items()}
    eye = torch.eye(9, dtype=F64)[None, :, None, :].expand(1, 9, 2, 9)  # (B, L, H, P=L)
    M = ssd.ssd_scan_chunked(eye, inp["dt"], inp["A"], inp["B"], inp["C"], chunk_size=4)
    x = torch.randn(1, 9, 2, 5, dtype=F64)
    expected = ssd.ssd_scan_chunked(x, inp["dt"], inp["A"], inp["B"], inp["C"], chunk_size=4)
    torch.testing.assert_close(torch.einsum("bihj,bjhp->bihp", M, x), expected)


def test_segsum_is_masked_before_exp():
    a = torch.tensor([0.5, -1.0, 2.0, -3.0], dtype=F64)
    seg = ssd.segsum(a)
    for i in range(4):
        for j in range(4):
            expected = a[j + 1 : i + 1].sum().item() if j <= i else -math.inf
            assert seg[i, j].item() == pytest.approx(expected)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("with_same", [False, True])
@pytest.mark.parametrize("q", [1, 5, 16])
def test_segsum_exp_matches_autograd_through_segsum(dtype, with_same, q):
    """The written-out backward of ``segsum_exp`` against autograd through ``segsum`` and
    ``exp`` (fp64 reference), with and without a document mask, on a random cotangent."""
    g = torch.Generator().manual_seed(q)
    a = (-8.0 * torch.rand(2, 3, q, generator=g, dtype=F64)).requires_grad_(True)
    cot = torch.randn(2, 3, q, q, generator=g, dtype=F64)
    same = None
    if with_same:  # two documents per row, split at a random position
        run = (torch.arange(q) >= torch.randint(0, q + 1, (2, 1, 1), generator=g)).long()
        same = run[..., :, None] == run[..., None, :]  # (2, 1, Q, Q), broadcast over dim 1
    log = ssd.segsum(a)
    if same is not None:
        log = log.masked_fill(~same, float("-inf"))
    expected = torch.exp(log)
    (expected_grad,) = torch.autograd.grad((expected * cot).sum(), a)
    a_d = a.detach().to(dtype).requires_grad_(True)
    got = ssd.segsum_exp(a_d, same)
    (got_grad,) = torch.autograd.grad((got * cot.to(dtype)).sum(), a_d)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == F64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(got.double(), expected, **tol)
    torch.testing.assert_close(got_grad.double(), expected_grad, **tol)
    assert (got.triu(1) == 0).all()


# -- packed sequences ---------------------------------------------------------------------------


def test_document_runs():
    seq_idx = torch.tensor([[-1, 3, 3, -1, 3, 5, 5, -1, 0, 0]])
    run, pad = document_runs(seq_idx)
    assert run.tolist() == [[0, 0, 0, 0, 0, 1, 1, 1, 2, 2]]
    assert pad.tolist() == [[True, False, False, True, False, False, False, True, False, False]]


PACKED_ROWS = [[(-1, 2), (0, 9), (1, 30), (2, 5), (-1, 3)], [(7, 40), (-1, 4), (8, 5)]]


def _packed_ids(rows):
    return torch.tensor([[sid for sid, n in row for _ in range(n)] for row in rows])


def _separate(inp, rows, initial):
    """Each document of each row run alone through the recurrence, no seq_idx.

    -> y (B, L, H, P) with zeros at padding, final state per row (of its last document),
    and a loss-ready list of pieces. The first document of a row starts from ``initial``.
    """
    y = torch.zeros_like(inp["x"])
    finals = []
    for b, row in enumerate(rows):
        start, first, state = 0, True, None
        for sid, n in row:
            if sid >= 0:
                sl = slice(start, start + n)
                init = initial[b : b + 1] if first and initial is not None else None
                y_doc, state = ssd.ssd_scan_reference(
                    inp["x"][b : b + 1, sl],
                    inp["dt"][b : b + 1, sl],
                    inp["A"],
                    inp["B"][b : b + 1, sl],
                    inp["C"][b : b + 1, sl],
                    D=inp.get("D"),
                    initial_state=init,
                    return_final_state=True,
                )
                y = y.index_put((torch.tensor([b]), torch.arange(start, start + n)), y_doc[0])
                first = False
            start += n
        finals.append(state[0])
    return y, torch.stack(finals)


@pytest.mark.parametrize("fn", [ssd.ssd_scan_chunked, ssd.ssd_scan_reference])
@pytest.mark.parametrize("chunk_size", [8, 64])
def test_packed_equals_separate(fn, chunk_size):
    seq_idx = _packed_ids(PACKED_ROWS)  # (2, 49)
    inp = make_inputs(21, 2, seq_idx.shape[1], 4, 3, 2, 4, D="channel", initial=True)
    initial = inp.pop("initial_state")
    y, final = fn(
        **inp,
        chunk_size=chunk_size,
        seq_idx=seq_idx,
        initial_state=initial,
        return_final_state=True,
    )
    y_sep, final_sep = _separate(inp, PACKED_ROWS, initial)
    torch.testing.assert_close(y, y_sep, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(final, final_sep, rtol=1e-10, atol=1e-12)
    # Gradients: a loss on the packed call (outputs and final state) equals the same loss
    # on the separate calls.
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(y.shape, generator=g, dtype=F64)
    weight_final = torch.randn(final.shape, generator=g, dtype=F64)
    leaves = [inp["x"], inp["dt"], inp["B"], inp["C"], inp["A"], inp["D"], initial]
    g_packed = torch.autograd.grad((y * weight).sum() + (final * weight_final).sum(), leaves)
    g_sep = torch.autograd.grad((y_sep * weight).sum() + (final_sep * weight_final).sum(), leaves)
    for a, b in zip(g_packed, g_sep, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    pad = seq_idx < 0
    assert (y[pad] == 0).all()
    assert (g_packed[0][pad] == 0).all() and (g_packed[1][pad] == 0).all()


@pytest.mark.parametrize("initial", [False, True])
@pytest.mark.parametrize(
    ("length", "chunk_size"),
    [(1, 4), (7, 4), (63, 16), (64, 16), (65, 16), (65, 64), (1000, 64)],
)
@pytest.mark.parametrize("groups", [1, 2])
def test_packed_chunked_matches_recurrence_fp64(
    groups, length, chunk_size, initial, random_packing
):
    """Packed rows: outputs, final state and every gradient (initial state included) of
    the chunked path equal the recurrence's, which test_packed_equals_separate ties to
    each document run alone."""
    seq_idx = random_packing(length, seed=length + chunk_size)
    inputs = make_inputs(length + groups, 2, length, 4, 3, groups, 5, initial=initial)
    fast = run_with_grads(ssd.ssd_scan_chunked, inputs, chunk_size, seq_idx=seq_idx)
    ref = run_with_grads(ssd.ssd_scan_reference, inputs, chunk_size, seq_idx=seq_idx)
    assert_close_all(fast, ref)


def test_repeated_document_id_after_another_is_a_new_document():
    seq_idx = torch.tensor([[0] * 6 + [1] * 5 + [0] * 7])
    inp = {k: v.detach() for k, v in make_inputs(2, 1, 18, 2, 2, 1, 3).items()}
    y = ssd.ssd_scan_chunked(**inp, chunk_size=4, seq_idx=seq_idx)
    rows = [[(0, 6), (1, 5), (0, 7)]]
    torch.testing.assert_close(y, _separate(inp, rows, None)[0], rtol=1e-10, atol=1e-12)


def test_padding_is_inert():
    seq_idx = torch.tensor([[0] * 5 + [-1] * 4 + [0] * 6])
    inp = {k: v.detach() for k, v in make_inputs(4, 1, 15, 2, 3, 1, 4).items()}
    y = ssd.ssd_scan_chunked(**inp, chunk_size=4, seq_idx=seq_idx)
    changed = {k: v.clone() for k, v in inp.items()}
    for key in ("x", "dt", "B", "C"):
        changed[key][:, 5:9] = 100.0
    y2 = ssd.ssd_scan_chunked(**changed, chunk_size=4, seq_idx=seq_idx)
    torch.testing.assert_close(y, y2, rtol=0, atol=0)
    assert (y[:, 5:9] == 0).all()
    # Padding inside a document neither decays nor injects: same as removing it.
    keep = seq_idx[0] >= 0
    y_removed = ssd.ssd_scan_reference(
        *(inp[k][:, keep] for k in ("x", "dt")),
        inp["A"],
        inp["B"][:, keep],
        inp["C"][:, keep],
        D=inp["D"],
    )
    torch.testing.assert_close(y[:, keep], y_removed, rtol=1e-10, atol=1e-12)


# -- numerics ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [ssd.ssd_scan_chunked, QUADRATIC_STATES])
def test_no_nan_with_large_dt_on_long_sequences(fn):
    g = torch.Generator().manual_seed(0)
    bsz, length, heads = 1, 2048, 2
    inp = ssd.random_inputs(g, bsz, length, heads, 4, 1, 4)
    inp["dt"] = torch.empty(bsz, length, heads).uniform_(5.0, 60.0, generator=g)
    inp["A"] = torch.tensor([-1.0, -16.0])
    seq_idx = torch.zeros(bsz, length, dtype=torch.long)
    seq_idx[:, 1000:] = 1
    seq_idx[:, -5:] = -1
    for t in inp.values():
        t.requires_grad_(True)
    y, final = fn(**inp, chunk_size=128, seq_idx=seq_idx, return_final_state=True)
    grads = torch.autograd.grad(y.sum() + final.sum(), list(inp.values()))
    assert torch.isfinite(y).all() and torch.isfinite(final).all()
    for name, grad in zip(inp, grads, strict=True):
        assert torch.isfinite(grad).all(), name


# the fast paths that take bf16: torch, and the compiled C kernels where they build
FAST_SCANS = [ssd.ssd_scan_chunked] + (
    [ssd.ssd_scan_native] if native.unavailable("ssd") is None else []
)


@pytest.mark.parametrize("scan", FAST_SCANS)
def test_bf16_inputs_compute_in_fp32(scan):
    inp = {k: v.detach() for k, v in make_inputs(8, 2, 70, 4, 8, 2, 8, dtype=torch.float32).items()}
    y32, s32 = scan(**inp, chunk_size=16, return_final_state=True)
    bf = {k: v.bfloat16() for k, v in inp.items()}
    y16, s16 = scan(**bf, chunk_size=16, return_final_state=True)
    assert y16.dtype == torch.bfloat16 and s16.dtype == torch.float32
    assert (y16.float() - y32).abs().max() <= 0.05 * y32.abs().max()
    assert (s16 - s32).abs().max() <= 0.05 * s32.abs().max()


# -- decoding -------------------------------------------------------------------------------------


@pytest.mark.parametrize("D", [None, "head", "channel"])
def test_step_matches_recurrence(D):
    inp = {k: v.detach() for k, v in make_inputs(9, 2, 11, 4, 3, 2, 5, D=D, initial=True).items()}
    y_ref, final_ref = ssd.ssd_scan_reference(**inp, return_final_state=True)
    state = inp["initial_state"].clone()
    ys = [
        ssd.ssd_step(
            state,
            inp["x"][:, t],
            inp["dt"][:, t],
            inp["A"],
            inp["B"][:, t],
            inp["C"][:, t],
            inp.get("D"),
        )
        for t in range(11)
    ]
    torch.testing.assert_close(torch.stack(ys, dim=1), y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, final_ref, rtol=1e-12, atol=1e-12)


def test_backward_through_steps_equals_the_recurrence():
    """ssd_step overwrites the state in place; under autograd it must not corrupt what
    backward needs: gradients of a step-by-step run equal the recurrence's."""
    inputs = make_inputs(10, 2, 9, 4, 3, 2, 5, initial=True)
    leaves = list(inputs)
    g = torch.Generator().manual_seed(1)
    cot = torch.randn(2, 9, 4, 3, generator=g, dtype=F64)
    cot_final = torch.randn(2, 4, 3, 5, generator=g, dtype=F64)
    y_ref, final_ref = ssd.ssd_scan_reference(**inputs, return_final_state=True)
    loss = (y_ref * cot).sum() + (final_ref * cot_final).sum()
    want = torch.autograd.grad(loss, [inputs[k] for k in leaves])
    state = torch.zeros(2, 4, 3, 5, dtype=F64)
    state.copy_(inputs["initial_state"])  # the state tensor itself is not a leaf
    args = ("x", "dt", "B", "C")
    ys = [
        ssd.ssd_step(state, *(inputs[k][:, t] for k in args[:2]), inputs["A"],
                     *(inputs[k][:, t] for k in args[2:]), inputs["D"])
        for t in range(9)
    ]  # fmt: skip
    loss = (torch.stack(ys, 1) * cot).sum() + (state * cot_final).sum()
    got = torch.autograd.grad(loss, [inputs[k] for k in leaves])
    for name, a, b in zip(leaves, got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


# -- registration and argument checks ------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"B": torch.zeros(1, 5, 3, 4)}, "multiple of G"),
        ({"dt": torch.zeros(1, 5, 3)}, r"dt \(1, 5, 3\)"),
        ({"D": torch.zeros(3)}, r"D must be \(H,\) or \(H, P\)"),
        ({"seq_idx": torch.zeros(1, 4, dtype=torch.long)}, "seq_idx must be"),
        ({"initial_state": torch.zeros(1, 2, 3, 5)}, "initial_state must be"),
        ({"chunk_size": 0}, "chunk_size and length must be >= 1, got chunk_size 0"),
    ],
)
def test_argument_errors_name_the_problem(change, message):
    args = {
        "x": torch.zeros(1, 5, 2, 3),
        "dt": torch.zeros(1, 5, 2),
        "A": -torch.ones(2),
        "B": torch.zeros(1, 5, 1, 4),
        "C": torch.zeros(1, 5, 1, 4),
        "chunk_size": 4,
    }
    args.update(change)
    if "B" in change:
        args["C"] = change["B"]
    for fn in (ssd.ssd_scan_chunked, ssd.ssd_scan_reference):
        with pytest.raises(ValueError, match=message):
            fn(**args)
