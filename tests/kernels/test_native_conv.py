"""The ``native`` short convolutions (``kernels/csrc/conv.c``) against the explicit-loop
``reference`` backend run in float64, the arbiter: outputs and every gradient, at sizes
that take the four-vector forward blocks, the single vectors and the channel tails
(C = 16·4 + 5 = 69: one full block of 64 channels, then 5)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixstack.kernels import causal_conv1d as cc
from mixstack.kernels import native
from mixstack.kernels.backends import BackendPolicy
from tests.kernels.native_builds import portable_build

F64 = torch.float64
REASON = native.unavailable("conv")
needs_native = pytest.mark.skipif(REASON is not None, reason=f"no native provider: {REASON}")


def _rand(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max error relative to the reference's max magnitude (0 for two zero tensors)."""
    return ((got.double() - want).abs().max() / want.abs().max().clamp(min=1e-300)).item()


def _outputs_and_grads(fn, leaves: dict, cots: list, dtype: torch.dtype, **kwargs) -> list:
    """Outputs of ``fn`` on ``leaves`` cast to ``dtype``, then the gradients of
    Σ out·cot with respect to every leaf (zeros for an unused one)."""
    cast = {k: v.to(dtype).requires_grad_() if v is not None else None for k, v in leaves.items()}
    out = fn(**cast, **kwargs)
    outs = list(out) if isinstance(out, tuple) else [out]
    loss = sum((o * c.to(dtype)).sum() for o, c in zip(outs, cots, strict=True))
    used = [v for v in cast.values() if v is not None]
    grads = torch.autograd.grad(loss, used, allow_unused=True)
    return [o.detach() for o in outs] + [
        torch.zeros_like(v) if g is None else g for g, v in zip(grads, used, strict=True)
    ]


@needs_native
@pytest.mark.parametrize("width", [4, 3])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_causal_native_matches_float64_reference(width, activation, with_bias, with_state):
    bsz, length, channels = 2, 37, 16 * 4 + 5
    leaves = {
        "x": _rand(0, bsz, length, channels),
        "weight": _rand(1, channels, width),
        "bias": _rand(2, channels) if with_bias else None,
        "initial_state": _rand(3, bsz, channels, width) if with_state else None,
    }
    cots = [_rand(4, bsz, length, channels), _rand(5, bsz, channels, width)]
    kwargs = {"activation": activation, "return_final_state": True}
    want = _outputs_and_grads(cc.causal_conv1d_reference, leaves, cots, F64, **kwargs)
    got = _outputs_and_grads(cc.causal_conv1d_native, leaves, cots, torch.float32, **kwargs)
    names = ["y", "final_state", *(k for k, v in leaves.items() if v is not None)]
    for name, a, b in zip(names, got, want, strict=True):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        assert _rel(a, b) < 2e-6, f"{name}: {_rel(a, b):.2e}"


@needs_native
@pytest.mark.parametrize(("length", "width"), [(2, 4), (1, 2), (5, 1)])
def test_causal_native_short_rows_and_unit_width(length, width):
    """L < K (every output reads the state; the state's gradient gets several taps) and
    K = 1 (no state column read)."""
    leaves = {
        "x": _rand(10, 2, length, 21),
        "weight": _rand(11, 21, width),
        "bias": _rand(12, 21),
        "initial_state": _rand(13, 2, 21, width),
    }
    cots = [_rand(14, 2, length, 21), _rand(15, 2, 21, width)]
    kwargs = {"activation": "silu", "return_final_state": True}
    want = _outputs_and_grads(cc.causal_conv1d_reference, leaves, cots, F64, **kwargs)
    got = _outputs_and_grads(cc.causal_conv1d_native, leaves, cots, torch.float32, **kwargs)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert _rel(a, b) < 2e-6, f"item {i}: {_rel(a, b):.2e}"


