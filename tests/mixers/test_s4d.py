"""S4D layer (docs/math.md#s4d): the kernel against the Vandermonde sum written here, convolution
mode against the recurrence (both directions), the Toeplitz matrix, initialisations,
decoding after chunked / packed prefills, names, hints and config errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

import mixstack
from mixstack.dsl import registry
from mixstack.dsl.context import LayerContext
from mixstack.dsl.errors import SpecError
from mixstack.mixers.base import apply_materialized, materialize
from mixstack.mixers.s4d import S4D, S4DConfig

F64 = torch.float64
H = 6


def build(seed: int = 0, **fields) -> S4D:
    m = S4D(S4DConfig(**fields), LayerContext(d_model=H, arch="encoder"))
    m.reset_parameters(torch.Generator().manual_seed(seed))
    return m.double()


def rand(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def discrete(m: S4D) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Ā (H, N/2), B̄ (H, N/2), C (directions, H, N/2)) from the parameters, by docs/math.md#s4d."""
    k = m.kernel
    dt = torch.exp(k.log_dt)[:, None]
    A = -torch.exp(k.log_A_real) + 1j * k.A_imag
    C = torch.view_as_complex(k.C.contiguous()).reshape(-1, *A.shape)
    if m.cfg.discretization == "zoh":
        return torch.exp(dt * A), (torch.exp(dt * A) - 1) / A, C
    return (1 + dt * A / 2) / (1 - dt * A / 2), dt / (1 - dt * A / 2), C


def vandermonde_kernel(m: S4D, length: int) -> torch.Tensor:
    """``K_l = 2·Re Σ_n C_n B̄_n Ā_n^l`` with explicit powers -> (directions, H, L)."""
    Abar, Bbar, C = discrete(m)
    return torch.stack(
        [2 * (C * Bbar * Abar**l).sum(-1).real for l in range(length)], dim=-1
    )  # fmt: skip


def head(m: S4D, y: torch.Tensor) -> torch.Tensor:
    """Activation (GELU), output_linear, GLU: first half times sigmoid of the second."""
    act = {"gelu": F.gelu, "silu": F.silu, "identity": lambda t: t}[m.cfg.activation]
    out = act(y) @ m.output_linear.weight.T + m.output_linear.bias
    return out[..., :H] * torch.sigmoid(out[..., H:])


def recurrence(m: S4D, u: torch.Tensor) -> torch.Tensor:
    """The SSM run step by step (docs/math.md#s4d): ``s_t = Ā s_{t−1} + B̄ u_t``,
    ``y_t = 2·Re(C s_t) + D u_t``; bidirectional adds ``r_t = Ā r_{t+1} + B̄ u_t`` read
    one step ahead, ``2·Re(C¹ r_{t+1})`` (lags −1, −2, … use K¹_0, K¹_1, …)."""
    Abar, Bbar, C = discrete(m)
    bsz, length, _ = u.shape
    s = torch.zeros(bsz, *Abar.shape, dtype=Abar.dtype)
    y = torch.zeros_like(u)
    for t in range(length):
        s = Abar * s + Bbar * u[:, t, :, None]
        y[:, t] = 2 * (C[0] * s).sum(-1).real + m.D * u[:, t]
    if m.cfg.bidirectional:
        r = torch.zeros_like(s)
        for t in reversed(range(length)):
            y[:, t] += 2 * (C[1] * r).sum(-1).real  # r = r_{t+1}
            r = Abar * r + Bbar * u[:, t, :, None]
    return head(m, y)


VARIANTS = [
    {"init": "lin"},
    {"init": "inv", "discretization": "bilinear"},
    {"init": "real", "activation": "silu"},
    {"init": "lin", "bidirectional": True},
    {"init": "inv", "discretization": "bilinear", "bidirectional": True},
]


