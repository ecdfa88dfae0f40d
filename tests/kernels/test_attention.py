"""The attention kernel against a per-query loop written from the visibility rule.

Every backend is compared in fp64 (outputs and gradients of q, k, v) with ``naive``,
which enumerates the visible keys of each query explicitly and maps query head h to
KV head ``h // (H / Hkv)``; nothing is shared with the kernel module.
"""

from __future__ import annotations

import math

import pytest
import torch

from mixstack.kernels.attention import attention_reference, attention_torch
from mixstack.kernels.backends import BackendPolicy, get_kernel
from tests.kernels.parity_cases import attention_cases

BACKENDS = {"reference": attention_reference, "torch": attention_torch}


def naive(
    q, k, v, *, causal, window=None, scale=None, q_positions=None, q_seq_idx=None, k_seq_idx=None
):
    B, Lq, H, P = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(P) if scale is None else scale
    kv_head = torch.arange(H) // (H // Hkv)
    rows = []
    for b in range(B):
        for i in range(Lq):
            if q_positions is None:
                pos = Lk - Lq + i
            else:
                pos = int((q_positions if q_positions.dim() == 1 else q_positions[b])[i])
            visible = [
                j
                for j in range(Lk)
                if (not causal or j <= pos)
                and (window is None or pos - j < window)
                and (
                    q_seq_idx is None
                    or (q_seq_idx[b, i] == k_seq_idx[b, j] and k_seq_idx[b, j] >= 0)
                )
            ]
            if not visible:
                rows.append(torch.zeros(H, v.shape[-1], dtype=v.dtype))
                continue
            keys = k[b, visible][:, kv_head]  # (n, H, P)
            values = v[b, visible][:, kv_head]  # (n, H, Pv)
            scores = torch.einsum("hp,nhp->hn", q[b, i], keys) * scale
            weights = torch.exp(scores - scores.max(dim=1, keepdim=True).values)
            weights = weights / weights.sum(dim=1, keepdim=True)
            rows.append(torch.einsum("hn,nhp->hp", weights, values))
    return torch.stack(rows).view(B, Lq, H, -1)


def ids(*rows: list[tuple[int, int]]) -> torch.Tensor:
    """ids([(seq, n), ...], ...) -> (B, L) sequence ids."""
    return torch.tensor([[s for s, n in row for _ in range(n)] for row in rows])


PACKED = ids([(-1, 2), (0, 3), (1, 4)], [(5, 4), (6, 3), (-1, 2)])  # (2, 9)
CACHE_IDS = ids([(0, 5), (1, 5)], [(-1, 3), (2, 7)])  # (2, 10)

# name: (B, Lq, Lk, H, Hkv, P, Pv, options)
CASES = {
    "causal": (2, 9, 9, 4, 4, 8, 8, {"causal": True}),
    "bidirectional": (2, 9, 9, 4, 4, 8, 8, {"causal": False}),
    "gqa-odd-dims": (2, 7, 7, 6, 2, 5, 3, {"causal": True}),
    "mqa": (1, 8, 8, 4, 1, 6, 6, {"causal": True}),
    "window": (2, 11, 11, 4, 2, 4, 4, {"causal": True, "window": 3}),
    "window-1": (1, 5, 5, 2, 2, 4, 4, {"causal": True, "window": 1}),
    "window-over-length": (1, 5, 5, 2, 2, 4, 4, {"causal": True, "window": 50}),
    "packed-padding": (
        2, 9, 9, 4, 2, 4, 4, {"causal": True, "q_seq_idx": PACKED, "k_seq_idx": PACKED}
    ),
    "packed-bidirectional": (
        2, 9, 9, 2, 1, 4, 4, {"causal": False, "q_seq_idx": PACKED, "k_seq_idx": PACKED}
    ),
    "packed-window": (
        2, 9, 9, 2, 2, 4, 4,
        {"causal": True, "window": 2, "q_seq_idx": PACKED, "k_seq_idx": PACKED},
    ),
    "cached-prefill": (2, 3, 10, 4, 2, 4, 4, {"causal": True}),
    "cached-one-query": (2, 1, 10, 4, 2, 4, 4, {"causal": True}),
    "cached-window-one-query": (2, 1, 10, 4, 2, 4, 4, {"causal": True, "window": 4}),
    "cached-packed": (
        2, 4, 10, 4, 2, 4, 4,
        {"causal": True, "q_seq_idx": CACHE_IDS[:, 6:], "k_seq_idx": CACHE_IDS},
    ),
    "more-queries-than-keys": (1, 6, 4, 2, 2, 4, 4, {"causal": True}),
    "explicit-positions": (
        2, 4, 6, 2, 2, 4, 4,
        {"causal": True, "q_positions": torch.tensor([[0, 2, 2, 5], [5, 1, -1, 3]])},
    ),
    "shared-positions-scale": (
        1, 3, 6, 2, 1, 4, 4,
        {"causal": True, "q_positions": torch.tensor([1, 3, 4]), "scale": 0.7},
    ),
    "one-token": (3, 1, 1, 2, 2, 4, 4, {"causal": True}),
}  # fmt: skip


def make_inputs(case: str, dtype: torch.dtype = torch.float64, seed: int = 0):
    B, Lq, Lk, H, Hkv, P, Pv, options = CASES[case]
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Lq, H, P, generator=g, dtype=dtype) * 1.5
    k = torch.randn(B, Lk, Hkv, P, generator=g, dtype=dtype) * 1.5
    v = torch.randn(B, Lk, Hkv, Pv, generator=g, dtype=dtype)
    return q, k, v, dict(options)