@needs_native
@pytest.mark.parametrize("width", [7, 3, 1])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_centered_native_matches_float64_reference(width, activation):
    leaves = {
        "x": _rand(20, 2, 37, 16 * 4 + 5),
        "weight": _rand(21, 69, width),
        "bias": _rand(22, 69),
    }
    cots = [_rand(23, 2, 37, 69)]
    want = _outputs_and_grads(
        cc.centered_conv1d_reference, leaves, cots, F64, activation=activation
    )
    got = _outputs_and_grads(
        cc.centered_conv1d_native, leaves, cots, torch.float32, activation=activation
    )
    for name, a, b in zip(["y", "x", "weight", "bias"], got, want, strict=True):
        assert _rel(a, b) < 2e-6, f"{name}: {_rel(a, b):.2e}"


@needs_native
def test_centered_native_width_above_length():
    """K > L: most taps of every output fall on the zero rows of both sides."""
    leaves = {"x": _rand(24, 1, 2, 18), "weight": _rand(25, 18, 7), "bias": None}
    cots = [_rand(26, 1, 2, 18)]
    want = _outputs_and_grads(cc.centered_conv1d_reference, leaves, cots, F64)
    got = _outputs_and_grads(cc.centered_conv1d_native, leaves, cots, torch.float32)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert _rel(a, b) < 2e-6, f"item {i}: {_rel(a, b):.2e}"


@needs_native
def test_weight_and_bias_gradients_at_long_length_are_float64_accurate():
    """The sums over B·L = 2·2048 (float tiles of 64 steps, then double) against the
    torch path in float64, relative to each tensor's scale: 1.9e-7 for the weight and
    bias gradients (the float32 rounding of the inputs and of g; torch's float32 path:
    2.6e-7), elementwise outputs and input gradients 1.2e-7 and 3.3e-7."""
    leaves = {"x": _rand(30, 2, 2048, 70), "weight": _rand(31, 70, 4), "bias": _rand(32, 70)}
    cots = [_rand(33, 2, 2048, 70)]
    want = _outputs_and_grads(cc.causal_conv1d_torch, leaves, cots, F64, activation="silu")
    got = _outputs_and_grads(
        cc.causal_conv1d_native, leaves, cots, torch.float32, activation="silu"
    )
    bounds = {"y": 5e-7, "x": 5e-7, "weight": 2.5e-7, "bias": 2.5e-7}
    for (name, bound), a, b in zip(bounds.items(), got, want, strict=True):
        assert _rel(a, b) < bound, f"{name}: {_rel(a, b):.2e}"


@needs_native
def test_strided_input_is_read_in_place_and_threads_do_not_change_results():
    """x as a slice of a wider projection (channels contiguous, rows 300 apart), as
    Mamba-2's xBC: same values as the contiguous copy, and bit for bit the same under
    one and two threads (each channel block is one thread's, in one order)."""
    wide = _rand(40, 2, 50, 300).float()
    weight, bias, cot = _rand(41, 200, 4).float(), _rand(42, 200).float(), _rand(43, 2, 50, 200)
    runs = []
    threads = torch.get_num_threads()
    try:
        for n, x in [(1, wide[:, :, 20:220]), (2, wide[:, :, 20:220]), (1, wide[..., 20:220] * 1)]:
            torch.set_num_threads(n)
            leaf = x.detach().requires_grad_()
            w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
            y = cc.causal_conv1d_native(leaf, w, b, activation="silu")
            runs.append([y, *torch.autograd.grad(y, [leaf, w, b], cot.float())])
    finally:
        torch.set_num_threads(threads)
    assert runs[0][0].is_contiguous()
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert torch.equal(a, b)


@needs_native
def test_weight_gradients_alone_when_x_and_state_need_none():
    """The backward skips the x and state rows it is not asked for (nothing written
    there); the weight and bias sums are unchanged."""
    x, state, cot = _rand(60, 2, 21, 69), _rand(61, 2, 69, 4), _rand(62, 2, 21, 69)
    grads = {}
    for fn, dtype in [(cc.causal_conv1d_reference, F64), (cc.causal_conv1d_native, torch.float32)]:
        w = _rand(63, 69, 4).to(dtype).requires_grad_()
        b = _rand(64, 69).to(dtype).requires_grad_()
        y = fn(x.to(dtype), w, b, activation="silu", initial_state=state.to(dtype))
        grads[dtype] = torch.autograd.grad(y, [w, b], cot.to(dtype))
    for a, b in zip(grads[torch.float32], grads[F64], strict=True):
        assert _rel(a, b) < 2e-6