@pytest.mark.parametrize("fields", VARIANTS)
def test_kernel_equals_the_vandermonde_sum(fields: dict) -> None:
    m = build(**fields, d_state=8)
    with torch.no_grad():
        got = m.kernel(40)
    assert got.shape == (2 if m.cfg.bidirectional else 1, H, 40) and got.dtype == F64
    torch.testing.assert_close(got, vandermonde_kernel(m, 40), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fields", VARIANTS)
@pytest.mark.parametrize("length", [1, 7, 64, 100])
def test_convolution_mode_equals_the_recurrence(fields: dict, length: int) -> None:
    m = build(seed=length, **fields, d_state=8)
    u = rand(length, 2, length, H)
    with torch.no_grad():
        torch.testing.assert_close(m(u), recurrence(m, u), rtol=1e-9, atol=1e-11)


def causal_recurrence(
    m: S4D, u: torch.Tensor, s0: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s_t = Ā s_{t−1} + B̄ u_t`` from ``s0`` (B, H, N/2) (zeros if None), read out as in
    :func:`recurrence`, without in-place writes -> (head output (B, L, H), final s)."""
    Abar, Bbar, C = discrete(m)
    s = torch.zeros(u.shape[0], *Abar.shape, dtype=Abar.dtype) if s0 is None else s0
    ys = []
    for u_t in u.unbind(1):
        s = Abar * s + Bbar * u_t[..., None]
        ys.append(2 * (C[0] * s).sum(-1).real + m.D * u_t)
    return head(m, torch.stack(ys, dim=1)), s


def grads_of(m: S4D, fn, u: torch.Tensor, seed: int) -> tuple[torch.Tensor, dict]:
    """fn(u) -> output (and optionally a final state); returns the output and the gradients
    of a fixed random functional of everything fn returns w.r.t. u and every parameter."""
    x = u.clone().requires_grad_()
    outs = fn(x)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(seed)
    loss = sum(
        (torch.view_as_real(o) if o.is_complex() else o).mul(
            torch.randn((torch.view_as_real(o) if o.is_complex() else o).shape, generator=g,
                        dtype=F64)
        ).sum()
        for o in outs
    )  # fmt: skip
    params = dict(m.named_parameters())
    grads = torch.autograd.grad(loss, [x, *params.values()])
    return outs[0].detach(), dict(zip(["u", *params], grads, strict=True))


def assert_rel(got: torch.Tensor, want: torch.Tensor, rel: float, what: str) -> None:
    err, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert err <= rel * max(scale, 1e-30), f"{what}: max error {err:.3g} vs scale {scale:.3g}"


GRAD_CASES = [(f, n) for f in VARIANTS for n in (1, 7, 63, 64, 65)] + [
    (VARIANTS[0], 1000),
    (VARIANTS[1], 1000),
    (VARIANTS[3], 1000),
]


@pytest.mark.parametrize(("fields", "length"), GRAD_CASES)
def test_convolution_mode_gradients_equal_the_recurrence(fields: dict, length: int) -> None:
    """Outputs and gradients (input and every parameter) of the FFT convolution equal those
    of the step-by-step recurrence (both directions when bidirectional), fp64."""
    m = build(seed=length, **fields, d_state=8)
    u = rand(length + 1, 2, length, H)
    got, got_grads = grads_of(m, m, u, seed=length)
    want, want_grads = grads_of(m, lambda x: recurrence(m, x), u, seed=length)
    assert_rel(got, want, 1e-10, "y")
    for name, grad in want_grads.items():
        assert_rel(got_grads[name], grad, 1e-9, f"d{name}")


@pytest.mark.parametrize("fields", [VARIANTS[0], VARIANTS[1], VARIANTS[3]])
@pytest.mark.parametrize("length", [65, 1000])
def test_fp32_convolution_is_within_tolerance_of_the_fp64_recurrence(
    fields: dict, length: int
) -> None:
    m64 = build(seed=3, **fields, d_state=8)
    m32 = build(seed=3, **fields, d_state=8).float()
    u = rand(4, 2, length, H)
    got, got_grads = grads_of(m32, lambda x: m32(x.float()), u, seed=1)
    want, want_grads = grads_of(m64, lambda x: recurrence(m64, x), u, seed=1)
    assert got.dtype == torch.float32
    assert_rel(got.double(), want, 1e-5, "y")
    for name, grad in want_grads.items():
        assert_rel(got_grads[name].double(), grad, 1e-4, f"d{name}")


@pytest.mark.parametrize("fields", [VARIANTS[0], VARIANTS[1], VARIANTS[2]])
@pytest.mark.parametrize("length", [1, 7, 63, 64, 65, 1000])
def test_prefill_from_a_state_equals_the_recurrence_from_it(fields: dict, length: int) -> None:
    """An initial state (the module stores x with s = B̄·x): outputs, final state and the
    gradients of both equal the recurrence started from s0 = B̄·x0."""
    m = build(seed=length, **fields, d_state=8)
    u = rand(length + 2, 2, length, H)
    x0 = torch.complex(rand(1, 2, H, 4), rand(2, 2, H, 4))
    _, Bbar, _ = discrete(m)

    def prefill(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        state = m.init_state(2, length, device="cpu", dtype=F64)
        state.ssm_state.copy_(x0)
        return m(x, state=state), state.ssm_state

    def reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, s = causal_recurrence(m, x, Bbar * x0)
        return out, s / Bbar

    got, got_grads = grads_of(m, prefill, u, seed=length)
    want, want_grads = grads_of(m, reference, u, seed=length)
    assert_rel(got, want, 1e-10, "y")
    with torch.no_grad():
        assert_rel(prefill(u)[1], reference(u)[1], 1e-10, "final state")
    for name, grad in want_grads.items():
        assert_rel(got_grads[name], grad, 1e-9, f"d{name}")


def per_document(m: S4D, u: torch.Tensor, seq_idx: torch.Tensor) -> torch.Tensor:
    """Each document (its non-padding positions, in order) through the recurrence alone;
    0 at padding -> (B, L, H)."""
    rows = []
    for b in range(u.shape[0]):
        out = torch.zeros_like(u[b])
        for doc in seq_idx[b].unique().tolist():
            if doc >= 0:
                pos = (seq_idx[b] == doc).nonzero().squeeze(1)
                out = out.index_put((pos,), recurrence(m, u[b : b + 1, pos])[0])
        rows.append(out)
    return torch.stack(rows)


@pytest.mark.parametrize("fields", [VARIANTS[0], VARIANTS[1], VARIANTS[3]])
@pytest.mark.parametrize("length", [7, 65, 1000])
def test_packed_convolution_equals_the_recurrence_per_document(
    fields: dict, length: int, random_packing
) -> None:
    """Packed rows (padding anywhere, transparent): outputs and gradients equal each
    document run alone through the recurrence; padding outputs 0 and gets no gradient."""
    m = build(seed=length, **fields, d_state=8)
    seq_idx = random_packing(length, seed=length)
    u = rand(length + 3, 2, length, H)
    got, got_grads = grads_of(m, lambda x: m(x, seq_idx=seq_idx), u, seed=length)
    want, want_grads = grads_of(m, lambda x: per_document(m, x, seq_idx), u, seed=length)
    assert_rel(got, want, 1e-10, "y")
    pad = seq_idx < 0
    assert (got[pad] == 0).all() and (got_grads["u"][pad] == 0).all()
    for name, grad in want_grads.items():
        assert_rel(got_grads[name], grad, 1e-9, f"d{name}")


@pytest.mark.parametrize("bidirectional", [False, True])
def test_materialized_matrix_is_toeplitz(bidirectional: bool) -> None:
    """``M_h[i, j] = K⁰_{i−j}`` (i >= j), ``K¹_{j−i−1}`` (j > i, bidirectional), + D_h δ."""
    m = build(d_state=6, bidirectional=bidirectional)
    length = 9
    u = rand(5, 2, length, H)
    K = vandermonde_kernel(m, length)
    want = torch.zeros(H, length, length, dtype=F64)
    for i in range(length):
        for j in range(length):
            if i >= j:
                want[:, i, j] = K[0, :, i - j] + (m.D if i == j else 0)
            elif bidirectional:
                want[:, i, j] = K[1, :, j - i - 1]
    with torch.no_grad():
        terms, finish = materialize(m, u)
        ((M, v),) = terms
        torch.testing.assert_close(M, want.expand(2, -1, -1, -1), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(v[..., 0], u.transpose(1, 2))
        torch.testing.assert_close(apply_materialized(terms, finish), m(u), rtol=1e-10, atol=1e-12)


# -- initialisation and names -------------------------------------------------------------------


@pytest.mark.parametrize("init", ["lin", "inv", "real"])
def test_inits_follow_math(init: str) -> None:
    N = 16
    m = S4D(S4DConfig(d_state=N, init=init, dt_min=1e-3, dt_max=1e-1), LayerContext(d_model=H))
    m.reset_parameters(torch.Generator().manual_seed(1))
    n = torch.arange(N // 2, dtype=F64)
    re, im = {
        "lin": (torch.full_like(n, 0.5), math.pi * n),
        "inv": (torch.full_like(n, 0.5), N / math.pi * (N / (2 * n + 1) - 1)),
        "real": (n + 1, torch.zeros_like(n)),
    }[init]
    torch.testing.assert_close(m.kernel.log_A_real.double(), torch.log(re).expand(H, -1))
    torch.testing.assert_close(m.kernel.A_imag.double(), im.expand(H, -1))
    dt = torch.exp(m.kernel.log_dt)
    assert dt.min() >= 1e-3 * (1 - 1e-6) and dt.max() <= 1e-1 * (1 + 1e-6) and dt.std() > 0
    C = torch.view_as_complex(m.kernel.C)
    assert C.shape == (H, N // 2) and C.real.std() > 0.3 and C.imag.std() > 0.3
    assert m.D.std() > 0.1  # D ~ N(0, 1), not a constant


def test_parameter_names_and_shapes() -> None:
    N = 10
    for bidirectional, c_shape in ((False, (H, 5, 2)), (True, (2, H, 5, 2))):
        cfg = S4DConfig(d_state=N, bidirectional=bidirectional)
        m = S4D(cfg, LayerContext(d_model=H, arch="encoder"))
        assert {name: tuple(p.shape) for name, p in m.named_parameters()} == {
            "kernel.log_dt": (H,),
            "kernel.C": c_shape,
            "kernel.log_A_real": (H, 5),
            "kernel.A_imag": (H, 5),
            "D": (H,),
            "output_linear.weight": (2 * H, H),
            "output_linear.bias": (2 * H,),
        }


@pytest.mark.parametrize("scale", [None, 0.05])
def test_param_hints(scale: float | None) -> None:
    hints = S4D(S4DConfig(d_state=4, ssm_lr_scale=scale), LayerContext(d_model=H)).param_hints()
    for name in ("kernel.log_dt", "kernel.log_A_real", "kernel.A_imag"):
        assert hints[name].no_weight_decay and hints[name].keep_fp32, name
        assert hints[name].lr_scale == (scale or 1.0), name
    assert hints["kernel.C"].keep_fp32 and not hints["kernel.C"].no_weight_decay
    assert hints["D"].keep_fp32


# -- decoding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields", [VARIANTS[0], VARIANTS[1]])
def test_chunked_prefill_and_steps_equal_forward(fields: dict) -> None:
    m = build(**fields, d_state=8)
    u = rand(6, 2, 15, H)
    with torch.no_grad():
        want = m(u)
        state = m.init_state(2, 15, device="cpu", dtype=F64)
        got = [m(u[:, :7], state=state), m(u[:, 7:10], state=state)]
        got += [m.step(u[:, t], state)[:, None] for t in range(10, 15)]
    torch.testing.assert_close(torch.cat(got, dim=1), want, rtol=1e-10, atol=1e-12)


def test_packed_prefills_then_decode_continue_each_rows_last_document() -> None:
    """Prefill 1: row 0 holds a document then padding, row 1 padding then a document.
    Prefill 2 (from that state): row 0 finishes its document with one token and starts
    a new one, which alone must not see the state; row 1 continues. Decoding then
    continues each row's last document exactly as a forward over it alone would."""
    m = build(d_state=8)
    u = rand(7, 2, 11, H)
    with torch.no_grad():
        state = m.init_state(2, 11, device="cpu", dtype=F64)
        first = m(
            u[:, :5], seq_idx=torch.tensor([[0, 0, 0, -1, -1], [-1, 3, 3, 3, 3]]), state=state
        )
        second = m(u[:, 5:8], seq_idx=torch.tensor([[0, 1, 1], [3, 3, 3]]), state=state)
        steps = torch.stack([m.step(u[:, t], state) for t in range(8, 11)], dim=1)
        row0_doc0 = m(u[0:1, [0, 1, 2, 5]])[0]
        row0_doc1 = m(u[0:1, 6:])[0]
        row1 = m(u[1:2, 1:])[0]
    assert (first[0, 3:] == 0).all() and (first[1, 0] == 0).all()
    torch.testing.assert_close(torch.cat([first[0, :3], second[0, :1]]), row0_doc0)
    torch.testing.assert_close(torch.cat([second[0, 1:], steps[0]]), row0_doc1)
    torch.testing.assert_close(torch.cat([first[1, 1:], second[1], steps[1]]), row1)


def test_bidirectional_refuses_decoding() -> None:
    m = build(d_state=4, bidirectional=True)
    with pytest.raises(TypeError, match=r"does not support decoding .* reads future tokens"):
        m.init_state(1, 4, device="cpu", dtype=F64)
    causal = build(d_state=4)
    state = causal.init_state(1, 4, device="cpu", dtype=F64)
    with pytest.raises(TypeError, match="does not support decoding"):
        m(rand(8, 1, 3, H), state=state)


def test_decode_state_is_complex_and_length_independent() -> None:
    m = S4D(S4DConfig(d_state=12), LayerContext(d_model=H))
    state = m.init_state(3, 10_000, device="cpu", dtype=torch.bfloat16)
    assert state.ssm_state.shape == (3, H, 6) and state.ssm_state.dtype == torch.complex64
    assert m.state_nbytes(10_000, torch.bfloat16) == H * 6 * 8


def test_dropout_only_in_training() -> None:
    m = build(d_state=4, dropout=0.5)
    u = rand(9, 2, 12, H)
    with torch.no_grad():
        m.eval()
        evaluated = m(u)
        torch.testing.assert_close(evaluated, recurrence(m, u), rtol=1e-9, atol=1e-11)
        m.train()
        assert not torch.allclose(m(u), evaluated)


# -- config --------------------------------------------------------------------------------------


def test_registered_with_capabilities() -> None:
    assert registry.get("s4d").config_cls is S4DConfig
    ctx = LayerContext(d_model=H)
    causal = S4DConfig().capabilities(ctx)
    assert causal.causal and causal.decode and not causal.length_dependent
    both = S4DConfig(bidirectional=True).capabilities(ctx)
    assert not both.causal and not both.decode


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"d_state": 7}, r"d_state must be even \(N/2 complex conjugate pairs\), got 7"),
        ({"init": "legs"}, "Input should be 'lin', 'inv' or 'real'"),
        ({"discretization": "euler"}, "Input should be 'zoh' or 'bilinear'"),
        ({"dropout": 1.0}, "less than 1"),
        ({"ssm_lr_scale": 0.0}, "greater than 0"),
        ({"dstate": 4}, "Extra inputs are not permitted"),
    ],
)
def test_field_validation(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        S4DConfig(**fields)


def test_spec_errors_name_the_layer() -> None:
    with pytest.raises(SpecError, match=r"dt_max \(0.01\) is below dt_min \(0.1\)"):
        S4D(S4DConfig(dt_min=0.1, dt_max=0.01), LayerContext(d_model=H))

    def load(symbol: dict, arch: str = "causal_lm"):
        layers = {"pattern": "S", "symbols": {"S": symbol}}
        return mixstack.load_spec({"model": {"arch": arch, "d_model": H, "layers": layers}})

    with pytest.raises(
        SpecError, match=r"model\.layers\.symbols\.S\.d_state: d_state must be even"
    ):
        load({"type": "s4d", "d_state": 5})
    with pytest.raises(SpecError, match=r"\(type s4d\) at layers \[0\] is not causal"):
        load({"type": "s4d", "bidirectional": True})
    assert load({"type": "s4d", "bidirectional": True}, arch="encoder").model.n_layers == 1
