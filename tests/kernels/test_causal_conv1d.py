"""Short depthwise convolutions: causal (with decode state) and centred (Hydra).

Independent checks: ``torch.nn.Conv1d`` (PyTorch's own module) for plain calls, each
document convolved alone for packed calls, and the explicit-loop ``reference`` backend
for gradients.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixstack.kernels import causal_conv1d as cc

F64 = torch.float64


def _rand(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _torch_module_conv(x, weight, bias, padding, keep):
    """nn.Conv1d(groups=C) as PyTorch defines it; keeps the first ``keep`` outputs."""
    channels, width = weight.shape
    conv = torch.nn.Conv1d(
        channels,
        channels,
        width,
        groups=channels,
        padding=padding,
        bias=bias is not None,
        dtype=F64,
    )
    with torch.no_grad():
        conv.weight.copy_(weight[:, None, :])
        if bias is not None:
            conv.bias.copy_(bias)
    return conv(x.transpose(1, 2))[..., :keep].transpose(1, 2)


PACKED_ROWS = [[(-1, 2), (0, 5), (1, 1), (2, 9)], [(4, 11), (-1, 3), (5, 3)]]


def _packed_ids(rows):
    return torch.tensor([[sid for sid, n in row for _ in range(n)] for row in rows])


# -- causal ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [cc.causal_conv1d_torch, cc.causal_conv1d_reference])
@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("with_bias", [False, True])
def test_causal_matches_nn_conv1d(fn, width, with_bias):
    x, w = _rand(0, 2, 9, 5), _rand(1, 5, width)
    b = _rand(2, 5) if with_bias else None
    expected = _torch_module_conv(x, w, b, padding=width - 1, keep=9)
    torch.testing.assert_close(fn(x, w, b), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        fn(x, w, b, activation="silu"), F.silu(expected), rtol=1e-12, atol=1e-12
    )


def _causal_alone(x, w, b, rows, initial):
    """Each document of each row convolved alone (first document from ``initial``)."""
    y = torch.zeros_like(x)
    for r, row in enumerate(rows):
        start, first = 0, True
        for sid, n in row:
            if sid >= 0:
                init = initial[r : r + 1] if first else None
                y[r, start : start + n] = cc.causal_conv1d_reference(
                    x[r : r + 1, start : start + n], w, b, activation="silu", initial_state=init
                )[0]
                first = False
            start += n
    return y


@pytest.mark.parametrize("fn", [cc.causal_conv1d_torch, cc.causal_conv1d_reference])
def test_causal_packed_equals_separate(fn):
    seq_idx = _packed_ids(PACKED_ROWS)  # (2, 17)
    x, w, b, init = _rand(3, 2, 17, 4), _rand(4, 4, 4), _rand(5, 4), _rand(6, 2, 4, 4)
    y = fn(x, w, b, activation="silu", seq_idx=seq_idx, initial_state=init)
    torch.testing.assert_close(y, _causal_alone(x, w, b, PACKED_ROWS, init), rtol=1e-12, atol=1e-12)
    assert (y[seq_idx < 0] == 0).all()
    x2 = x.clone()
    x2[seq_idx < 0] = 1e3  # padding inputs are never seen
    torch.testing.assert_close(
        fn(x2, w, b, activation="silu", seq_idx=seq_idx, initial_state=init), y, rtol=0, atol=0
    )


def test_causal_gradients_match_reference():
    seq_idx = _packed_ids(PACKED_ROWS)
    leaves = [_rand(7, 2, 17, 3), _rand(8, 3, 4), _rand(9, 3), _rand(10, 2, 3, 4)]
    for t in leaves:
        t.requires_grad_(True)
    weight = _rand(11, 2, 17, 3)
    out = {}
    for fn in (cc.causal_conv1d_torch, cc.causal_conv1d_reference):
        x, w, b, init = leaves
        y, final = fn(
            x, w, b, activation="silu", seq_idx=seq_idx, initial_state=init, return_final_state=True
        )
        out[fn] = torch.autograd.grad((y * weight).sum() + final.sum(), leaves)
    for a, b in zip(*out.values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_causal_unpacked_gradients_match_reference(width, with_bias, activation):
    """The unpacked torch path has a hand-written backward (time-major shifted products):
    gradients of x, weight, bias and the initial state against the explicit loops."""
    leaves = [_rand(50, 2, 13, 3), _rand(51, 3, width), _rand(53, 2, 3, width)]
    if with_bias:
        leaves.append(_rand(52, 3))
    for t in leaves:
        t.requires_grad_(True)
    cot, cot_state = _rand(54, 2, 13, 3), _rand(55, 2, 3, width)
    out = []
    for fn in (cc.causal_conv1d_torch, cc.causal_conv1d_reference):
        x, w, init = leaves[:3]
        b = leaves[3] if with_bias else None
        y, final = fn(x, w, b, activation=activation, initial_state=init, return_final_state=True)
        loss = (y * cot).sum() + (final * cot_state).sum()
        # K = 1: the initial state is never read (no history column), its gradient is 0
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        out.append(
            (
                y,
                [
                    torch.zeros_like(t) if g is None else g
                    for g, t in zip(grads, leaves, strict=True)
                ],
            )
        )
    (y_t, g_t), (y_r, g_r) = out
    torch.testing.assert_close(y_t, y_r, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_t, g_r, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_fp32_weight_and_bias_gradients_stay_close_to_fp64_at_long_length():
    """The weight and bias gradients are sums over B·L = 2·2048 products, taken in fp32
    (torch's blocked CPU sum): within 1e-6 of the same torch path in float64, relative
    to each tensor's scale."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 2048, 6, generator=g)
    w, b = torch.randn(6, 4, generator=g), torch.randn(6, generator=g)
    cot = torch.randn(2, 2048, 6, generator=g)
    grads = {}
    for dtype in (torch.float32, torch.float64):
        leaves = [t.to(dtype).requires_grad_() for t in (x, w, b)]
        y = cc.causal_conv1d_torch(*leaves, activation="silu")
        grads[dtype] = torch.autograd.grad(y, leaves, cot.to(dtype))
    for lo, hi in zip(grads[torch.float32], grads[torch.float64], strict=True):
        assert ((lo.double() - hi).abs().max() / hi.abs().max()).item() < 1e-6


@pytest.mark.parametrize("prefill", [1, 2, 3, 5])
@pytest.mark.parametrize("fn", [cc.causal_conv1d_torch, cc.causal_conv1d_reference])
def test_decode_after_prefill_equals_forward(prefill, fn):
    x, w, b = _rand(12, 2, 11, 6), _rand(13, 6, 4), _rand(14, 6)
    full = fn(x, w, b, activation="silu")
    y, state = fn(x[:, :prefill], w, b, activation="silu", return_final_state=True)
    # The state is the last K pre-conv inputs, zero-left-padded when prefill < K.
    expected_state = F.pad(x[:, :prefill].transpose(1, 2), (4, 0))[..., -4:]
    torch.testing.assert_close(state, expected_state, rtol=0, atol=0)
    steps = [
        cc.causal_conv1d_update(x[:, t], state, w, b, activation="silu") for t in range(prefill, 11)
    ]
    torch.testing.assert_close(
        torch.cat([y, torch.stack(steps, 1)], 1), full, rtol=1e-12, atol=1e-12
    )


def test_backward_through_steps_equals_the_forward():
    """The update overwrites conv_state in place at every step; autograd must still see
    the values it used: gradients of steps after a prefill equal the full forward's."""
    x, w, b, cot = _rand(40, 2, 9, 3), _rand(41, 3, 4), _rand(42, 3), _rand(43, 2, 9, 3)
    grads = {}
    for mode in ("forward", "steps"):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        xs, ws, bs = leaves
        if mode == "forward":
            y = cc.causal_conv1d_torch(xs, ws, bs, activation="silu")
        else:
            y0, state = cc.causal_conv1d_torch(
                xs[:, :3], ws, bs, activation="silu", return_final_state=True
            )
            steps = [
                cc.causal_conv1d_update(xs[:, t], state, ws, bs, activation="silu")
                for t in range(3, 9)
            ]
            y = torch.cat([y0, torch.stack(steps, 1)], 1)
        grads[mode] = torch.autograd.grad((y * cot).sum(), leaves)
    for a, b_ in zip(grads["steps"], grads["forward"], strict=True):
        torch.testing.assert_close(a, b_, rtol=1e-12, atol=1e-12)


def test_chunked_prefill_continues_from_state():
    x, w = _rand(15, 1, 12, 3), _rand(16, 3, 4)
    full, full_state = cc.causal_conv1d_torch(x, w, return_final_state=True)
    y1, state = cc.causal_conv1d_torch(x[:, :2], w, return_final_state=True)
    y2, state = cc.causal_conv1d_torch(x[:, 2:], w, initial_state=state, return_final_state=True)
    torch.testing.assert_close(torch.cat([y1, y2], 1), full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, full_state, rtol=0, atol=0)


@pytest.mark.parametrize("fn", [cc.causal_conv1d_torch, cc.causal_conv1d_reference])
def test_final_state_of_packed_row_is_its_last_document(fn):
    seq_idx = torch.tensor([[0] * 6 + [1] * 2 + [-1]])
    x, w = _rand(17, 1, 9, 2), _rand(18, 2, 4)
    _, state = fn(x, w, seq_idx=seq_idx, return_final_state=True)
    # The last K tokens are x4, x5 (document 0: zeroed), x6, x7; the trailing pad is skipped.
    zero = torch.zeros(2, dtype=F64)
    expected = torch.stack([zero, zero, x[0, 6], x[0, 7]], dim=-1)
    torch.testing.assert_close(state[0], expected, rtol=0, atol=0)
    # Decoding continues document 1 as a longer forward would.
    nxt = _rand(19, 1, 1, 2)
    y_step = cc.causal_conv1d_update(nxt[:, 0], state, w)
    ids = torch.cat([seq_idx, torch.tensor([[1]])], 1)
    full = fn(torch.cat([x, nxt], 1), w, seq_idx=ids)
    torch.testing.assert_close(y_step, full[:, -1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "fn",
    [
        cc.causal_conv1d_torch,
        cc.causal_conv1d_reference,
        cc.centered_conv1d_torch,
        cc.centered_conv1d_reference,
    ],
)
def test_padding_inside_a_document_is_transparent(fn):
    seq_idx = torch.tensor([[3] * 4 + [-1] * 2 + [3] * 5])
    x, w, b = _rand(32, 1, 11, 2), _rand(33, 2, 3), _rand(34, 2)
    y = fn(x, w, b, seq_idx=seq_idx)
    keep = seq_idx[0] >= 0
    torch.testing.assert_close(y[:, keep], fn(x[:, keep], w, b), rtol=1e-12, atol=1e-12)
    assert (y[:, ~keep] == 0).all()


def test_bf16_is_computed_in_fp32():
    x, w = _rand(20, 2, 9, 4).float(), _rand(21, 4, 4).float()
    y = cc.causal_conv1d_torch(x.bfloat16(), w.bfloat16(), activation="silu")
    expected = cc.causal_conv1d_torch(x.bfloat16().float(), w.bfloat16().float(), activation="silu")
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected, rtol=1e-2, atol=1e-2)


# -- centred ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [cc.centered_conv1d_torch, cc.centered_conv1d_reference])
@pytest.mark.parametrize("width", [1, 3, 7])
def test_centered_matches_nn_conv1d_same_padding(fn, width):
    x, w, b = _rand(22, 2, 5, 3), _rand(23, 3, width), _rand(24, 3)
    expected = _torch_module_conv(x, w, b, padding=width // 2, keep=5)
    torch.testing.assert_close(fn(x, w, b), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fn", [cc.centered_conv1d_torch, cc.centered_conv1d_reference])
def test_centered_packed_equals_separate(fn):
    seq_idx = _packed_ids(PACKED_ROWS)
    x, w, b = _rand(25, 2, 17, 4), _rand(26, 4, 5), _rand(27, 4)
    y = fn(x, w, b, activation="silu", seq_idx=seq_idx)
    expected = torch.zeros_like(x)
    for r, row in enumerate(PACKED_ROWS):
        start = 0
        for sid, n in row:
            if sid >= 0:
                sl = slice(start, start + n)
                expected[r, sl] = F.silu(_torch_module_conv(x[r : r + 1, sl], w, b, 2, n))[0]
            start += n
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


def test_centered_gradients_match_reference():
    seq_idx = _packed_ids(PACKED_ROWS)
    leaves = [_rand(28, 2, 17, 3), _rand(29, 3, 3), _rand(30, 3)]
    for t in leaves:
        t.requires_grad_(True)
    weight = _rand(31, 2, 17, 3)
    grads = [
        torch.autograd.grad((fn(*leaves, seq_idx=seq_idx) * weight).sum(), leaves)
        for fn in (cc.centered_conv1d_torch, cc.centered_conv1d_reference)
    ]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("width", [1, 3, 5])
def test_centered_unpacked_gradients_match_reference(width):
    leaves = [_rand(56, 2, 11, 4), _rand(57, 4, width), _rand(58, 4)]
    for t in leaves:
        t.requires_grad_(True)
    cot = _rand(59, 2, 11, 4)
    grads = [
        torch.autograd.grad((fn(*leaves, activation="silu") * cot).sum(), leaves)
        for fn in (cc.centered_conv1d_torch, cc.centered_conv1d_reference)
    ]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_centered_refuses_even_width():
    for fn in (cc.centered_conv1d_torch, cc.centered_conv1d_reference):
        with pytest.raises(ValueError, match=r"odd kernel width.*K=4"):
            fn(torch.zeros(1, 5, 2), torch.zeros(2, 4))


# -- registration and argument checks ----------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weight": torch.zeros(3, 4)}, r"weight \(C, K\); got \(1, 5, 2\) and \(3, 4\)"),
        ({"bias": torch.zeros(3)}, r"bias must be \(C,\)"),
        ({"activation": "relu"}, "activation must be None or 'silu'"),
        ({"seq_idx": torch.zeros(1, 4, dtype=torch.long)}, "seq_idx must be"),
        ({"initial_state": torch.zeros(1, 2, 3)}, r"initial_state must be \(B, C, K\)"),
    ],
)
def test_causal_argument_errors(kwargs, message):
    args = {"x": torch.zeros(1, 5, 2), "weight": torch.zeros(2, 4), **kwargs}
    for fn in (cc.causal_conv1d_torch, cc.causal_conv1d_reference):
        with pytest.raises(ValueError, match=message):
            fn(**args)


def test_update_argument_errors():
    with pytest.raises(ValueError, match=r"conv_state \(B, C, K\)"):
        cc.causal_conv1d_update(torch.zeros(1, 2), torch.zeros(1, 2, 3), torch.zeros(2, 4))