def outputs_and_grads(fn, q, k, v, options, cotangent):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, **options)
    (out * cotangent).sum().backward()
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_naive_outputs_and_grads_fp64(backend: str, case: str) -> None:
    q, k, v, options = make_inputs(case)
    B, Lq, H, _ = q.shape
    cotangent = torch.randn(B, Lq, H, v.shape[-1], generator=torch.Generator().manual_seed(1),
                            dtype=torch.float64)  # fmt: skip
    want, want_grads = outputs_and_grads(naive, q, k, v, options, cotangent)
    got, got_grads = outputs_and_grads(BACKENDS[backend], q, k, v, options, cotangent)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for name, g_got, g_want in zip("qkv", got_grads, want_grads, strict=True):
        torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-12, msg=f"d{name}")


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_queries_without_visible_keys_output_zero_with_zero_finite_grads(backend: str) -> None:
    seq = ids([(-1, 3), (0, 4)], [(1, 2), (-1, 5)])  # padding queries see nothing
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 7, 2, 4, generator=g, dtype=torch.float64) for _ in range(3))
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = BACKENDS[backend](*leaves, causal=True, q_seq_idx=seq, k_seq_idx=seq)
    out.square().sum().backward()
    padding = seq < 0
    assert torch.equal(out[padding], torch.zeros_like(out[padding]))
    assert out[~padding].abs().min() > 0
    for t in leaves:
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[padding], torch.zeros_like(q.grad[padding]))
    # padding keys are never attended, so they receive no gradient either
    assert torch.equal(k.grad[padding], torch.zeros_like(k.grad[padding]))
    assert torch.equal(v.grad[padding], torch.zeros_like(v.grad[padding]))


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("case", ["causal", "gqa-odd-dims", "packed-padding", "cached-packed"])
def test_bf16_is_close_to_fp32(backend: str, case: str) -> None:
    q, k, v, options = make_inputs(case, dtype=torch.float32, seed=5)
    fn = BACKENDS[backend]
    want = fn(q, k, v, **options)
    got = fn(q.bfloat16(), k.bfloat16(), v.bfloat16(), **options)
    assert got.dtype == torch.bfloat16
    assert torch.isfinite(got).all()
    err = (got.float() - want).norm() / want.norm()
    assert err < 2e-2, f"relative error {err:.3g}"


def test_torch_backend_is_bottom_right_aligned_not_top_left() -> None:
    # docs/math.md#pitfalls: SDPA's is_causal with Lq < Lk would let the one query see only key 0.
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 1, 1, 4, generator=g)
    k = torch.randn(1, 6, 1, 4, generator=g)
    v = torch.arange(6.0).view(1, 6, 1, 1)
    out = attention_torch(q, k, v, causal=True)
    weights = torch.softmax((k[0, :, 0] @ q[0, 0, 0]) / 2.0, dim=0)
    torch.testing.assert_close(out.view(()), weights @ torch.arange(6.0))


@pytest.mark.parametrize(
    ("shapes", "kwargs", "message"),
    [
        (((1, 3, 4, 8), (1, 3, 3, 8), (1, 3, 3, 8)), {}, "not a multiple of 3 KV heads"),
        (((1, 3, 4, 8), (1, 3, 2, 6), (1, 3, 2, 8)), {}, "shapes disagree"),
        (((1, 3, 4, 8), (1, 3, 2, 8), (1, 4, 2, 8)), {}, "shapes disagree"),
        (((1, 3, 4, 8), (1, 3, 2, 8)), {}, "expects q"),
        (((1, 3, 4, 8), (1, 3, 2, 8), (1, 3, 2, 8)), {"window": 0}, "window must be >= 1"),
        (
            ((1, 3, 4, 8), (1, 3, 2, 8), (1, 3, 2, 8)),
            {"q_seq_idx": torch.zeros(1, 3, dtype=torch.long)},
            "both q_seq_idx and k_seq_idx",
        ),
    ],
)
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_bad_inputs_raise_clear_errors(backend, shapes, kwargs, message) -> None:
    tensors = [torch.zeros(s) for s in shapes]
    if len(tensors) == 2:
        tensors.append(torch.zeros(1, 3, 2, 8, 1))
    with pytest.raises(ValueError, match=message):
        BACKENDS[backend](*tensors, causal=True, **kwargs)


def test_dtype_mismatch_is_refused() -> None:
    q = torch.zeros(1, 2, 2, 4)
    with pytest.raises(ValueError, match="dtypes differ"):
        attention_torch(q, q.double(), q, causal=False)


def test_registered_backends_and_auto_choice() -> None:
    spec = get_kernel("attention")
    assert {"reference", "torch"} <= set(spec.backends)
    assert spec.backends["reference"].fn is attention_reference
    assert BackendPolicy().resolve("attention", torch.device("cpu"), torch.float32).fn is (
        attention_torch
    )
    cases = attention_cases()
    assert any(c.get("q_seq_idx") is not None for c in cases)
    assert any(c["q"].shape[1] < c["k"].shape[1] for c in cases)
    assert any(c["q"].shape[2] != c["k"].shape[2] for c in cases)
    assert any(c.get("window") for c in cases) and any(not c["causal"] for c in cases)
