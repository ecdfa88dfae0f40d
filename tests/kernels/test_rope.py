"""RoPE against a complex-number rotation, and document positions against a loop."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mixstack.blocks.rope import Rope, document_positions


def complex_rotation(x: torch.Tensor, positions: torch.Tensor, dim: int, theta: float):
    """Rotate-half RoPE as complex multiplication: z_m = x[m] + i·x[m + r/2] times
    exp(i·p·theta^(-2m/r)), frequencies from Python floats (fp64)."""
    half = dim // 2
    freqs = torch.tensor([theta ** (-2.0 * m / dim) for m in range(half)], dtype=torch.float64)
    pos = positions if positions.dim() == 2 else positions[None]
    angle = pos.double()[:, :, None, None] * freqs  # (B|1, L, 1, r/2)
    z = torch.complex(x[..., :half].double(), x[..., half:dim].double())
    z = z * torch.polar(torch.ones_like(angle), angle)
    return torch.cat((z.real, z.imag, x[..., dim:].double()), dim=-1)


@pytest.mark.parametrize(("head_dim", "dim"), [(8, 8), (10, 4), (6, 2)])
@pytest.mark.parametrize("theta", [10000.0, 50.0])
def test_matches_complex_rotation_fp64(head_dim: int, dim: int, theta: float) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 3, head_dim, generator=g, dtype=torch.float64)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [3, 0, 1, 900, 2, 17, 4]])
    got = Rope(dim=dim, theta=theta)(x, positions)
    torch.testing.assert_close(
        got, complex_rotation(x, positions, dim, theta), rtol=1e-12, atol=1e-12
    )
    # partial rotary: channels >= dim pass through untouched
    assert torch.equal(got[..., dim:], x[..., dim:])


@pytest.mark.parametrize(("head_dim", "dim"), [(8, 8), (10, 4)])
def test_gradient_matches_complex_rotation_fp64(head_dim: int, dim: int) -> None:
    """RoPE's written-out backward (the inverse rotation) against autograd through the
    complex-number rotation, for a non-contiguous input (a transposed projection)."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(2, 3, 7, head_dim, generator=g, dtype=torch.float64)
    base.requires_grad_(True)
    x = base.transpose(1, 2)  # (B, L, H, P), not contiguous
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [3, 0, 1, 900, 2, 17, 4]])
    cot = torch.randn(2, 7, 3, head_dim, generator=g, dtype=torch.float64)
    (got,) = torch.autograd.grad((Rope(dim=dim)(x, positions) * cot).sum(), base)
    (expected,) = torch.autograd.grad(
        (complex_rotation(x, positions, dim, 10000.0) * cot).sum(), base
    )
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_shared_positions_broadcast_over_batch_and_fp32_accuracy() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 2, 8, generator=g)
    positions = torch.arange(5) + 40
    got = Rope(dim=8)(x, positions)
    assert got.dtype == torch.float32
    torch.testing.assert_close(
        got.double(), complex_rotation(x, positions, 8, 1e4), rtol=1e-5, atol=1e-5
    )


def test_angles_are_computed_in_fp32_then_cast_for_bf16() -> None:
    positions = torch.tensor([[3000, 4097, 12345]])
    rope = Rope(dim=4, theta=10000.0)
    cos, sin = rope.cos_sin(positions, torch.bfloat16)
    inv_freq = torch.tensor([1.0, 10000.0**-0.5], dtype=torch.float32)
    angles = positions.float()[..., None] * inv_freq
    assert cos.dtype == torch.bfloat16
    assert torch.equal(cos, angles.cos().bfloat16())
    assert torch.equal(sin, angles.sin().bfloat16())
    # what computing the angle in bf16 would give is far off at these positions
    bf16_angles = positions.bfloat16()[..., None] * inv_freq.bfloat16()
    assert (bf16_angles.float().cos() - angles.cos()).abs().max() > 0.1


def test_dot_product_depends_only_on_position_difference() -> None:
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 1, 1, 16, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, 1, 16, generator=g, dtype=torch.float64)
    rope = Rope(dim=12, theta=100.0)

    def score(pq: int, pk: int) -> float:
        rq = rope(q, torch.tensor([pq]))
        rk = rope(k, torch.tensor([pk]))
        return float((rq * rk).sum())

    for delta in (0, 1, 5, 37):
        reference = score(delta, 0)
        for shift in (1, 13, 250):
            assert math.isclose(score(delta + shift, shift), reference, rel_tol=1e-10)
    assert not math.isclose(score(3, 0), score(4, 0), rel_tol=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"dim": 7}, "even number"), ({"dim": 0}, "even number"), ({"dim": 4, "theta": 0.0}, "> 0")],
)
def test_bad_rope_parameters(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Rope(**kwargs)


def test_rope_dim_larger_than_head_dim() -> None:
    with pytest.raises(ValueError, match="exceeds the head dim 4"):
        Rope(dim=8)(torch.zeros(1, 2, 1, 4), torch.arange(2))


def test_works_on_meta_device() -> None:
    out = Rope(dim=4)(torch.empty(2, 3, 1, 8, device="meta"), torch.arange(3, device="meta"))
    assert out.shape == (2, 3, 1, 8) and out.is_meta


def loop_positions(row: list[int], start_id: int, start_pos: int):
    prev, nxt, out = start_id, start_pos, []
    for s in row:
        if s < 0:
            out.append(0)
            continue
        if s != prev:
            nxt = 0
        out.append(nxt)
        nxt, prev = nxt + 1, s
    return out, prev, nxt


def test_document_positions_examples() -> None:
    seq = torch.tensor([[0, 0, 0, 1, 1, 2], [-1, -1, 4, 4, 4, -1], [7, 7, -1, 7, 8, 8]])
    positions, last_id, next_pos = document_positions(seq)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0], [0, 0, 0, 1, 2, 0], [0, 1, 0, 2, 0, 1]]
    assert last_id.tolist() == [2, 4, 8] and next_pos.tolist() == [1, 3, 2]


@st.composite
def packed_rows(draw: st.DrawFn) -> tuple[list[list[int]], list[int], list[int]]:
    """Rows of document ids (-1 = padding) plus what a cache held before them."""
    B, L = draw(st.integers(1, 4)), draw(st.integers(1, 12))
    rows = [draw(st.lists(st.integers(-1, 2), min_size=L, max_size=L)) for _ in range(B)]
    start_ids = draw(st.lists(st.integers(-1, 2), min_size=B, max_size=B))
    start_pos = draw(st.lists(st.integers(0, 20), min_size=B, max_size=B))
    return rows, start_ids, start_pos


@given(packed_rows())
def test_document_positions_match_loop(case) -> None:
    rows, start_ids, start_pos = case
    positions, last_id, next_pos = document_positions(
        torch.tensor(rows), start_id=torch.tensor(start_ids), start_pos=torch.tensor(start_pos)
    )
    for b, row in enumerate(rows):
        want, want_id, want_next = loop_positions(row, start_ids[b], start_pos[b])
        assert positions[b].tolist() == want
        assert (int(last_id[b]), int(next_pos[b])) == (want_id, want_next)
