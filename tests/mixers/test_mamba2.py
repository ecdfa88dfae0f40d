"""Mamba-2 layer: equations of docs/math.md#mamba-2 re-implemented here step by step, closed-form
matrices, decoding, packing, init, names, config errors, FLOPs and the gated norm."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch.utils.flop_counter import FlopCounterMode

import mixstack
import mixstack.mixers.mamba2  # registers "mamba2"
from mixstack.blocks.gated_norm import GatedRMSNorm, gated_rms_norm
from mixstack.dsl import registry
from mixstack.dsl.context import LayerContext
from mixstack.dsl.errors import SpecError
from mixstack.kernels.backends import BackendPolicy
from mixstack.mixers.base import apply_materialized, materialize
from mixstack.mixers.mamba2 import Mamba2, Mamba2Config

F64 = torch.float64
EXAMPLES = Mamba2Config.examples()


def build(cfg: Mamba2Config, d_model: int = 32, seed: int = 0) -> Mamba2:
    m = Mamba2(cfg, LayerContext(d_model=d_model)).double()
    m.reset_parameters(torch.Generator().manual_seed(seed))
    with torch.no_grad():  # D = 1 and norm = 1 at init hide mistakes; make them generic
        m.D.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(seed + 1))
        if m.norm is not None:
            m.norm.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(seed + 2))
    return m


def rand(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# -- an independent step-by-step Mamba-2 (docs/math.md#mamba-2, written from the equations) --------


def naive_parts(m: Mamba2, u: torch.Tensor) -> dict[str, torch.Tensor]:
    """Steps 1-4 of docs/math.md#mamba-2 with explicit loops: returns z0, x0, z, x, B, C, dt, A."""
    cfg, d = m.cfg, u.shape[-1]
    d_inner, G, N = cfg.expand * d, cfg.ngroups, cfg.d_state
    d_ssm = cfg.d_ssm or d_inner
    d_mlp, H, P = d_inner - d_ssm, d_ssm // cfg.headdim, cfg.headdim
    proj = u @ m.in_proj.weight.T + (m.in_proj.bias if m.in_proj.bias is not None else 0)
    sizes = [d_mlp, d_mlp, d_ssm, d_ssm + 2 * G * N, H]
    z0, x0, z, xBC, dt = torch.split(proj, sizes, dim=-1)
    K = cfg.d_conv
    w = m.conv1d.weight[:, 0, :]  # (conv_dim, K)
    conv = torch.zeros_like(xBC)
    for t in range(u.shape[1]):
        for k in range(K):
            src = t - (K - 1) + k
            if src >= 0:
                conv[:, t] += w[:, k] * xBC[:, src]
    if m.conv1d.bias is not None:
        conv = conv + m.conv1d.bias
    conv = F.silu(conv)
    x, Bm, Cm = torch.split(conv, [d_ssm, G * N, G * N], dim=-1)
    delta = F.softplus(dt + m.dt_bias)
    lo, hi = cfg.dt_limit
    delta = delta.clamp(min=lo, max=hi)
    bsz, length = u.shape[:2]
    return {
        "z0": z0,
        "x0": x0,
        "z": z,
        "x": x.reshape(bsz, length, H, P),
        "B": Bm.reshape(bsz, length, G, N),
        "C": Cm.reshape(bsz, length, G, N),
        "dt": delta,
        "A": -torch.exp(m.A_log),
    }


