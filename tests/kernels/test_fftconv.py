"""fftconv: both backends against an independently materialized convolution matrix (fp64),
outputs and gradients, for every mode, shared and per-sample kernels, kernels shorter than,
as long as and longer than the sequence, odd lengths and packed documents."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mixstack.kernels import backends as kb
from mixstack.kernels import fftconv as fc
from mixstack.kernels.backends import BackendPolicy

F64 = torch.float64
BACKENDS = {"reference": fc.fftconv_reference, "torch": fc.fftconv_torch}


def rand(seed: int, *shape: int, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# -- the independent reference: an explicit (B, D, L, L) matrix per row -------------------------


def documents(seq_idx: torch.Tensor | None, B: int, L: int) -> list[list[tuple[int, int, int]]]:
    """Per row: (position, rank in its document, document number) of every token, by a
    plain walk: padding is skipped, a token whose id differs from the previous token's
    starts a new document."""
    rows = []
    for b in range(B):
        out, doc, rank, prev = [], -1, 0, "start"
        for t in range(L):
            sid = 0 if seq_idx is None else int(seq_idx[b, t])
            if sid < 0:
                continue
            if sid != prev:
                doc, rank = doc + 1, 0
            out.append((t, rank, doc))
            rank, prev = rank + 1, sid
        rows.append(out)
    return rows


def tap(k: torch.Tensor | None, j: int) -> torch.Tensor | int:
    """Column j of a (B, D, K) kernel, or 0 when j is outside it."""
    return k[..., j] if k is not None and 0 <= j < k.shape[-1] else 0


def matrix(L: int, k, k_back, mode: str, seq_idx) -> torch.Tensor:
    """M (B, D, L, L) with y[b, d] = M[b, d] @ u[b, d], from the definitions only."""
    B = k.shape[0]
    M = torch.zeros(B, k.shape[1], L, L, dtype=k.dtype)
    for b, tokens in enumerate(documents(seq_idx, B, L)):
        for t, rt, dt in tokens:
            for s, rs, ds in tokens:
                if ds != dt:
                    continue
                lag = rt - rs
                if mode == "circular":
                    entry = sum(tap(k[b], j) for j in range(k.shape[-1]) if (j - lag) % L == 0)
                elif lag >= 0:
                    entry = tap(k[b], lag)
                else:
                    entry = tap(None if k_back is None else k_back[b], -lag - 1)
                if isinstance(entry, torch.Tensor):
                    M[b, :, t, s] = entry
    return M


def expected(u, k, k_back, mode, seq_idx):
    B = u.shape[0]
    k3 = k.expand(B, *k.shape) if k.dim() == 2 else k
    kb3 = (
        None
        if k_back is None
        else (k_back.expand(B, *k_back.shape) if k_back.dim() == 2 else k_back)
    )
    M = matrix(u.shape[-1], k3, kb3, mode, seq_idx)
    return torch.einsum("bdts,bds->bdt", M, u)


def outputs_and_grads(fn, u, k, k_back, **kw):
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (u, k, k_back)]
    y = fn(leaves[0], leaves[1], k_back=leaves[2], **kw)
    y.backward(rand(99, *y.shape))
    return y.detach(), [None if t is None else t.grad for t in leaves]


def check(fn, u, k, k_back, mode, seq_idx=None):
    got, got_grads = outputs_and_grads(fn, u, k, k_back, mode=mode, seq_idx=seq_idx)
    want, want_grads = outputs_and_grads(
        lambda u_, k_, k_back=None: expected(u_, k_, k_back, mode, seq_idx), u, k, k_back
    )
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for name, a, b in zip(("du", "dk", "dk_back"), got_grads, want_grads, strict=True):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


# -- plain (unpacked) -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("mode", ["causal", "two_sided", "circular"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
@pytest.mark.parametrize("L", [1, 6, 13])
@pytest.mark.parametrize("relation", ["shorter", "equal", "longer"])
def test_matches_materialized_matrix(backend, mode, per_sample, L, relation):
    K = {"shorter": max(L // 2, 1), "equal": L, "longer": 2 * L + 3}[relation]
    B, D = 2, 3
    lead = (B, D) if per_sample else (D,)
    k = rand(1, *lead, K)
    k_back = rand(2, *lead, K + 1) if mode == "two_sided" else None
    check(BACKENDS[backend], rand(0, B, D, L), k, k_back, mode)


def test_only_the_kernel_carries_one_over_n():
    """[1, 2, 3] ∗ [1, 1]: the true convolution, not one divided by the FFT size."""
    u = torch.tensor([[[1.0, 2.0, 3.0]]], dtype=F64)
    k = torch.tensor([[1.0, 1.0]], dtype=F64)
    want = torch.tensor([[[1.0, 3.0, 5.0]]], dtype=F64)
    torch.testing.assert_close(fc.fftconv_torch(u, k), want)
    back = torch.tensor([[10.0]], dtype=F64)  # lag −1: y_t += 10 · u_{t+1}
    got = fc.fftconv_torch(u, k, mode="two_sided", k_back=back)
    torch.testing.assert_close(got, torch.tensor([[[21.0, 33.0, 5.0]]], dtype=F64))
    circ = fc.fftconv_torch(u, k, mode="circular")  # y_0 also reads u_2
    torch.testing.assert_close(circ, torch.tensor([[[4.0, 3.0, 5.0]]], dtype=F64))


@given(
    L=st.integers(1, 24),
    K=st.integers(1, 40),
    Kb=st.integers(0, 40),
    mode=st.sampled_from(["causal", "two_sided", "circular"]),
    per_sample=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_torch_equals_reference_on_random_shapes(L, K, Kb, mode, per_sample, seed):
    lead = (2, 3) if per_sample else (3,)
    u, k = rand(seed, 2, 3, L), rand(seed + 1, *lead, K)
    k_back = rand(seed + 2, *lead, Kb) if mode == "two_sided" else None
    want = fc.fftconv_reference(u, k, mode=mode, k_back=k_back)
    got = fc.fftconv_torch(u, k, mode=mode, k_back=k_back)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# -- packed documents -----------------------------------------------------------------------------

LAYOUTS = {
    # padding at the start, inside a document, at the end; a 1-token document
    "mixed": [
        [-1, -1, 0, 0, 0, 0, 1, 2, 2, -1, 2, 2, 2],
        [4, 4, 4, 4, 4, 4, 4, 5, 5, 5, -1, -1, -1],
    ],
    # the same id again after another document is a new document; an all-padding row
    "repeat-id": [[0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1], [-1] * 13],
}


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("mode", ["causal", "two_sided"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
@pytest.mark.parametrize("K", [2, 13, 40])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_packed_matches_materialized_matrix(backend, mode, per_sample, K, layout):
    seq_idx = torch.tensor(LAYOUTS[layout])
    lead = (2, 3) if per_sample else (3,)
    k = rand(5, *lead, K)
    k_back = rand(6, *lead, K - 1) if mode == "two_sided" else None
    u = rand(4, 2, 3, 13)
    check(BACKENDS[backend], u, k, k_back, mode, seq_idx)


@pytest.mark.parametrize("mode", ["causal", "two_sided"])
def test_packed_equals_each_document_alone_and_padding_is_inert(mode):
    seq_idx = torch.tensor(LAYOUTS["mixed"])
    u, k = rand(7, 2, 3, 13), rand(8, 3, 9)
    k_back = rand(9, 3, 9) if mode == "two_sided" else None
    garbage = torch.where(seq_idx[:, None, :] < 0, torch.full_like(u, 1e6), u)
    packed = fc.fftconv_torch(garbage, k, mode=mode, k_back=k_back, seq_idx=seq_idx)
    for b, tokens in enumerate(documents(seq_idx, 2, 13)):
        for doc in {d for _, _, d in tokens}:
            pos = [t for t, _, d in tokens if d == doc]
            alone = fc.fftconv_torch(u[b : b + 1, :, pos], k, mode=mode, k_back=k_back)
            torch.testing.assert_close(packed[b : b + 1, :, pos], alone, rtol=1e-12, atol=1e-12)
    assert (packed.permute(0, 2, 1)[seq_idx < 0] == 0).all(), "padding outputs must be 0"


# -- errors, precision, layout helper -------------------------------------------------------------


def test_errors_name_the_problem():
    u, k = rand(0, 2, 3, 5), rand(1, 3, 4)
    with pytest.raises(ValueError, match=r"circular.*packed documents"):
        fc.fftconv_torch(u, k, mode="circular", seq_idx=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"k_back .* required by mode 'two_sided'"):
        fc.fftconv_torch(u, k, mode="two_sided")
    with pytest.raises(ValueError, match=r"k must be \(D, K\) = \(3, K\)"):
        fc.fftconv_reference(u, rand(1, 4, 4))
    with pytest.raises(ValueError, match="mode must be one of"):
        fc.fftconv_torch(u, k, mode="acausal")
    with pytest.raises(ValueError, match=r"seq_idx must be \(B, L\)"):
        fc.fftconv_torch(u, k, seq_idx=torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("mode", ["causal", "two_sided", "circular"])
def test_low_precision_inputs_are_computed_in_fp32(dtype, mode):
    """CPU rfft rejects bf16: the kernel upcasts, and the error is that of rounding the
    inputs and the output, not of a low-precision FFT."""
    u, k = rand(0, 2, 4, 300, dtype=dtype), rand(1, 4, 300, dtype=dtype) / 10
    k_back = rand(2, 4, 50, dtype=dtype) / 10 if mode == "two_sided" else None
    got = fc.fftconv_torch(u, k, mode=mode, k_back=k_back)
    assert got.dtype == dtype
    want = fc.fftconv_reference(
        u.double(), k.double(), mode=mode, k_back=None if k_back is None else k_back.double()
    )
    err = ((got.double() - want).norm() / want.norm()).item()
    unit = {torch.bfloat16: 2**-8, torch.float16: 2**-11, torch.float32: 2**-24}[dtype]
    bound = max(2 * unit, 1e-6)  # fp32: the FFT's own rounding, ~log2(n)·eps
    assert err < bound, f"{dtype}: relative error {err:.2e} vs output rounding {unit:.1e}"


@pytest.mark.parametrize("mode", ["causal", "two_sided", "circular"])
def test_bf16_gradients_are_computed_in_fp32(mode):
    """Gradients come back in each input's dtype, as accurate as their bf16 rounding."""
    u, k = rand(0, 2, 3, 200, dtype=torch.bfloat16), rand(1, 3, 150, dtype=torch.bfloat16) / 10
    k_back = rand(2, 3, 40, dtype=torch.bfloat16) / 10 if mode == "two_sided" else None
    _, got = outputs_and_grads(fc.fftconv_torch, u, k, k_back, mode=mode)
    wide = [None if t is None else t.double() for t in (u, k, k_back)]
    _, want = outputs_and_grads(fc.fftconv_reference, *wide, mode=mode)
    for name, a, b, leaf in zip(("du", "dk", "dk_back"), got, want, (u, k, k_back), strict=True):
        if leaf is None:
            continue
        assert a.dtype == leaf.dtype, name
        err = ((a.double() - b).norm() / b.norm()).item()
        assert err < 2 * 2**-8, f"{name}: relative error {err:.2e}"


