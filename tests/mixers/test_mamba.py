"""Mamba-1 layer: docs/math.md#mamba-1 re-implemented here step by step, the closed-form matrix,
decoding after chunked and packed prefills, init, names, config errors and FLOPs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch.utils.flop_counter import FlopCounterMode

import mixstack
from mixstack.dsl import registry
from mixstack.dsl.context import LayerContext
from mixstack.dsl.errors import SpecError
from mixstack.kernels.backends import BackendPolicy
from mixstack.mixers.base import apply_materialized, materialize
from mixstack.mixers.mamba import Mamba, MambaConfig

F64 = torch.float64
EXAMPLES = MambaConfig.examples()


def build(cfg: MambaConfig, d_model: int = 16, seed: int = 0) -> Mamba:
    m = Mamba(cfg, LayerContext(d_model=d_model))
    m.reset_parameters(torch.Generator().manual_seed(seed))
    m = m.double()
    with torch.no_grad():  # D = 1 and A = −(1..N) on every row hide mistakes: make them generic
        g = torch.Generator().manual_seed(seed + 1)
        m.D.uniform_(0.5, 1.5, generator=g)
        m.A_log.add_(torch.rand(m.A_log.shape, generator=g, dtype=F64) - 0.5)
    return m


def rand(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# -- an independent step-by-step Mamba-1 (docs/math.md#mamba-1, written from the equations) --------


def naive_parts(m: Mamba, u: torch.Tensor) -> dict[str, torch.Tensor]:
    """in_proj split [x | z], causal depthwise conv by explicit taps, silu, x_proj split
    [dt_r | B | C], Δ = softplus(W_dt dt_r + b_dt), A = −exp(A_log)."""
    cfg = m.cfg
    proj = u @ m.in_proj.weight.T + (m.in_proj.bias if m.in_proj.bias is not None else 0)
    x, z = proj.split(proj.shape[-1] // 2, dim=-1)
    K, w = cfg.d_conv, m.conv1d.weight[:, 0, :]
    conv = torch.zeros_like(x)
    for t in range(u.shape[1]):
        for k in range(K):
            if t - (K - 1) + k >= 0:
                conv[:, t] += w[:, k] * x[:, t - (K - 1) + k]
    if m.conv1d.bias is not None:
        conv = conv + m.conv1d.bias
    x = conv * torch.sigmoid(conv)
    R, N = m.dt_rank, cfg.d_state
    dt_r, B, C = (x @ m.x_proj.weight.T).split([R, N, N], dim=-1)
    delta = F.softplus(dt_r @ m.dt_proj.weight.T + m.dt_proj.bias)
    return {"x": x, "z": z, "B": B, "C": C, "delta": delta, "A": -torch.exp(m.A_log)}


def closed_form_matrix(p: dict[str, torch.Tensor], D: torch.Tensor) -> torch.Tensor:
    """``M_d[i, j] = Σ_n C_i[n] B_j[n] exp(A[d, n] Σ_{k=j+1..i} Δ_k[d]) Δ_j[d]`` for j <= i,
    plus D on the diagonal -> (B, d_inner, L, L)."""
    bsz, length, channels = p["x"].shape
    M = torch.zeros(bsz, channels, length, length, dtype=F64)
    for i in range(length):
        for j in range(i + 1):
            span = p["delta"][:, j + 1 : i + 1].sum(dim=1)  # (B, d_inner)
            decay = torch.exp(p["A"] * span[..., None])  # (B, d_inner, N)
            cb = p["C"][:, i] * p["B"][:, j]  # (B, N)
            M[:, :, i, j] = (decay * cb[:, None]).sum(-1) * p["delta"][:, j]
    return M + torch.diag_embed(D.expand(bsz, length, channels).transpose(1, 2))


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_forward_and_matrix_equal_the_naive_equations(example) -> None:
    m = build(example.config, d_model=example.d_model)
    u = rand(1, 2, 9, example.d_model)
    p = naive_parts(m, u)
    M = closed_form_matrix(p, m.D)
    y = torch.einsum("bdij,bjd->bid", M, p["x"]) * F.silu(p["z"])
    want = y @ m.out_proj.weight.T + (m.out_proj.bias if m.out_proj.bias is not None else 0)
    with torch.no_grad():
        torch.testing.assert_close(m(u), want, rtol=1e-10, atol=1e-12)
        terms, finish = materialize(m, u)
        ((got_M, v),) = terms
        torch.testing.assert_close(got_M, M, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(v[..., 0], p["x"].transpose(1, 2), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(apply_materialized(terms, finish), want, rtol=1e-10, atol=1e-12)


def test_parameter_names_and_shapes_follow_mamba_ssm() -> None:
    m = Mamba(MambaConfig(d_state=4), LayerContext(d_model=40))
    R = math.ceil(40 / 16)
    shapes = {name: tuple(p.shape) for name, p in m.named_parameters()}
    assert shapes == {
        "in_proj.weight": (160, 40),
        "conv1d.weight": (80, 1, 4),
        "conv1d.bias": (80,),
        "x_proj.weight": (R + 8, 80),
        "dt_proj.weight": (80, R),
        "dt_proj.bias": (80,),
        "A_log": (80, 4),
        "D": (80,),
        "out_proj.weight": (40, 80),
    }


def test_initialisation_follows_math() -> None:
    cfg = MambaConfig(d_state=5, dt_min=2e-3, dt_max=0.05, dt_scale=2.0)
    m = Mamba(cfg, LayerContext(d_model=64))
    m.reset_parameters(torch.Generator().manual_seed(3))
    R = m.dt_rank
    assert R == 4
    torch.testing.assert_close(m.A_log, torch.log(torch.arange(1.0, 6.0)).expand(128, 5))
    assert (m.D == 1).all()
    dt = F.softplus(m.dt_proj.bias.double())
    assert dt.min() >= 2e-3 * (1 - 1e-6) and dt.max() <= 0.05 * (1 + 1e-6)
    assert dt.std() > 0.005, "dt must be drawn log-uniform, not constant"
    bound = R**-0.5 * 2.0
    assert m.dt_proj.weight.abs().max() <= bound and m.dt_proj.weight.abs().max() > 0.8 * bound
    assert m.in_proj.weight.abs().max() <= 1 / math.sqrt(64)
    assert m.x_proj.weight.abs().max() <= 1 / math.sqrt(128)
    constant = Mamba(cfg.model_copy(update={"dt_init": "constant"}), LayerContext(d_model=64))
    assert (constant.dt_proj.weight == bound).all()
    floored = Mamba(
        MambaConfig(dt_min=1e-5, dt_max=2e-5, dt_init_floor=1e-4), LayerContext(d_model=16)
    )
    torch.testing.assert_close(
        F.softplus(floored.dt_proj.bias.double()), torch.full((32,), 1e-4, dtype=F64)
    )


def test_registered_capabilities_and_resolved_dt_rank() -> None:
    assert registry.get("mamba").config_cls is MambaConfig
    ctx = LayerContext(d_model=40)
    caps = MambaConfig().capabilities(ctx)
    assert caps.causal and caps.decode and not caps.length_dependent
    assert MambaConfig().resolve(ctx).dt_rank == 3
    assert MambaConfig(dt_rank=7).resolve(ctx).dt_rank == 7
    spec = mixstack.load_spec(
        {"model": {"d_model": 40, "layers": {"pattern": "M", "symbols": {"M": {"type": "mamba"}}}}}
    )
    assert spec.model.layer_configs()[0].dt_rank == 3


def test_param_hints() -> None:
    hints = Mamba(MambaConfig(d_state=2), LayerContext(d_model=8)).param_hints()
    for name in ("A_log", "D", "dt_proj.bias"):
        assert hints[name].keep_fp32 and hints[name].no_weight_decay, name
    assert hints["out_proj.weight"].residual_out


# -- decoding ------------------------------------------------------------------------------------


def test_chunked_prefill_and_steps_equal_forward() -> None:
    """Prefill 5 tokens, prefill 4 more from that state, then step: the full forward."""
    m = build(MambaConfig(d_state=4, d_conv=3))
    u = rand(2, 2, 14, 16)
    with torch.no_grad():
        want = m(u)
        state = m.init_state(2, 14, device="cpu", dtype=F64)
        got = [m(u[:, :5], state=state), m(u[:, 5:9], state=state)]
        got += [m.step(u[:, t], state)[:, None] for t in range(9, 14)]
    torch.testing.assert_close(torch.cat(got, dim=1), want, rtol=1e-10, atol=1e-12)


def test_gradients_through_prefills_and_steps_equal_the_full_forward() -> None:
    """Backward works through a prefill with state and through decoding steps, although
    both overwrite the state in place, and gives the gradients of the full forward."""
    m = build(MambaConfig(d_state=4, d_conv=3))
    u, cot = rand(4, 2, 12, 16), rand(5, 2, 12, 16)

    def decoded(x: torch.Tensor) -> torch.Tensor:
        state = m.init_state(2, 12, device="cpu", dtype=F64)
        outs = [m(x[:, :5], state=state), m(x[:, 5:8], state=state)]
        return torch.cat(outs + [m.step(x[:, t], state)[:, None] for t in range(8, 12)], dim=1)

    def grads(fn) -> tuple[torch.Tensor, ...]:
        x = u.clone().requires_grad_()
        return torch.autograd.grad((fn(x) * cot).sum(), [x, *m.parameters()])

    names = ["u", *dict(m.named_parameters())]
    for name, a, b in zip(names, grads(decoded), grads(m), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=f"d{name}")


def test_decode_continues_the_last_document_of_a_packed_prefill() -> None:
    """Row: doc 0 (3 tokens), padding, doc 1 (4 tokens); decoding then continues doc 1
    exactly as a forward over doc 1 alone would."""
    m = build(MambaConfig(d_state=3, d_conv=4))
    u = rand(3, 1, 13, 16)
    seq_idx = torch.tensor([[0, 0, 0, -1, -1, 1, 1, 1, 1]])
    with torch.no_grad():
        state = m.init_state(1, 13, device="cpu", dtype=F64)
        prefill = m(u[:, :9], seq_idx=seq_idx, state=state)
        steps = torch.stack([m.step(u[:, t], state) for t in range(9, 13)], dim=1)
        alone = m(u[:, 5:13])
    assert (prefill[:, 3:5] == 0).all()
    torch.testing.assert_close(prefill[:, 5:9], alone[:, :4], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(steps, alone[:, 4:], rtol=1e-10, atol=1e-12)


def test_decode_state_sizes() -> None:
    m = Mamba(MambaConfig(d_state=6, d_conv=3), LayerContext(d_model=8))
    state = m.init_state(2, 1000, device="cpu", dtype=torch.bfloat16)
    assert state.conv_state.shape == (2, 16, 3) and state.conv_state.dtype == torch.bfloat16
    assert state.ssm_state.shape == (2, 16, 6) and state.ssm_state.dtype == torch.float32
    assert m.state_nbytes(1000, torch.bfloat16) == 16 * 3 * 2 + 16 * 6 * 4


# -- config errors -------------------------------------------------------------------------------


def test_check_reports_an_inverted_dt_range() -> None:
    cfg = MambaConfig(dt_min=0.5, dt_max=0.1)
    assert cfg.check(LayerContext(d_model=16)) == [
        (("dt_max",), "dt_max (0.1) is below dt_min (0.5)")
    ]
    with pytest.raises(SpecError, match=r"dt_max \(0.1\) is below dt_min \(0.5\)"):
        Mamba(cfg, LayerContext(d_model=16))
    spec = {"type": "mamba", "dt_min": 0.5, "dt_max": 0.1}
    with pytest.raises(SpecError, match=r"model\.layers\.symbols\.M\.dt_max: dt_max \(0\.1\)"):
        mixstack.load_spec(
            {"model": {"d_model": 16, "layers": {"pattern": "M", "symbols": {"M": spec}}}}
        )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"dt_rank": 0}, "dt_rank must be 'auto' or an integer >= 1, got 0"),
        ({"dt_rank": "full"}, "Input should be 'auto'"),
        ({"dt_init": "uniform"}, "Input should be 'random' or 'constant'"),
        ({"d_state": 0}, "greater than or equal to 1"),
        ({"d_sate": 4}, "Extra inputs are not permitted"),
    ],
)
def test_field_validation(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        MambaConfig(**fields)


# -- FLOPs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_flops_per_token_matches_counted_matmuls(index: int) -> None:
    """The counter sees the projections and the scan's C·h contraction (one chunk: L <=
    chunk size); the formula adds the recurrence's two elementwise MACs per (channel,
    state) entry (decay·h and Δx·B) and the conv's taps, which no matmul carries."""
    example = EXAMPLES[index]
    m = Mamba(example.config, example.context())
    m.backends = BackendPolicy("torch")  # the counter sees torch's matmuls, not compiled C
    length = 20
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        m(torch.randn(2, length, example.d_model))
    # decay·h and Δx·B per (channel, state) entry, and the depthwise conv's K MACs per
    # channel (shifted multiply-adds, not a counted conv)
    elementwise = 2 * 2 * m.d_inner * m.cfg.d_state + 2 * m.d_inner * m.cfg.d_conv
    counted = counter.get_total_flops() / (2 * length)
    assert m.flops_per_token(length) == pytest.approx(counted + elementwise)