@needs_native
def test_silu_at_extreme_inputs_matches_torch():
    """The compiled exp is clamped and scaled by hand: silu at ±inf, NaN, ±1000 and
    where exp over- or underflows in float32 is torch's (to 1e-30 absolute)."""
    values = [float("-inf"), -1000, -100, -88, -87.5, -50, -1e-30, 0, 3, 50, 88, 100, 1000]
    x = torch.tensor([*values, float("inf"), float("nan"), -3.0]).reshape(1, 16, 1)
    x = x.expand(1, 16, 21).contiguous()  # a full vector of channels and a tail
    got = cc.causal_conv1d_native(x, torch.ones(21, 1), activation="silu")
    torch.testing.assert_close(got, F.silu(x), rtol=1e-6, atol=1e-30, equal_nan=True)


@needs_native
def test_packed_calls_take_the_torch_path():
    seq_idx = torch.tensor([[-1, -1, 0, 0, 0, 1, 1, 1, 1, 2]])
    x, w, b, state = _rand(50, 1, 10, 5), _rand(51, 5, 3), _rand(52, 5), _rand(53, 1, 5, 3)
    kwargs = {"activation": "silu", "seq_idx": seq_idx, "initial_state": state}
    got = cc.causal_conv1d_native(x.float(), w, b, return_final_state=True, **kwargs)
    want = cc.causal_conv1d_torch(x.float(), w, b, return_final_state=True, **kwargs)
    for a, c in zip(got, want, strict=True):
        assert torch.equal(a, c)
    kwargs.pop("initial_state")
    assert torch.equal(
        cc.centered_conv1d_native(x.float(), w, b, **kwargs),
        cc.centered_conv1d_torch(x.float(), w, b, **kwargs),
    )


@needs_native
def test_portable_build_matches_float64_reference(tmp_path, monkeypatch):
    """conv.c built for no particular CPU (4-lane vectors, the exp without AVX-512's
    vscalefps; -O1 keeps the build under a second), as a machine without AVX-512 runs
    it: outputs and gradients against the float64 reference, tails included."""
    lib = cc._declare_conv(portable_build("conv", tmp_path))
    monkeypatch.setattr(cc, "_conv_library", lambda: lib)
    leaves = {
        "x": _rand(70, 2, 19, 23),
        "weight": _rand(71, 23, 4),
        "bias": _rand(72, 23),
        "initial_state": _rand(73, 2, 23, 4),
    }
    leaves["x"][0, 3, :5] = torch.tensor([-1e3, 1e3, float("inf"), -100.0, 88.5])
    cots = [_rand(74, 2, 19, 23), _rand(75, 2, 23, 4)]
    kwargs = {"activation": "silu", "return_final_state": True}
    want = _outputs_and_grads(cc.causal_conv1d_reference, leaves, cots, F64, **kwargs)
    got = _outputs_and_grads(cc.causal_conv1d_native, leaves, cots, torch.float32, **kwargs)
    for name, a, b in zip(["y", "final_state", *leaves], got, want, strict=True):
        finite = torch.isfinite(b)
        assert torch.equal(finite, torch.isfinite(a)), name
        assert _rel(a[finite], b[finite]) < 2e-6, f"{name}: {_rel(a[finite], b[finite]):.2e}"


@pytest.mark.parametrize("kernel", [cc.CAUSAL, cc.CENTERED])
def test_auto_picks_native_for_cpu_float32_and_torch_for_float64(kernel):
    cpu = torch.device("cpu")
    expected = "native" if REASON is None else "torch"
    assert BackendPolicy("auto").resolve(kernel, cpu, torch.float32).provider == expected
    assert BackendPolicy("auto").resolve(kernel, cpu, torch.float64).provider == "torch"