def test_fp32_kernel_with_bf16_signal():
    u, k = rand(0, 1, 2, 17, dtype=torch.bfloat16), rand(1, 2, 17, dtype=torch.float32)
    got = fc.fftconv_torch(u, k)
    assert got.dtype == torch.bfloat16
    want = fc.fftconv_reference(u.double(), k.double())
    assert ((got.double() - want).norm() / want.norm()) < 2**-7


@pytest.mark.parametrize("per_sample", [False, True])
def test_heads_layout_convolves_each_column_alike(per_sample):
    B, L, H, P = 2, 9, 3, 4
    v = rand(0, B, L, H, P)
    k = rand(1, B, H, 5) if per_sample else rand(1, H, 5)
    seq_idx = torch.tensor([[0] * 4 + [1] * 5, [-1] * 2 + [3] * 7])
    got = fc.fftconv_heads(BackendPolicy("torch"), v, k, seq_idx=seq_idx)
    for p in range(P):
        col = fc.fftconv_reference(v[..., p].transpose(1, 2), k, seq_idx=seq_idx)
        torch.testing.assert_close(got[..., p], col.transpose(1, 2), rtol=1e-12, atol=1e-12)


def test_next_fast_size_is_the_smallest_5_smooth_size():
    def smooth(m: int) -> bool:
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        return m == 1

    for n in range(1, 3000):
        want = next(m for m in range(n, 2 * n + 2) if smooth(m))
        assert fc.next_fast_size(n) == want, n


def test_registered_with_reference_and_torch_and_auto_picks_torch():
    spec = kb.get_kernel("fftconv")
    assert {"reference", "torch"} <= set(spec.backends)
    chosen = BackendPolicy("auto").resolve("fftconv", torch.device("cpu"), torch.bfloat16)
    assert chosen.provider == "torch"
