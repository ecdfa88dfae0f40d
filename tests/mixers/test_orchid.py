"""Orchid: every mode and conditioning network against a naive re-implementation (explicit
loops, DFT matrices, materialized convolution matrices), batch independence (defect 1),
exact circular-shift equivariance of the all-circular variant, the block-causal kernel's
dependence on earlier blocks only, load-time refusal in a causal LM, and errors."""

from __future__ import annotations

import math

import pytest
import torch

import mixstack as ms
import mixstack.mixers.orchid
from mixstack.blocks.implicit_filter import ImplicitFilterConfig
from mixstack.dsl.context import LayerContext
from mixstack.dsl.errors import MixstackError, SpecError
from mixstack.mixers.base import materialize
from mixstack.mixers.orchid import DocLayout, Orchid, OrchidConfig

F64 = torch.float64
D, LMAX = 4, 16
SMALL = ImplicitFilterConfig(width=8)


def build(cfg: OrchidConfig, arch: str = "encoder", seed: int = 0) -> Orchid:
    m = Orchid(cfg, LayerContext(d_model=D, max_seq_len=LMAX, arch=arch)).double()
    m.reset_parameters(torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # generic values: std-0.02 projections and unit norms hide mistakes
        m.in_linear.weight.normal_(0, 0.5, generator=g)
        m.in_linear.bias.normal_(0, 0.5, generator=g)
        for name, p in m.conditioning.named_parameters():
            if "norm" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.3, generator=g)
    return m