def naive_gate_norm_out(m: Mamba2, y: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """Steps 6-7: gate and group-wise RMS norm, the d_mlp branch, out_proj. y (B, L, d_ssm)."""
    cfg = m.cfg
    gate = F.silu(p["z"])
    if cfg.rmsnorm:
        G = cfg.ngroups
        v = y if cfg.norm_before_gate else y * gate
        groups = v.reshape(*v.shape[:2], G, -1)
        normed = groups / torch.sqrt(groups.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)
        y = normed.reshape(v.shape) * m.norm.weight
        if cfg.norm_before_gate:
            y = y * gate
    else:
        y = y * gate
    if p["z0"].shape[-1]:
        y = torch.cat([F.silu(p["z0"]) * p["x0"], y], dim=-1)
    out = y @ m.out_proj.weight.T
    return out + m.out_proj.bias if m.out_proj.bias is not None else out


def naive_mamba2(m: Mamba2, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole layer with the per-step recurrence; -> output, final SSM state."""
    p = naive_parts(m, u)
    x, Bm, Cm, dt, A = p["x"], p["B"], p["C"], p["dt"], p["A"]
    bsz, length, H, P = x.shape
    group_of = [h // (H // Bm.shape[2]) for h in range(H)]  # head h reads group h // (H/G)
    Bh, Ch = Bm[:, :, group_of], Cm[:, :, group_of]  # (B, L, H, N)
    D = m.D.reshape(H, P) if m.cfg.D_has_hdim else m.D[:, None]
    S = torch.zeros(bsz, H, P, Bm.shape[-1], dtype=F64)
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * A)[..., None, None]  # (B, H, 1, 1)
        S = decay * S + dt[:, t, :, None, None] * x[:, t, :, :, None] * Bh[:, t, :, None, :]
        ys.append((S @ Ch[:, t, :, :, None])[..., 0] + D * x[:, t])
    y = torch.stack(ys, dim=1).reshape(bsz, length, H * P)
    return naive_gate_norm_out(m, y, p), S


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_forward_matches_step_by_step_equations(example):
    m = build(example.config, example.d_model)
    u = rand(1, 2, 13, example.d_model)
    expected, _ = naive_mamba2(m, u)
    torch.testing.assert_close(m(u), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_materialized_matrix_equals_closed_form(example):
    """M[i, j] = (C_i·B_j)·exp(A Σ_{k=j+1..i} Δ_k)·Δ_j (+ D on the diagonal), per head."""
    m = build(example.config, example.d_model)
    u = rand(2, 2, 11, example.d_model)
    matrices, finish = materialize(m, u)
    assert len(matrices) == 1
    M, v = matrices[0]
    p = naive_parts(m, u)
    bsz, length, H, _ = p["x"].shape
    group_of = [h // (H // p["B"].shape[2]) for h in range(H)]
    cb = torch.einsum("bihn,bjhn->bhij", p["C"][:, :, group_of], p["B"][:, :, group_of])
    expected = torch.zeros(bsz, H, length, length, dtype=F64)
    for i in range(length):
        for j in range(i + 1):
            decay = torch.exp(p["A"] * p["dt"][:, j + 1 : i + 1].sum(1))  # (B, H)
            expected[:, :, i, j] = cb[:, :, i, j] * decay * p["dt"][:, j]
    if not m.cfg.D_has_hdim:
        expected += torch.eye(length, dtype=F64) * m.D[:, None, None]
    torch.testing.assert_close(M, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(v, p["x"].transpose(1, 2), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(apply_materialized(matrices, finish), m(u), rtol=1e-10, atol=1e-12)


# -- decoding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefill", [1, 3, 7])
@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_decode_after_odd_prefill_equals_forward(example, prefill):
    m = build(example.config, example.d_model)
    u = rand(3, 2, 12, example.d_model)
    full = m(u)
    state = m.init_state(2, 12, device="cpu", dtype=F64)
    outs = [m(u[:, :prefill], state=state)]
    outs += [m.step(u[:, t], state)[:, None] for t in range(prefill, 12)]
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-10, atol=1e-12)


def test_prefill_writes_pre_conv_columns_and_final_state():
    cfg = Mamba2Config(d_state=8, headdim=8, ngroups=2, chunk_size=4)
    m = build(cfg)
    u = rand(4, 2, 3, 32)  # shorter than d_conv = 4
    state = m.init_state(2, 16, device="cpu", dtype=F64)
    m(u, state=state)
    xBC = (u @ m.in_proj.weight.T)[..., m.d_ssm : m.d_ssm + m.conv_dim]  # pre-conv
    expected_conv = F.pad(xBC.transpose(1, 2), (1, 0))  # zero-left-padded to d_conv
    torch.testing.assert_close(state.conv_state, expected_conv, rtol=0, atol=1e-15)
    torch.testing.assert_close(state.ssm_state, naive_mamba2(m, u)[1], rtol=1e-10, atol=1e-12)


def test_chunked_prefill_continues_the_state():
    m = build(Mamba2Config(d_state=8, headdim=8, ngroups=2, chunk_size=4))
    u = rand(5, 2, 14, 32)
    state = m.init_state(2, 14, device="cpu", dtype=F64)
    out = torch.cat([m(u[:, :5], state=state), m(u[:, 5:], state=state)], dim=1)
    torch.testing.assert_close(out, m(u), rtol=1e-10, atol=1e-12)


def test_gradients_through_prefills_and_steps_equal_the_full_forward():
    """Backward works through a prefill with state and through decoding steps, although
    both overwrite the state in place, and gives the gradients of the full forward."""
    m = build(Mamba2Config(d_state=8, headdim=8, ngroups=2, chunk_size=4))
    u, cot = rand(11, 2, 12, 32), rand(12, 2, 12, 32)

    def decoded(x):
        state = m.init_state(2, 12, device="cpu", dtype=F64)
        outs = [m(x[:, :5], state=state), m(x[:, 5:8], state=state)]
        return torch.cat(outs + [m.step(x[:, t], state)[:, None] for t in range(8, 12)], dim=1)

    def grads(fn):
        x = u.clone().requires_grad_()
        return torch.autograd.grad((fn(x) * cot).sum(), [x, *m.parameters()])

    names = ["u", *dict(m.named_parameters())]
    for name, a, b in zip(names, grads(decoded), grads(m), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=f"d{name}")


def test_state_layout_and_dtypes():
    m = Mamba2(Mamba2Config(d_state=8, headdim=8, ngroups=2), LayerContext(d_model=32))
    state = m.init_state(3, 100, device="cpu", dtype=torch.bfloat16)
    assert state.conv_state.shape == (3, 64 + 2 * 2 * 8, 4)
    assert state.conv_state.dtype == torch.bfloat16
    assert state.ssm_state.shape == (3, 8, 8, 8) and state.ssm_state.dtype == torch.float32
    assert m.state_nbytes(100, torch.bfloat16) == 96 * 4 * 2 + 8 * 8 * 8 * 4
    reordered = state.index_select(torch.tensor([2, 0]))
    assert reordered.ssm_state.shape[0] == 2


# -- packing ------------------------------------------------------------------------------------


def test_packed_equals_separate_and_padding_outputs_zero():
    m = build(Mamba2Config(d_state=8, headdim=8, ngroups=2, chunk_size=4))
    rows = [[(0, 5), (1, 7), (-1, 2)], [(-1, 3), (4, 11)]]
    seq_idx = torch.tensor([[sid for sid, n in row for _ in range(n)] for row in rows])
    u = rand(6, 2, 14, 32)
    y = m(u, seq_idx=seq_idx)
    for b, row in enumerate(rows):
        start = 0
        for sid, n in row:
            sl = slice(start, start + n)
            if sid >= 0:
                torch.testing.assert_close(
                    y[b : b + 1, sl], m(u[b : b + 1, sl]), rtol=1e-10, atol=1e-12
                )
            else:
                assert (y[b, sl] == 0).all()
            start += n


# -- numerics ------------------------------------------------------------------------------------


def test_no_nan_in_backward_with_long_sequences_and_large_dt():
    m = Mamba2(Mamba2Config(d_state=8, headdim=8, chunk_size=64), LayerContext(d_model=32))
    m.reset_parameters(torch.Generator().manual_seed(0))
    with torch.no_grad():
        m.dt_bias.fill_(30.0)  # Δ ≈ 30 everywhere: exp(ΔA) underflows to 0
        m.A_log.fill_(math.log(16.0))
    u = torch.randn(1, 1500, 32, generator=torch.Generator().manual_seed(1))
    m(u).square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_bf16_forward_close_to_fp32():
    m = Mamba2(
        Mamba2Config(d_state=8, headdim=8, ngroups=2, chunk_size=8), LayerContext(d_model=32)
    )
    m.reset_parameters(torch.Generator().manual_seed(0))
    u = torch.randn(2, 40, 32, generator=torch.Generator().manual_seed(1))
    y32 = m(u)
    m.bfloat16()
    for name in ("A_log", "D", "dt_bias"):  # what keep_fp32 means
        getattr(m, name).data = getattr(m, name).data.float()
    y16 = m(u.bfloat16())
    assert y16.dtype == torch.bfloat16 and torch.isfinite(y16).all()
    assert (y16.float() - y32).abs().max() <= 0.05 * y32.abs().max()


# -- parameters, init, hints ---------------------------------------------------------------------


def test_parameter_names_and_shapes_match_mamba_ssm():
    cfg = Mamba2Config(d_state=16, headdim=16, ngroups=2)
    m = Mamba2(cfg, LayerContext(d_model=64))
    # d_inner 128, H 8, conv_dim 128 + 2·2·16 = 192, in_proj 2·128 + 2·2·16 + 8 = 328
    assert {n: tuple(p.shape) for n, p in m.named_parameters()} == {
        "in_proj.weight": (328, 64),
        "conv1d.weight": (192, 1, 4),
        "conv1d.bias": (192,),
        "dt_bias": (8,),
        "A_log": (8,),
        "D": (8,),
        "norm.weight": (128,),
        "out_proj.weight": (64, 128),
    }
    wide = Mamba2(
        cfg.model_copy(update={"D_has_hdim": True, "d_ssm": 64, "bias": True}),
        LayerContext(d_model=64),
    )
    shapes = {n: tuple(p.shape) for n, p in wide.named_parameters()}
    assert shapes["D"] == (64,) and shapes["norm.weight"] == (64,)
    assert shapes["in_proj.weight"] == (2 * 128 + 2 * 2 * 16 + 4, 64)
    assert shapes["in_proj.bias"] == (324,) and shapes["out_proj.bias"] == (64,)


def test_init_follows_mamba_ssm():
    cfg = Mamba2Config(d_state=8, headdim=2, dt_min=0.002, dt_max=0.05)
    m = Mamba2(cfg, LayerContext(d_model=64))  # 64 heads
    m.reset_parameters(torch.Generator().manual_seed(0))
    dt = F.softplus(m.dt_bias.double())
    assert dt.min() >= 0.002 * (1 - 1e-6) and dt.max() <= 0.05 * (1 + 1e-6)
    assert dt.log().std() > 0.5  # log-uniform over [ln 0.002, ln 0.05] has std ≈ 0.93
    A = torch.exp(m.A_log)
    assert A.min() >= 1.0 and A.max() <= 16.0 and A.std() > 2.0
    assert (m.D == 1).all() and (m.norm.weight == 1).all()
    bound = 1 / math.sqrt(64)
    assert m.in_proj.weight.abs().max() <= bound and m.in_proj.weight.std() > 0.8 * bound / 3
    assert m.conv1d.weight.abs().max() <= 0.5 and m.conv1d.bias.abs().max() <= 0.5


def test_dt_floor_applies_and_inverse_softplus_is_exact():
    cfg = Mamba2Config(d_state=8, headdim=8, dt_min=1e-6, dt_max=2e-6, dt_init_floor=1e-3)
    m = Mamba2(cfg, LayerContext(d_model=32)).double()
    m.reset_parameters(torch.Generator().manual_seed(0))
    torch.testing.assert_close(F.softplus(m.dt_bias), torch.full((8,), 1e-3, dtype=F64))


def test_reset_parameters_draws_only_from_the_generator():
    cfg = EXAMPLES[0].config

    def params(seed):
        m = Mamba2(cfg, LayerContext(d_model=32))
        torch.manual_seed(seed + 100)  # the global RNG must not matter
        m.reset_parameters(torch.Generator().manual_seed(seed))
        return dict(m.named_parameters())

    a, b, c = params(0), params(0), params(1)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    for name in (
        "in_proj.weight",
        "conv1d.weight",
        "conv1d.bias",
        "dt_bias",
        "A_log",
        "out_proj.weight",
    ):
        assert not torch.equal(a[name], c[name]), name


def test_meta_then_to_empty_then_reset():
    with torch.device("meta"):
        m = Mamba2(EXAMPLES[1].config, LayerContext(d_model=32))
    assert all(p.is_meta for p in m.parameters())
    m.to_empty(device="cpu")
    m.reset_parameters(torch.Generator().manual_seed(0))
    assert all(torch.isfinite(p).all() for p in m.parameters())
    assert torch.isfinite(m(torch.randn(1, 9, 32))).all()


def test_param_hints():
    hints = Mamba2(EXAMPLES[0].config, LayerContext(d_model=32)).param_hints()
    for name in ("A_log", "D", "dt_bias"):
        assert hints[name].keep_fp32 and hints[name].no_weight_decay
    assert hints["out_proj.weight"].residual_out


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_every_parameter_gets_gradient(example):
    m = build(example.config, example.d_model)
    m(rand(7, 2, 9, example.d_model)).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# -- config --------------------------------------------------------------------------------------


def test_registered_with_capabilities_and_resolved_d_ssm():
    assert registry.get("mamba2").config_cls is Mamba2Config
    ctx = LayerContext(d_model=48)
    cfg = Mamba2Config()
    caps = cfg.capabilities(ctx)
    assert caps.causal and caps.decode and not caps.length_dependent
    assert cfg.resolve(ctx).d_ssm == 96


@pytest.mark.parametrize(
    ("fields", "path", "message"),
    [
        (
            {"headdim": 48},
            ("headdim",),
            r"headdim \(48\) must divide d_ssm \(64; expand·d_model = 64\)",
        ),
        (
            {"headdim": 8, "ngroups": 3},
            ("ngroups",),
            r"ngroups \(3\) must divide .* = 8; "
            r"allowed ngroups: 1, 2, 4, 8",
        ),
        ({"d_ssm": 128}, ("d_ssm",), r"d_ssm \(128\) exceeds d_inner"),
        ({"dt_min": 0.5, "dt_max": 0.1}, ("dt_max",), r"dt_max \(0.1\) is below dt_min"),
    ],
)
def test_check_reports_bad_combinations(fields, path, message):
    cfg = Mamba2Config(**fields)
    problems = cfg.check(LayerContext(d_model=32))
    assert [p for p, _ in problems] == [path]
    with pytest.raises(SpecError, match=message):
        Mamba2(cfg, LayerContext(d_model=32))


SPEC = """\
model:
  d_model: 32
  layers:
    pattern: "M-"
    symbols:
      M: {{type: mamba2, d_state: 8{extra}}}
"""


@pytest.mark.parametrize(
    ("extra", "key", "message"),
    [
        (", headdim: 48", "headdim", r"headdim \(48\) must divide d_ssm \(64; expand·d_model"),
        (", headdim: 8, ngroups: 3", "ngroups", r"ngroups \(3\) must divide .* = 8"),
        (", d_ssm: 96", "d_ssm", r"d_ssm \(96\) exceeds d_inner"),
    ],
)
def test_check_errors_are_raised_at_load_naming_their_line(tmp_path, extra, key, message):
    path = tmp_path / "m.yaml"
    path.write_text(SPEC.format(extra=""))
    assert isinstance(mixstack.load_spec(path).model.layer_configs()[0], Mamba2Config)
    path.write_text(SPEC.format(extra=extra))
    with pytest.raises(SpecError, match=message) as info:
        mixstack.load_spec(path)
    text = str(info.value)
    assert f"{path}:6:" in text, text  # the line binding M
    assert f"model.layers.symbols.M.{key}" in text, text


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"A_init_range": (4.0, 2.0)}, "A_init_range must satisfy 0 < lo <= hi"),
        ({"dt_limit": (0.1, 0.01)}, "dt_limit must satisfy 0 <= lo < hi"),
        ({"d_state": 0}, "greater than or equal to 1"),
        ({"d_sate": 4}, "Extra inputs are not permitted"),
    ],
)
def test_field_validation(fields, message):
    with pytest.raises(ValidationError, match=message):
        Mamba2Config(**fields)


# -- FLOPs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("index", "length"), [(0, 64), (1, 50), (5, 7)])
def test_flops_per_token_matches_counted_matmuls(index, length):
    example = EXAMPLES[index]
    m = Mamba2(example.config, example.context())
    m.backends = BackendPolicy("torch")  # the counter sees torch's matmuls, not compiled C
    u = torch.randn(2, length, example.d_model)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        m(u)
    # the depthwise conv runs as shifted multiply-adds the counter does not see: K MACs
    # per channel and token
    conv = 2 * m.conv_dim * m.cfg.d_conv
    counted = counter.get_total_flops() / (2 * length)
    assert m.flops_per_token(length) == pytest.approx(counted + conv)


# -- gated RMSNorm --------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("group_size", [3, 12])
def test_gated_rms_norm_formula(norm_before_gate, group_size):
    y, z, w = rand(8, 2, 5, 12), rand(9, 2, 5, 12), rand(10, 12)
    out = gated_rms_norm(
        y, z, w, group_size=group_size, eps=1e-5, norm_before_gate=norm_before_gate
    )
    gate = z * torch.sigmoid(z)
    expected = torch.empty_like(y)
    src = y if norm_before_gate else y * gate
    for start in range(0, 12, group_size):
        part = src[..., start : start + group_size]
        expected[..., start : start + group_size] = part / torch.sqrt(
            (part**2).mean(-1, keepdim=True) + 1e-5
        )
    expected = expected * w * (gate if norm_before_gate else 1.0)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("group_size", [4, 12])
def test_gated_rms_norm_gradients_match_autograd_of_the_plain_expression(
    norm_before_gate, gated, group_size
):
    """The hand-written backward against autograd through gated_rms_norm_plain (float64,
    a (2, 7, 12) input: odd length, groups of 4 or one group); bf16 inputs come back in
    bf16 with gradients of their own dtypes."""
    from mixstack.blocks.gated_norm import gated_rms_norm_plain

    y, z, w = rand(20, 2, 7, 12), rand(21, 2, 7, 12), rand(22, 12)
    cot = rand(23, 2, 7, 12)
    leaves = [y, z, w] if gated else [y, w]
    kw = {"group_size": group_size, "eps": 1e-5, "norm_before_gate": norm_before_gate}
    res = []
    for fn in (gated_rms_norm, gated_rms_norm_plain):
        ts = [t.clone().requires_grad_() for t in leaves]
        out = fn(ts[0], ts[1] if gated else None, ts[-1], **kw)
        res.append((out, torch.autograd.grad(out, ts, cot)))
    (out_a, g_a), (out_b, g_b) = res
    torch.testing.assert_close(out_a, out_b, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_a, g_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    ts = [t.bfloat16().requires_grad_() for t in (y, z)] + [w.float().requires_grad_()]
    out = gated_rms_norm(ts[0], ts[1], ts[2], **kw)
    grads = torch.autograd.grad(out, ts, cot.bfloat16())
    assert out.dtype == torch.bfloat16
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.bfloat16, torch.float32]


def test_gated_norm_module_and_errors():
    norm = GatedRMSNorm(8, group_size=4)
    assert (norm.weight == 1).all()
    y = torch.randn(3, 8).bfloat16()
    assert norm(y).dtype == torch.bfloat16
    torch.testing.assert_close(
        norm(y).float(),
        gated_rms_norm(y.float(), None, norm.weight, group_size=4),
        rtol=1e-2,
        atol=1e-2,
    )
    with pytest.raises(ValueError, match="group_size 3 must divide dim 8"):
        GatedRMSNorm(8, group_size=3)
