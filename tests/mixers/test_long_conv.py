"""long_conv: the squash / smooth and SGConv kernels from their formulas, the whole layer
against a naive direct convolution, the closed-form Toeplitz matrix, and config errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import mixstack as ms
import mixstack.mixers.long_conv
from mixstack.dsl.context import LayerContext
from mixstack.dsl.errors import MixstackError, SpecError
from mixstack.mixers.base import materialize
from mixstack.mixers.long_conv import (
    LongConv,
    LongConvConfig,
    SGConvKernelConfig,
    SquashKernelConfig,
    sgconv_scales,
)

F64 = torch.float64


def build(cfg: LongConvConfig, d_model: int = 6, max_seq_len: int = 24, arch="causal_lm"):
    ctx = LayerContext(d_model=d_model, max_seq_len=max_seq_len, arch=arch)
    m = LongConv(cfg, ctx).double()
    m.reset_parameters(torch.Generator().manual_seed(0))
    return m


def rand(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# -- kernels from their formulas -------------------------------------------------------------------


def naive_squash(k: torch.Tensor, lam: float, smooth: int) -> torch.Tensor:
    """Average over a centred window of `smooth` taps (zeros outside, divided by the
    width), then sign(k)·max(|k| − λ, 0), entry by entry."""
    out = torch.zeros_like(k)
    K, half = k.shape[-1], smooth // 2
    for j in range(K):
        acc = sum(k[..., i] for i in range(j - half, j + half + 1) if 0 <= i < K)
        out[..., j] = acc / smooth
    return torch.where(out.abs() > lam, out - lam * torch.sign(out), torch.zeros_like(out))


@pytest.mark.parametrize(("lam", "smooth"), [(0.003, 1), (0.001, 3), (0.0, 5)])
def test_squash_and_smooth_follow_the_formula(lam, smooth):
    m = build(LongConvConfig(kernel=SquashKernelConfig(lam=lam, smooth=smooth)))
    raw = m.kernel.kernel.detach()
    assert raw.shape == (2, 6, 24)  # (channels, d_model, max_seq_len) for a causal layer
    got = m.kernel()
    torch.testing.assert_close(got, naive_squash(raw, lam, smooth), rtol=1e-12, atol=1e-15)
    if lam > 0:  # the threshold really zeroes the small entries, and only those
        assert 0 < (got == 0).double().mean() < 1


def upsample(w: torch.Tensor, r: int, mode: str) -> torch.Tensor:
    """Nearest: out[m] = w[m // r]. Linear (half-pixel centres): source position
    (m + ½)/r − ½ clamped to [0, d − 1], interpolated between its two neighbours."""
    d = w.shape[-1]
    out = []
    for m in range(d * r):
        if mode == "nearest":
            out.append(w[..., m // r])
            continue
        src = min(max((m + 0.5) / r - 0.5, 0.0), d - 1)
        lo = math.floor(src)
        hi, frac = min(lo + 1, d - 1), src - lo
        out.append(w[..., lo] * (1 - frac) + w[..., hi] * frac)
    return torch.stack(out, dim=-1)


@pytest.mark.parametrize(
    ("mode", "normalize"), [("linear", "concat"), ("nearest", "concat"), ("linear", "truncated")]
)
def test_sgconv_kernel_follows_the_formula(mode, normalize):
    cfg = SGConvKernelConfig(sub_kernel_len=3, decay=0.7, interpolation=mode, normalize=normalize)
    m = build(LongConvConfig(channels=1, kernel=cfg), max_seq_len=20)
    w = m.kernel.weight.detach()  # (S, rows, D, d)
    assert w.shape[0] == sgconv_scales(20, 3) == 4  # 3 + 3 + 6 + 12 = 24 >= 20 > 12
    pieces = [0.7**i * upsample(w[i], 2 ** max(i - 1, 0), mode) for i in range(4)]
    full = torch.cat(pieces, dim=-1)  # (rows, D, 24): the reference's concatenation
    raw = full[..., :20]
    # concat (the reference GConv): the norm of all 24 taps, before the cut to 20
    norm = (full if normalize == "concat" else raw).norm(dim=-1, keepdim=True)
    torch.testing.assert_close(m.kernel(), raw / norm, rtol=1e-12, atol=1e-14)
    # the normalisation is a constant of the initialisation, not recomputed
    with torch.no_grad():
        m.kernel.weight.mul_(3.0)
    torch.testing.assert_close(m.kernel(), 3 * raw / norm, rtol=1e-12, atol=1e-14)


def test_sgconv_scales():
    assert sgconv_scales(1, 32) == 1
    assert sgconv_scales(32, 32) == 1
    assert sgconv_scales(33, 32) == 2
    assert sgconv_scales(2048, 32) == 7  # 32·2^6 = 2048: S = log2(L/d) + 1


# -- the layer against a naive direct convolution -------------------------------------------------


def naive_layer(m: LongConv, u: torch.Tensor) -> torch.Tensor:
    """Per (channel c, model channel h): y_t = Σ_{s≤t} k⁰[t−s] u_s (+ Σ_{s>t} k¹[s−t−1] u_s)
    + D u_t, then GELU, output_linear, GLU over its two halves."""
    C, D = m.cfg.channels, u.shape[-1]
    k = m.kernel()  # its formula is checked above
    B, L, _ = u.shape
    y = torch.zeros(B, L, C, D, dtype=F64)
    for c in range(C):
        for t in range(L):
            for s in range(L):
                if s <= t and t - s < k.shape[-1]:
                    y[:, t, c] += k[c, :, t - s] * u[:, s]
                elif s > t and not m.causal and s - t - 1 < k.shape[-1]:
                    y[:, t, c] += k[C + c, :, s - t - 1] * u[:, s]
            y[:, t, c] += m.D[c] * u[:, t]
    z = y.reshape(B, L, C * D)
    if m.cfg.activation == "gelu":
        z = F.gelu(z)
    out = z @ m.output_linear.weight.T + m.output_linear.bias
    if not m.glu:
        return out
    a, gate = out.chunk(2, dim=-1)
    return a * torch.sigmoid(gate)


CONFIGS = {
    "causal-squash": (LongConvConfig(kernel_len=10), "causal_lm"),
    "bidirectional-squash": (LongConvConfig(kernel=SquashKernelConfig(smooth=3)), "encoder"),
    "causal-sgconv": (
        LongConvConfig(channels=1, kernel=SGConvKernelConfig(sub_kernel_len=4)),
        "causal_lm",
    ),
    "bidirectional-sgconv-id": (
        LongConvConfig(activation="id", kernel=SGConvKernelConfig(sub_kernel_len=5)),
        "encoder",
    ),
    "causal-sgconv-truncated-glu": (
        LongConvConfig(
            channels=2,
            output_glu=True,
            kernel=SGConvKernelConfig(sub_kernel_len=4, normalize="truncated"),
        ),
        "causal_lm",
    ),
}


def test_output_projection_defaults_follow_each_source():
    """safari LongConv ends in a GLU (Linear to 2D); the reference SGConv's default
    postact=None is a plain Linear to D."""
    assert build(LongConvConfig(channels=2)).output_linear.weight.shape == (12, 12)
    sg = build(LongConvConfig(channels=2, kernel=SGConvKernelConfig(sub_kernel_len=4)))
    assert sg.output_linear.weight.shape == (6, 12) and sg.cfg.output_glu is False
    assert SGConvKernelConfig().sub_kernel_len == 64  # the reference's kernel_dim


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_layer_equals_naive_direct_convolution(name):
    cfg, arch = CONFIGS[name]
    m = build(cfg, arch=arch)
    with torch.no_grad():  # bigger kernel entries, so the convolution is not hidden by D
        if isinstance(cfg.kernel, SquashKernelConfig):
            m.kernel.kernel.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    u = rand(2, 2, 15, 6)
    with torch.no_grad():
        torch.testing.assert_close(m(u), naive_layer(m, u), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_layer_gradients_equal_naive_direct_convolution(name, grads_against):
    cfg, arch = CONFIGS[name]
    m = build(cfg, arch=arch)
    with torch.no_grad():  # most entries survive the threshold, so most get a gradient
        if isinstance(cfg.kernel, SquashKernelConfig):
            m.kernel.kernel.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    u, cot = rand(5, 2, 9, 6), rand(6, 2, 9, 6)
    fast, naive = grads_against(m, [m, lambda x: naive_layer(m, x)], u, cot)
    for key, want in naive.items():
        assert want is not None, key
        torch.testing.assert_close(fast[key], want, rtol=1e-9, atol=1e-12, msg=key)


@pytest.mark.parametrize("arch", ["causal_lm", "encoder"])
def test_closed_form_toeplitz_matrix(arch):
    m = build(LongConvConfig(channels=2), arch=arch)
    with torch.no_grad():
        m.kernel.kernel.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    u = rand(4, 1, 7, 6)
    ((M, v),) = materialize(m, u)[0]
    k = m.kernel().detach()  # (rows, D, K)
    want = torch.zeros(12, 7, 7, dtype=F64)  # heads c·D + h
    for c in range(2):
        for h in range(6):
            for i in range(7):
                for j in range(7):
                    if i >= j:
                        want[c * 6 + h, i, j] = k[c, h, i - j] + (m.D[c, h] if i == j else 0)
                    elif arch == "encoder":
                        want[c * 6 + h, i, j] = k[2 + c, h, j - i - 1]
    torch.testing.assert_close(M[0], want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(v[0, :, :, 0], u[0].repeat(1, 2).T)  # head c·D + h reads u_h


# -- config and input errors ----------------------------------------------------------------------


def spec(layer: dict, arch: str = "causal_lm") -> dict:
    symbols = {"C": {"type": "long_conv", **layer}}
    layers = {"pattern": "C-", "symbols": symbols}
    return {"model": {"arch": arch, "d_model": 16, "max_seq_len": 32, "layers": layers}}


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        ({"kernel_len": 40}, r"kernel_len \(40\) exceeds max_seq_len \(32\)"),
        (
            {"kernel": {"type": "squash", "lam": 0.1}},
            r"lam \(0.1\) is more than 3x the initial spread of the kernel \(init_scale 0.002\)",
        ),
        (  # smoothing shrinks the kernel: the default lam then kills a 9-wide average
            {"kernel": {"type": "squash", "smooth": 9}},
            r"lam \(0.003\).*init_scale 0.002 / sqrt\(smooth 9\) = 0.000667.*lam <= 0.002",
        ),
        ({"kernel": {"type": "squash", "smooth": 4}}, "smooth must be odd"),
        ({"kernel": {"type": "sgconv", "decay": 1.5}}, "decay"),
        ({"kernel": {"type": "fourier"}}, "fourier"),
        ({"causal": False}, r"arch causal_lm needs causal layers.*long_conv"),
    ],
)
def test_spec_errors_point_at_the_field(layer, message):
    with pytest.raises(SpecError, match=message) as info:
        ms.load_spec(spec(layer))
    assert "model.layers.symbols.C" in str(info.value)


def test_encoder_resolves_bidirectional_and_full_length_kernel():
    layer = ms.load_spec(spec({}, arch="encoder")).model.layers.symbols["C"]
    assert layer.causal is False and layer.kernel_len == 32


def test_sequences_longer_than_max_seq_len_are_refused():
    m = build(LongConvConfig(kernel_len=8), max_seq_len=24)
    with pytest.raises(
        MixstackError, match=r"25 tokens but its filters are built for max_seq_len = 24"
    ):
        m(rand(0, 1, 25, 6))


def test_param_hints():
    m = build(LongConvConfig(kernel=SGConvKernelConfig(sub_kernel_len=4)))
    hints = m.param_hints()
    assert hints["kernel.weight"].no_weight_decay and hints["D"].no_weight_decay
    assert hints["kernel.kernel_norm"].keep_fp32
    assert hints["output_linear.weight"].residual_out
