"""Hyena: the implicit filter from its formulas, the operator of order 2, 3 and 4 against a
naive composition of its pieces with direct convolutions, closed-form matrices, safari's
parameter names and layouts, and errors."""

from __future__ import annotations

import math

import pytest
import torch

import mixstack as ms
import mixstack.mixers.hyena
from mixstack.blocks.implicit_filter import ImplicitFilterConfig, ModulationConfig
from mixstack.dsl.context import LayerContext
from mixstack.dsl.errors import MixstackError, SpecError
from mixstack.mixers.base import materialize
from mixstack.mixers.hyena import Hyena, HyenaConfig

F64 = torch.float64
D, LMAX = 4, 20


def build(cfg: HyenaConfig, arch: str = "causal_lm", seed: int = 0) -> Hyena:
    m = Hyena(cfg, LayerContext(d_model=D, max_seq_len=LMAX, arch=arch)).double()
    m.reset_parameters(torch.Generator().manual_seed(seed))
    with torch.no_grad():  # projections of std 0.02 would hide gating mistakes
        g = torch.Generator().manual_seed(seed + 1)
        m.in_proj.weight.normal_(0, 0.5, generator=g)
        m.in_proj.bias.normal_(0, 0.5, generator=g)
    return m


def rand(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# -- the implicit filter from docs/math.md#hyena ---------------------------------------------------


def naive_filter(m: Hyena, L: int, rev: bool = False) -> torch.Tensor:
    """h (channels, L): z(t) -> Linear/Sin MLP -> · (exp(−t|δ_c|) + shift)."""
    f = m.filter_fn
    cfg = f.cfg
    bands = (cfg.emb_dim - 1) // 2
    rows = []
    for j in range(L):
        t = j / (LMAX - 1)
        omega = 2 * math.pi * j / LMAX
        freqs = [1e-4 + i * (bands - 1 - 1e-4) / max(bands - 1, 1) for i in range(bands)]
        rows.append(
            [t] + [math.cos(fr * omega) for fr in freqs] + [-math.sin(fr * omega) for fr in freqs]
        )
    h = torch.tensor(rows, dtype=F64)
    mlp = f.implicit_filter_rev if rev else f.implicit_filter
    for layer in mlp:
        if isinstance(layer, torch.nn.Linear):
            h = h @ layer.weight.T + (0 if layer.bias is None else layer.bias)
        else:
            h = torch.sin(layer.freq * h)
    if cfg.modulation is not None:
        mod = cfg.modulation
        lo, hi = (
            math.log(mod.target) / mod.slow_decay_pct,
            math.log(mod.target) / mod.fast_decay_pct,
        )
        C = h.shape[1]
        deltas = torch.tensor([lo + c * (hi - lo) / (C - 1) for c in range(C)], dtype=F64)
        t = torch.tensor([j / (LMAX - 1) for j in range(L)], dtype=F64)[:, None]
        h = h * (torch.exp(-t * deltas.abs()) + mod.shift)
    return h.T


@pytest.mark.parametrize("emb_dim", [3, 7])
def test_implicit_filter_follows_the_formula_and_is_sliced(emb_dim):
    filt = ImplicitFilterConfig(width=8, emb_dim=emb_dim, modulation=ModulationConfig(shift=0.1))
    m = build(HyenaConfig(order=3, filter=filt), arch="encoder")
    with torch.no_grad():
        for L in (LMAX, 7, 1):
            torch.testing.assert_close(m.filter_fn.filter(L), naive_filter(m, L))
            torch.testing.assert_close(m.filter_fn.filter_rev(L), naive_filter(m, L, rev=True))
        # built once at max_seq_len and sliced: not rebuilt at L
        torch.testing.assert_close(m.filter_fn.filter(7), m.filter_fn.filter(LMAX)[:, :7])


def test_sin_is_one_shared_module_as_in_safari():
    m = build(HyenaConfig(filter=ImplicitFilterConfig(width=8, inner_layers=2)))
    seq = m.filter_fn.implicit_filter
    assert seq[1] is seq[3] is seq[5]
    state = m.state_dict()
    assert (
        state["filter_fn.implicit_filter.1.freq"].data_ptr()
        == state["filter_fn.implicit_filter.5.freq"].data_ptr()
    )
    names = {n for n, _ in m.named_parameters()}
    assert names == {
        "in_proj.weight",
        "in_proj.bias",
        "short_filter.weight",
        "short_filter.bias",
        "filter_fn.bias",
        "filter_fn.pos_emb.z",
        "filter_fn.implicit_filter.0.weight",
        "filter_fn.implicit_filter.0.bias",
        "filter_fn.implicit_filter.1.freq",
        "filter_fn.implicit_filter.2.weight",
        "filter_fn.implicit_filter.2.bias",
        "filter_fn.implicit_filter.4.weight",
        "filter_fn.implicit_filter.4.bias",
        "filter_fn.implicit_filter.6.weight",
        "out_proj.weight",
        "out_proj.bias",
    }
    assert {n for n, _ in m.named_buffers()} == {
        "filter_fn.pos_emb.t",
        "filter_fn.modulation.deltas",
    }


def test_buffers_are_recomputed_after_a_meta_build():
    cfg = HyenaConfig(filter=ImplicitFilterConfig(width=8))
    ctx = LayerContext(d_model=D, max_seq_len=LMAX)
    with torch.device("meta"):
        lazy = Hyena(cfg, ctx)
    lazy = lazy.to_empty(device="cpu")
    lazy.reset_parameters(torch.Generator().manual_seed(0))
    eager = Hyena(cfg, ctx)
    eager.reset_parameters(torch.Generator().manual_seed(0))
    for (name, a), (_, b) in zip(lazy.named_buffers(), eager.named_buffers(), strict=True):
        assert torch.equal(a, b), name


# -- the operator as a naive composition of its pieces --------------------------------------------


def naive_short_conv(m: Hyena, p: torch.Tensor) -> torch.Tensor:
    """Depthwise conv, tap k of a width-K filter reads p_{t−(K−1)+k} (causal) or
    p_{t−K//2+k} (centred), zeros outside."""
    w, b = m.short_filter.weight[:, 0, :], m.short_filter.bias
    K, L = w.shape[1], p.shape[1]
    start = K - 1 if m.causal else K // 2
    out = torch.zeros_like(p) + b
    for t in range(L):
        for k in range(K):
            s = t - start + k
            if 0 <= s < L:
                out[:, t] += w[:, k] * p[:, s]
    return out


def direct_conv(h: torch.Tensor, h_rev: torch.Tensor | None, v: torch.Tensor) -> torch.Tensor:
    """y_t = Σ_{s≤t} h[:, t−s] v_s (+ Σ_{s>t} h_rev[:, s−t−1] v_s); v (B, L, D)."""
    y = torch.zeros_like(v)
    L = v.shape[1]
    for t in range(L):
        for s in range(L):
            if s <= t:
                y[:, t] += h[:, t - s] * v[:, s]
            elif h_rev is not None:
                y[:, t] += h_rev[:, s - t - 1] * v[:, s]
    return y


def naive_hyena(m: Hyena, u: torch.Tensor) -> torch.Tensor:
    N, L = m.cfg.order, u.shape[1]
    parts = naive_short_conv(m, u @ m.in_proj.weight.T + m.in_proj.bias)
    xs = [parts[..., i * D : (i + 1) * D] for i in range(N)]
    v = parts[..., N * D :]
    h = naive_filter(m, L)  # (D·(N−1), L): channel c·(N−1) + o
    h_rev = None if m.causal else naive_filter(m, L, rev=True)
    bias = m.filter_fn.bias
    for o in range(N - 1):
        v = v * xs[N - 1 - o]
        rows = [c * (N - 1) + o for c in range(D)]
        conv = direct_conv(h[rows], None if h_rev is None else h_rev[rows], v)
        v = conv + (0 if bias is None else bias[rows] * v)
    y = v * xs[0]
    return y @ m.out_proj.weight.T + m.out_proj.bias


CASES = {
    "order2-causal": (HyenaConfig(filter=ImplicitFilterConfig(width=8)), "causal_lm"),
    "order3-causal": (
        HyenaConfig(order=3, short_filter_order=4, filter=ImplicitFilterConfig(width=8, emb_dim=5)),
        "causal_lm",
    ),
    "order2-bidirectional": (HyenaConfig(filter=ImplicitFilterConfig(width=8)), "encoder"),
    "order4-bidirectional-no-bias": (
        HyenaConfig(
            order=4,
            short_filter_order=5,
            filter=ImplicitFilterConfig(width=6, bias=False, modulation=None),
        ),
        "encoder",
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_operator_equals_naive_composition(name):
    m = build(*CASES[name])
    u = rand(1, 2, 13, D)
    with torch.no_grad():
        torch.testing.assert_close(m(u), naive_hyena(m, u), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(CASES))
def test_operator_gradients_equal_naive_composition(name, grads_against):
    """Gradients of the input and of every parameter the naive composition reads (all but
    pos_emb.z, which it rebuilds from the formula: its value, checked above)."""
    m = build(*CASES[name])
    u = rand(2, 2, 11, D)
    cot = rand(3, 2, 11, D)
    fast, naive = grads_against(m, [m, lambda x: naive_hyena(m, x)], u, cot)
    assert naive["filter_fn.pos_emb.z"] is None and fast["filter_fn.pos_emb.z"] is not None
    for key, want in naive.items():
        if want is not None:
            torch.testing.assert_close(fast[key], want, rtol=1e-9, atol=1e-11, msg=key)


def toeplitz(h, h_rev, bias, L):
    T = torch.zeros(L, L, dtype=F64)
    for i in range(L):
        for j in range(L):
            if i >= j:
                T[i, j] = h[i - j]
            elif h_rev is not None:
                T[i, j] = h_rev[j - i - 1]
    return T + (0 if bias is None else bias * torch.eye(L, dtype=F64))


@pytest.mark.parametrize("name", ["order2-causal", "order3-causal", "order2-bidirectional"])
def test_closed_form_matrix_with_gates_inside(name):
    """M_c = diag(x0)·T_{N−2}·diag(x1)·…·T_0·diag(x_{N−1}) per channel c (DESIGN §4)."""
    cfg, arch = CASES[name]
    m = build(cfg, arch=arch)
    N, L = cfg.order, 9
    u = rand(3, 1, L, D)
    terms, _ = materialize(m, u)
    ((M, v),) = terms
    with torch.no_grad():
        parts = naive_short_conv(m, u @ m.in_proj.weight.T + m.in_proj.bias)[0]
        h, h_rev = naive_filter(m, L), (None if m.causal else naive_filter(m, L, rev=True))
        torch.testing.assert_close(v[0, :, :, 0], parts[:, N * D :].T)
        for c in range(D):
            want = torch.diag(parts[:, c])  # x0
            for o in range(N - 2, -1, -1):
                r = c * (N - 1) + o
                T = toeplitz(h[r], None if h_rev is None else h_rev[r], m.filter_fn.bias[r], L)
                gate = parts[:, (N - 1 - o) * D + c]
                want = want @ T @ torch.diag(gate)
            torch.testing.assert_close(M[0, c], want, rtol=1e-10, atol=1e-12)


# -- errors and hints -----------------------------------------------------------------------------


def test_sequences_longer_than_max_seq_len_are_refused():
    m = build(HyenaConfig(filter=ImplicitFilterConfig(width=8)))
    with pytest.raises(
        MixstackError,
        match=r"21 tokens but its filters are built for "
        r"max_seq_len = 20",
    ):
        m(rand(0, 1, 21, D))


def spec(layer: dict, arch: str = "causal_lm") -> dict:
    layers = {"pattern": "H-", "symbols": {"H": {"type": "hyena", **layer}}}
    return {"model": {"arch": arch, "d_model": 16, "max_seq_len": 32, "layers": layers}}


@pytest.mark.parametrize(
    ("layer", "arch", "message"),
    [
        ({"order": 1}, "causal_lm", "order"),
        ({"filter": {"emb_dim": 4}}, "causal_lm", "emb_dim must be odd"),
        ({"short_filter_order": 4}, "encoder", "centres its short conv, which needs an odd"),
        ({"causal": False}, "causal_lm", "arch causal_lm needs causal layers"),
        ({"filter": {"widht": 8}}, "causal_lm", "widht"),
    ],
)
def test_spec_errors(layer, arch, message):
    with pytest.raises(SpecError, match=message) as info:
        ms.load_spec(spec(layer, arch))
    assert "model.layers.symbols.H" in str(info.value)


def test_param_hints():
    m = build(HyenaConfig(filter=ImplicitFilterConfig(width=8, lr_scale=2.0)), arch="encoder")
    hints = m.param_hints()
    assert hints["filter_fn.pos_emb.z"].lr_scale == 0.01 and hints["filter_fn.pos_emb.z"].keep_fp32
    assert hints["filter_fn.implicit_filter_rev.0.weight"].lr_scale == 2.0
    assert hints["filter_fn.implicit_filter.1.freq"].no_weight_decay
    assert hints["filter_fn.modulation.deltas"].keep_fp32
    assert hints["out_proj.weight"].residual_out