def rand(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# -- a naive Orchid, one sequence at a time -------------------------------------------------------


def conv_axis(x: torch.Tensor, weight, bias, groups: int, padding: str) -> torch.Tensor:
    """out[t, g·co + o] = bias + Σ_{i<ci, j<K} w[g·co+o, i, j] · x[src(t, j), g·ci + i]."""
    n = x.shape[0]
    c_out, ci, K = weight.shape
    co = c_out // groups
    left = K - 1 if padding in ("causal", "circular_causal") else K // 2
    out = torch.zeros(n, c_out, dtype=F64) + bias
    for t in range(n):
        for j in range(K):
            s = t - left + j
            if padding.startswith("circular"):
                s %= n
            elif not 0 <= s < n:
                continue
            for oc in range(c_out):
                g = oc // co
                for i in range(ci):
                    out[t, oc] += weight[oc, i, j] * x[s, g * ci + i]
    return out


def layer_norm(x: torch.Tensor, ln) -> torch.Tensor:
    if ln is None:
        return x
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def dft(a: torch.Tensor, N: int) -> torch.Tensor:
    """A[f] = Σ_t a_t e^{−2πi f t / N}, f = 0..N//2 (a zero-padded to N)."""
    f = torch.arange(N // 2 + 1, dtype=F64)[:, None]
    t = torch.arange(a.shape[0], dtype=F64)[None]
    return torch.exp(-2j * math.pi * f * t / N) @ a.to(torch.complex128)


def inverse_real_dft(H: torch.Tensor, N: int) -> torch.Tensor:
    """κ_t = (1/N)·Σ_{f=0}^{N−1} Ĥ_f e^{2πi f t/N} with Ĥ_{N−f} = conj(Ĥ_f) (the imaginary
    parts of the DC and Nyquist bins do not exist in a real signal's spectrum)."""
    out = torch.zeros(N, H.shape[1], dtype=F64)
    for t in range(N):
        acc = H[0].real.clone()
        for f in range(1, N // 2 + 1):
            term = (
                H[f] * complex(math.cos(2 * math.pi * f * t / N), math.sin(2 * math.pi * f * t / N))
            ).real
            acc += term if 2 * f == N else 2 * term
        out[t] = acc / N
    return out


def spectrum(m: Orchid, s: torch.Tensor, N: int, padding: str) -> torch.Tensor:
    """ĥ (N//2 + 1, D) complex of the conditioning network (Type I or Type II)."""
    c = m.conditioning

    def branch(conv, ln):
        return layer_norm(conv_axis(s, conv.weight, conv.bias, D, padding), ln)

    if m.cfg.conditioning == "absfreq":
        A = dft(branch(c.time_conv, c.time_norm), N)
        feats = A.real**2 + A.imag**2  # (bins, D)
    else:
        h = dft(branch(c.k_conv, c.k_norm), N).conj() * dft(branch(c.q_conv, c.q_norm), N)
        feats = torch.stack([h.real, h.imag], dim=-1).reshape(h.shape[0], 2 * D)  # [Re_d, Im_d]
    h = layer_norm(conv_axis(feats, c.freq_conv.weight, c.freq_conv.bias, D, "same"), c.freq_norm)
    return torch.complex(h[:, 0::2], h[:, 1::2])


def conv_matrix(m: Orchid, s: torch.Tensor, static, n: int) -> torch.Tensor:
    """(D, n, n): the global convolution of term 1 (static + adaptive kernel)."""
    mode, M = m.mode, torch.zeros(D, n, n, dtype=F64)
    h_f, h_b = static
    if mode == "linear":
        kappa = inverse_real_dft(spectrum(m, s, 2 * n, "same"), 2 * n)  # (2n, D)
    elif mode == "circular":
        kappa = inverse_real_dft(spectrum(m, s, n, "circular"), n)
    bs = m.cfg.block_size
    for i in range(n):
        if mode == "block_causal":  # the block of i is conditioned on s before the block
            kappa = inverse_real_dft(spectrum_prefix(m, s, (i // bs) * bs), 2 * LMAX)
        for j in range(n):
            d = i - j
            if mode == "linear":
                M[:, i, j] = kappa[d % (2 * n)] + (h_f[:, d] if d >= 0 else h_b[:, -d - 1])
            elif mode == "circular":
                M[:, i, j] = kappa[d % n] + h_f[:, d % n]
            elif d >= 0:
                M[:, i, j] = kappa[d] + h_f[:, d]
    return M


def spectrum_prefix(m: Orchid, s: torch.Tensor, stop: int) -> torch.Tensor:
    """Block-causal conditioning: the causal conditioning signal, kept before `stop` only."""
    c = m.conditioning

    def branch(conv, ln):
        out = layer_norm(conv_axis(s, conv.weight, conv.bias, D, "causal"), ln)
        out[stop:] = 0
        return out

    N = 2 * LMAX
    if m.cfg.conditioning == "absfreq":
        A = dft(branch(c.time_conv, c.time_norm), N)
        feats = A.real**2 + A.imag**2
    else:
        h = dft(branch(c.k_conv, c.k_norm), N).conj() * dft(branch(c.q_conv, c.q_norm), N)
        feats = torch.stack([h.real, h.imag], dim=-1).reshape(h.shape[0], 2 * D)
    h = layer_norm(conv_axis(feats, c.freq_conv.weight, c.freq_conv.bias, D, "same"), c.freq_norm)
    return torch.complex(h[:, 0::2], h[:, 1::2])


def static_matrix(m: Orchid, filt, n: int) -> torch.Tensor:
    """(D, n, n): the residual convolution of term 2 (+ its skip)."""
    h_f = filt.filter(n)
    h_b = filt.filter_rev(n) if m.mode == "linear" else None
    M = torch.zeros(D, n, n, dtype=F64)
    for i in range(n):
        for j in range(n):
            d = i - j
            if m.mode == "circular":
                M[:, i, j] = h_f[:, d % n]
            elif d >= 0:
                M[:, i, j] = h_f[:, d]
            elif h_b is not None:
                M[:, i, j] = h_b[:, -d - 1]
    return M + torch.diag_embed(filt.bias[:, None].expand(D, n))


def naive_orchid(m: Orchid, u: torch.Tensor) -> torch.Tensor:
    """One sequence u (n, D) -> (n, D)."""
    n = u.shape[0]
    P = u @ m.in_linear.weight.T + m.in_linear.bias
    short_pad = "circular_causal" if m.mode == "circular" else "causal"
    sc = conv_axis(P, m.conv1d_short.weight, m.conv1d_short.bias, 3 * D, short_pad)
    x0, x1, v = sc[:, :D], sc[:, D : 2 * D], sc[:, 2 * D :]
    fc = m.fixed_conv
    static = (fc.filter(n), fc.filter_rev(n) if m.mode == "linear" else None)
    M = conv_matrix(m, P[:, 2 * D :], static, n)
    w = x1 * v
    y = x0 * (torch.einsum("dij,jd->id", M, w) + fc.bias * w)
    if m.fixed_conv_res is not None:
        y = y + torch.einsum("dij,jd->id", static_matrix(m, m.fixed_conv_res, n), u)
    return y @ m.out_linear.weight.T + m.out_linear.bias


CASES = {
    "linear-absfreq": (OrchidConfig(filter=SMALL), "encoder"),
    "linear-corrTime": (OrchidConfig(conditioning="corrTime", filter=SMALL), "encoder"),
    "circular-absfreq": (OrchidConfig(mode="circular", filter=SMALL), "encoder"),
    "circular-corrTime-no-norm": (
        OrchidConfig(
            mode="circular",
            conditioning="corrTime",
            norm="none",
            conv_filter_size=5,
            residual_long_conv="none",
            filter=SMALL,
        ),
        "encoder",
    ),
    "block-absfreq": (OrchidConfig(block_size=3, filter=SMALL), "causal_lm"),
    "block-corrTime": (
        OrchidConfig(conditioning="corrTime", block_size=4, filter=SMALL),
        "causal_lm",
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_layer_equals_naive_reimplementation(name):
    m = build(*CASES[name])
    u = rand(1, 2, 11, D)
    with torch.no_grad():
        got = m(u)
        for b in range(2):
            torch.testing.assert_close(got[b], naive_orchid(m, u[b]), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradients_equal_naive_reimplementation(name, grads_against):
    """Input and parameter gradients, backpropagated through the naive loops (which read
    the static filters through the module's implicit filters, so every parameter takes
    part)."""
    m = build(*CASES[name])
    u, cot = rand(8, 1, 7, D), rand(9, 1, 7, D)
    fns = [lambda x: m(x)[0], lambda x: naive_orchid(m, x[0])]
    fast, naive = grads_against(m, fns, u, cot[0])
    for key, want in naive.items():
        assert (want is None) == (fast[key] is None), key
        if want is not None:
            torch.testing.assert_close(fast[key], want, rtol=1e-8, atol=1e-10, msg=key)


@pytest.mark.parametrize("name", ["linear-corrTime", "circular-absfreq", "block-absfreq"])
def test_closed_form_matrices(name):
    """Term 1: M = diag(x0)·(C_κ + b·I)·diag(x1) with C_κ two-sided Toeplitz, circulant or
    block-row Toeplitz; term 2: M = T(h_res) + b_res·I (docs/math.md#orchid)."""
    m = build(*CASES[name])
    n = 9
    u = rand(7, 1, n, D)
    (M1, v1), (M2, v2) = materialize(m, u)[0]
    with torch.no_grad():
        P = u[0] @ m.in_linear.weight.T + m.in_linear.bias
        pad = "circular_causal" if m.mode == "circular" else "causal"
        sc = conv_axis(P, m.conv1d_short.weight, m.conv1d_short.bias, 3 * D, pad)
        fc = m.fixed_conv
        static = (fc.filter(n), fc.filter_rev(n) if m.mode == "linear" else None)
        C = conv_matrix(m, P[:, 2 * D :], static, n) + torch.diag_embed(
            fc.bias[:, None].expand(D, n)
        )
        want = torch.diag_embed(sc[:, :D].T) @ C @ torch.diag_embed(sc[:, D : 2 * D].T)
        torch.testing.assert_close(M1[0], want, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(v1[0, :, :, 0], sc[:, 2 * D :].T)
        torch.testing.assert_close(M2[0], static_matrix(m, m.fixed_conv_res, n))
        torch.testing.assert_close(v2[0, :, :, 0], u[0].T)


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_batch_equals_each_sequence_alone(name):
    """Defect 1 of the original: kernels of one sample applied to the others."""
    m = build(*CASES[name])
    u = rand(2, 4, 10, D)
    with torch.no_grad():
        batched = m(u)
        for b in range(4):
            torch.testing.assert_close(batched[b : b + 1], m(u[b : b + 1]), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("conditioning", ["absfreq", "corrTime"])
@pytest.mark.parametrize("shift", [1, 4, 12])
def test_circular_variant_is_exactly_shift_equivariant(conditioning, shift):
    m = build(OrchidConfig(mode="circular", conditioning=conditioning, filter=SMALL))
    u = rand(3, 2, 13, D)
    with torch.no_grad():
        out = m(u)
        shifted = m(torch.roll(u, shift, dims=1))
    torch.testing.assert_close(shifted, torch.roll(out, shift, dims=1), rtol=1e-11, atol=1e-12)


def test_linear_variant_is_not_shift_equivariant():
    """The zero-padded variant is only approximately equivariant: the test above can fail."""
    m = build(OrchidConfig(mode="linear", filter=SMALL))
    u = rand(3, 1, 13, D)
    with torch.no_grad():
        err = (m(torch.roll(u, 4, dims=1)) - torch.roll(m(u), 4, dims=1)).abs().max()
    assert err > 1e-3


def test_block_causal_kernel_of_block_c_sees_only_earlier_blocks():
    m = build(OrchidConfig(block_size=4, filter=SMALL), arch="causal_lm")
    u = rand(4, 1, 14, D)
    for p in (0, 5, 9, 13):  # perturb one position of block p // 4
        u2 = u.clone()
        u2[0, p] += 1.0
        with torch.no_grad():
            k1 = m.mixing_terms(u).terms[0][0].groups[0].k  # (1, C_b, D, n)
            k2 = m.mixing_terms(u2).terms[0][0].groups[0].k
        c = p // 4
        assert k1.shape[1] == 4  # ceil(14 / 4) blocks
        torch.testing.assert_close(k2[:, : c + 1], k1[:, : c + 1], rtol=0, atol=1e-14)
        if c + 1 < 4:
            assert (k2[:, c + 1 :] - k1[:, c + 1 :]).abs().amax() > 1e-8


def test_block_causal_is_prefix_independent_of_total_length():
    m = build(OrchidConfig(conditioning="corrTime", block_size=3, filter=SMALL), arch="causal_lm")
    u = rand(5, 2, LMAX, D)
    with torch.no_grad():
        full = m(u)
        for n in (1, 5, 9):
            torch.testing.assert_close(m(u[:, :n]), full[:, :n], rtol=1e-10, atol=1e-12)


# -- packed documents -----------------------------------------------------------------------------


def test_doc_layout_groups_documents_by_length():
    seq_idx = torch.tensor([[-1, 0, 0, 1, 1, 1, -1, 1], [2, 2, 3, 3, 3, 3, 4, 4]])
    layout = DocLayout.of(seq_idx, 2, 8)
    # padding inside document 1 is transparent: it has 4 tokens; ids 2 and 4 have 2
    assert [tuple(i.shape) for i in layout.index] == [(3, 2), (2, 4)]
    assert layout.index[0].tolist() == [[1, 2], [8, 9], [14, 15]]
    assert layout.index[1].tolist() == [[3, 4, 5, 7], [10, 11, 12, 13]]
    x = rand(0, 2, 8, 3)
    back = layout.scatter(layout.gather(x), x)
    keep = (seq_idx >= 0)[..., None]
    assert torch.equal(back, torch.where(keep, x, torch.zeros_like(x)))
    empty = DocLayout.of(torch.full((1, 3), -1), 1, 3)
    assert torch.equal(
        empty.scatter(empty.gather(x[:1, :3]), x[:1, :3]), torch.zeros(1, 3, 3, dtype=F64)
    )


@pytest.mark.parametrize("name", ["circular-absfreq", "block-corrTime"])
def test_packed_documents_with_padding_equal_each_alone(name):
    m = build(*CASES[name])
    seq_idx = torch.tensor(
        [[0, 0, 0, -1, 0, 0, 1, 1, 1, 1, 1], [-1, -1, 2, 2, 2, 2, 2, 3, 4, 4, 4]]
    )
    u = rand(6, 2, 11, D)
    with torch.no_grad():
        packed = m(u, seq_idx=seq_idx)
        for b, pos in [
            (0, [0, 1, 2, 4, 5]),
            (0, [6, 7, 8, 9, 10]),
            (1, [2, 3, 4, 5, 6]),
            (1, [7]),
            (1, [8, 9, 10]),
        ]:
            alone = m(u[b : b + 1, pos])
            torch.testing.assert_close(packed[b : b + 1, pos], alone, rtol=1e-11, atol=1e-12)
    assert (packed[seq_idx < 0] == 0).all()


# -- the causal LM contract at load, and errors ---------------------------------------------------


def spec(layer: dict, arch: str = "causal_lm") -> dict:
    layers = {"pattern": "O-", "symbols": {"O": {"type": "orchid", **layer}}}
    return {"model": {"arch": arch, "d_model": 16, "max_seq_len": 64, "layers": layers}}


@pytest.mark.parametrize("mode", ["linear", "circular"])
def test_causal_lm_refuses_non_causal_orchid_at_load(mode):
    with pytest.raises(SpecError, match=r"arch causal_lm needs causal layers.*orchid") as info:
        ms.load_spec(spec({"mode": mode}))
    assert "model.layers.symbols.O" in str(info.value)


@pytest.mark.parametrize("mode", ["linear", "circular"])
def test_causal_lm_refusal_points_at_the_yaml_line(tmp_path, mode):
    path = tmp_path / "lm.yaml"
    path.write_text(
        "model:\n"
        "  arch: causal_lm\n"
        "  d_model: 16\n"
        "  max_seq_len: 64\n"
        "  layers:\n"
        '    pattern: "O-"\n'
        "    symbols:\n"
        "      O:\n"
        "        type: orchid\n"
        f"        mode: {mode}\n"
    )
    with pytest.raises(SpecError) as info:
        ms.load_spec(path)
    text = str(info.value)
    assert f"{path}:8:" in text, text  # the line of the symbol's mapping
    assert "needs causal layers" in text and "orchid" in text
    # the causal variant of the same file loads
    path.write_text(path.read_text().replace(f"mode: {mode}", "mode: block_causal"))
    assert ms.load_spec(path).model.layers.symbols["O"].mode == "block_causal"


def test_mode_defaults_follow_the_arch():
    lm = ms.load_spec(spec({})).model.layers.symbols["O"]
    enc = ms.load_spec(spec({}, arch="encoder")).model.layers.symbols["O"]
    assert (lm.mode, lm.block_size) == ("block_causal", 8)
    assert (enc.mode, enc.block_size) == ("linear", None)


@pytest.mark.parametrize(
    ("layer", "arch", "message"),
    [
        ({"block_size": 4}, "encoder", "block_size only applies to mode block_causal"),
        ({"block_size": 65}, "causal_lm", r"block_size \(65\) exceeds max_seq_len \(64\)"),
        ({"conv_filter_size": 4}, "encoder", "conv_filter_size must be odd"),
        ({"conditioning": "freq"}, "encoder", "conditioning"),
    ],
)
def test_spec_errors(layer, arch, message):
    with pytest.raises(SpecError, match=message):
        ms.load_spec(spec(layer, arch))


def test_sequences_longer_than_max_seq_len_are_refused():
    m = build(OrchidConfig(filter=SMALL))
    with pytest.raises(MixstackError, match="17 tokens but its filters are built for"):
        m(rand(0, 1, 17, D))


def test_init_state_refuses_to_decode():
    m = build(OrchidConfig(filter=SMALL), arch="causal_lm")
    with pytest.raises(TypeError, match="decod"):
        m.init_state(1, 4, device="cpu", dtype=F64)
