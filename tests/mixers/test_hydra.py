"""Hydra layer: docs/math.md#hydra re-implemented here with plain torch from the module's weights
(two separate scans, no batch concatenation), the quasiseparable closed form built with
loops, packing, the one-step shift, init, names, config and loader errors, FLOPs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch.utils.flop_counter import FlopCounterMode

import mixstack
import mixstack.mixers.hydra  # registers "hydra"
from mixstack.dsl import registry
from mixstack.dsl.context import LayerContext
from mixstack.dsl.errors import SpecError
from mixstack.kernels.backends import BackendPolicy
from mixstack.mixers.base import apply_materialized, materialize
from mixstack.mixers.hydra import Hydra, HydraConfig, shift_index

F64 = torch.float64
EXAMPLES = HydraConfig.examples()
IDS = [e.name for e in EXAMPLES]


def build(cfg: HydraConfig, d_model: int = 32, seed: int = 0) -> Hydra:
    m = Hydra(cfg, LayerContext(d_model=d_model, arch="encoder")).double()
    m.reset_parameters(torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # A = −1, D = 1 and norm = 1 at init hide mistakes; make them generic
        m.A_log.uniform_(-1.0, 1.0, generator=g)
        m.D.uniform_(0.5, 1.5, generator=g)
        m.norm.weight.uniform_(0.5, 1.5, generator=g)
    return m


def rand(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# -- an independent Hydra, written from docs/math.md#hydra -----------------------------------------


def naive_parts(m: Hydra, u: torch.Tensor) -> dict[str, torch.Tensor]:
    """in_proj split, centred conv (explicit taps), silu, Δ of both directions, A, diagonal."""
    cfg = m.cfg
    d_inner, G, N = cfg.expand * u.shape[-1], cfg.ngroups, cfg.d_state
    H, P = d_inner // cfg.headdim, cfg.headdim
    proj = u @ m.in_proj.weight.T + (m.in_proj.bias if m.in_proj.bias is not None else 0)
    z, xBC, dt_f, dt_b = torch.split(proj, [d_inner, d_inner + 4 * G * N, H, H], dim=-1)
    K, length = cfg.d_conv, u.shape[1]
    w = m.conv1d.weight[:, 0, :]  # (conv_dim, K)
    conv = torch.zeros_like(xBC)
    for t in range(length):
        for k in range(K):
            src = t - K // 2 + k  # "same" padding: K//2 on both sides
            if 0 <= src < length:
                conv[:, t] += w[:, k] * xBC[:, src]
    if m.conv1d.bias is not None:
        conv = conv + m.conv1d.bias
    conv = F.silu(conv)
    x, B_f, C_f, B_b, C_b = torch.split(conv, [d_inner] + [G * N] * 4, dim=-1)
    lo, hi = cfg.dt_limit
    bsz = u.shape[0]

    def groups(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(bsz, length, G, N)  # (B, L, G, N)

    return {
        "z": z,
        "x": x.reshape(bsz, length, H, P),
        "B_f": groups(B_f),
        "C_f": groups(C_f),
        "B_b": groups(B_b),
        "C_b": groups(C_b),
        "dt_f": F.softplus(dt_f + m.dt_bias).clamp(min=lo, max=hi),  # dt_bias shared
        "dt_b": F.softplus(dt_b + m.dt_bias).clamp(min=lo, max=hi),
        "A": -torch.exp(m.A_log),  # shared
        "diag": m.D + x @ m.fc_D.weight.T,  # (B, L, H)
    }


def naive_ssd(x, dt, A, Bm, Cm) -> torch.Tensor:
    """S_t = exp(Δ_t A) S_{t−1} + Δ_t x_t B_tᵀ, y_t = S_t C_t, one step at a time (no D)."""
    bsz, length, H, P = x.shape
    rep = H // Bm.shape[2]
    Bh, Ch = Bm.repeat_interleave(rep, dim=2), Cm.repeat_interleave(rep, dim=2)  # (B, L, H, N)
    S = torch.zeros(bsz, H, P, Bm.shape[-1], dtype=x.dtype)
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * A)[..., None, None]
        S = decay * S + dt[:, t, :, None, None] * x[:, t, :, :, None] * Bh[:, t, :, None, :]
        ys.append((S @ Ch[:, t, :, :, None])[..., 0])
    return torch.stack(ys, dim=1)  # (B, L, H, P)


def shift_one(y: torch.Tensor) -> torch.Tensor:
    """y'[t] = y[t−1], y'[0] = 0 (time axis 1)."""
    return torch.cat([torch.zeros_like(y[:, :1]), y[:, :-1]], dim=1)


def naive_hydra(m: Hydra, u: torch.Tensor) -> torch.Tensor:
    """Forward scan + a separate scan of the time-reversed backward stream + diagonal."""
    p = naive_parts(m, u)
    x = p["x"]
    y_fw = shift_one(naive_ssd(x, p["dt_f"], p["A"], p["B_f"], p["C_f"]))
    rev = [t.flip(1) for t in (x, p["dt_b"], p["B_b"], p["C_b"])]
    y_bw = shift_one(naive_ssd(rev[0], rev[1], p["A"], rev[2], rev[3])).flip(1)
    y = (y_fw + y_bw + x * p["diag"][..., None]).flatten(-2)  # (B, L, d_inner)
    y = y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5) * m.norm.weight  # no groups
    y = y * F.silu(p["z"])  # norm before gate
    out = y @ m.out_proj.weight.T
    return out + m.out_proj.bias if m.out_proj.bias is not None else out


def closed_form(m: Hydra, u: torch.Tensor) -> torch.Tensor:
    """The quasiseparable matrix of docs/math.md#hydra, entry by entry -> (B, H, L, L)."""
    p = naive_parts(m, u)
    bsz, length, H, _ = p["x"].shape
    g = [h // (H // m.cfg.ngroups) for h in range(H)]  # group of each head
    A = p["A"]
    M = torch.zeros(bsz, H, length, length, dtype=F64)
    for i in range(length):
        M[:, :, i, i] = p["diag"][:, i]
        for j in range(i):  # below the diagonal: forward parameters, read at i − 1
            cb = (p["C_f"][:, i - 1, g] * p["B_f"][:, j, g]).sum(-1)  # (B, H)
            decay = torch.exp(A * p["dt_f"][:, j + 1 : i].sum(1))
            M[:, :, i, j] = cb * decay * p["dt_f"][:, j]
        for j in range(i + 1, length):  # above: backward parameters, read at i + 1
            cb = (p["C_b"][:, i + 1, g] * p["B_b"][:, j, g]).sum(-1)
            decay = torch.exp(A * p["dt_b"][:, i + 1 : j].sum(1))
            M[:, :, i, j] = cb * decay * p["dt_b"][:, j]
    return M


# -- the acceptance checks ------------------------------------------------------------------------


@pytest.mark.parametrize("example", EXAMPLES, ids=IDS)
def test_output_and_gradients_equal_two_separate_scans(example):
    m = build(example.config, example.d_model)
    u = rand(1, 2, 13, example.d_model).requires_grad_()
    cot = rand(2, 2, 13, example.d_model)
    got = m(u)
    grads = torch.autograd.grad((got * cot).sum(), [u, *m.parameters()])
    want = naive_hydra(m, u)
    want_grads = torch.autograd.grad((want * cot).sum(), [u, *m.parameters()])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    names = ["x", *dict(m.named_parameters())]
    for name, a, b in zip(names, grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=f"d{name}")


@pytest.mark.parametrize("example", EXAMPLES, ids=IDS)
def test_materialized_matrix_equals_quasiseparable_closed_form(example):
    m = build(example.config, example.d_model)
    u = rand(3, 2, 11, example.d_model)
    matrices, finish = materialize(m, u)
    assert len(matrices) == 1
    M, v = matrices[0]
    torch.testing.assert_close(M, closed_form(m, u), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(v, naive_parts(m, u)["x"].transpose(1, 2), rtol=0, atol=1e-13)
    torch.testing.assert_close(apply_materialized(matrices, finish), m(u), rtol=1e-10, atol=1e-12)


def test_each_direction_uses_its_own_B_and_C():
    """Zeroing the backward B channels of the conv (so B_b = silu(0) = 0) empties the upper
    triangle only; zeroing the forward ones empties the lower triangle only (the published
    MatrixMixer variant shares them, Hydra does not)."""
    cfg = EXAMPLES[1].config  # ngroups 2
    u = rand(4, 1, 9, 32)
    d_inner, GN = 64, cfg.ngroups * cfg.d_state
    for start, kept in ((d_inner + 2 * GN, "lower"), (d_inner, "upper")):
        m = build(cfg)
        with torch.no_grad():  # conv channels [x | B_f | C_f | B_b | C_b]: B_b, then B_f
            m.conv1d.weight[start : start + GN] = 0.0
            m.conv1d.bias[start : start + GN] = 0.0
        M = materialize(m, u)[0][0][0]
        lower, upper = torch.tril(M, -1).abs().amax(), torch.triu(M, 1).abs().amax()
        assert (lower > 1e-3, upper > 1e-3) == (kept == "lower", kept == "upper")


# -- packing and the shift ------------------------------------------------------------------------


def test_shift_index_reads_the_previous_real_position_of_the_same_document():
    seq_idx = torch.tensor([[0, 0, -1, 0, 1, 1, -1, 2]])
    prev, keep = shift_index(seq_idx, 1, 8, torch.device("cpu"))
    assert keep.tolist() == [[False, True, False, True, False, True, False, False]]
    assert prev[keep].tolist() == [0, 1, 4]  # t = 1, 3 (skips the pad at 2), 5
    prev, keep = shift_index(None, 2, 4, torch.device("cpu"))
    assert prev.tolist() == [[0, 0, 1, 2]] * 2 and keep.tolist() == [[False, True, True, True]] * 2


def test_packed_matrix_is_block_diagonal_with_transparent_padding():
    """Each document's block equals the closed form of that document alone (padding inside
    a document removed); every other entry, padding rows and columns included, is 0."""
    m = build(EXAMPLES[1].config)
    rows = [[0] * 5 + [-1] * 2 + [0] * 3 + [1] * 6, [-1] * 2 + [3] * 9 + [4] * 5]
    seq_idx = torch.tensor(rows)
    u = rand(5, 2, 16, 32)
    matrices, finish = materialize(m, u, seq_idx=seq_idx)
    M = matrices[0][0]
    want = torch.zeros_like(M)
    out = m(u, seq_idx=seq_idx)
    for b, row in enumerate(rows):
        for doc in sorted(set(row) - {-1}):
            pos = torch.tensor([t for t, s in enumerate(row) if s == doc])
            alone = u[b : b + 1, pos]
            want[b, :, pos[:, None], pos[None, :]] = closed_form(m, alone)[0]
            torch.testing.assert_close(out[b, pos], m(alone)[0], rtol=1e-10, atol=1e-12)
        pad = torch.tensor(row) < 0
        assert (out[b, pad] == 0).all()
    torch.testing.assert_close(M, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(apply_materialized(matrices, finish), out, rtol=1e-10, atol=1e-12)


def test_no_nan_in_backward_with_long_sequences_and_large_dt():
    m = Hydra(HydraConfig(d_state=8, headdim=8, chunk_size=64), LayerContext(d_model=32))
    m.reset_parameters(torch.Generator().manual_seed(0))
    with torch.no_grad():
        m.dt_bias.fill_(30.0)  # Δ ≈ 30: exp(ΔA) underflows to 0 in both directions
        m.A_log.fill_(math.log(16.0))
    u = torch.randn(1, 700, 32, generator=torch.Generator().manual_seed(1))
    m(u).square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


# -- no decoding -----------------------------------------------------------------------------------


def test_refuses_to_decode():
    m = build(EXAMPLES[0].config)
    with pytest.raises(TypeError, match=r"bidirectional .* no decoding"):
        m.init_state(1, 8, device="cpu", dtype=F64)
    with pytest.raises(TypeError, match="decod"):
        m.step(rand(0, 1, 32), None)
    with pytest.raises(TypeError, match="decod"):
        m(rand(0, 1, 4, 32), state=object())
    assert m.state_nbytes(100, torch.float32) == 0


# -- parameters, init, hints -----------------------------------------------------------------------


def test_parameter_names_and_shapes_match_hydra():
    cfg = HydraConfig(d_state=16, headdim=16, ngroups=2)
    m = Hydra(cfg, LayerContext(d_model=64, arch="encoder"))
    # d_inner 128, H 8, 4GN = 128: conv_dim 256, in_proj 2·128 + 128 + 2·8 = 400
    assert {n: tuple(p.shape) for n, p in m.named_parameters()} == {
        "in_proj.weight": (400, 64),
        "conv1d.weight": (256, 1, 7),
        "conv1d.bias": (256,),
        "dt_bias": (8,),
        "A_log": (8,),
        "D": (8,),
        "fc_D.weight": (8, 128),
        "norm.weight": (128,),
        "out_proj.weight": (64, 128),
    }
    assert m.conv1d.padding == (3,)
    biased = Hydra(cfg.model_copy(update={"bias": True, "conv_bias": False}), m.ctx)
    shapes = {n: tuple(p.shape) for n, p in biased.named_parameters()}
    assert shapes["in_proj.bias"] == (400,) and shapes["out_proj.bias"] == (64,)
    assert "conv1d.bias" not in shapes and "fc_D.bias" not in shapes


def test_init_follows_hydra():
    cfg = HydraConfig(d_state=8, headdim=2, dt_min=0.002, dt_max=0.05)
    m = Hydra(cfg, LayerContext(d_model=64))  # 64 heads
    m.reset_parameters(torch.Generator().manual_seed(0))
    assert (m.A_log == 0).all()  # A = −1 for every head
    dt = F.softplus(m.dt_bias.double())
    assert dt.min() >= 0.002 * (1 - 1e-6) and dt.max() <= 0.05 * (1 + 1e-6)
    assert dt.log().std() > 0.5  # log-uniform over [ln 0.002, ln 0.05] has std ≈ 0.93
    assert (m.D == 1).all() and (m.norm.weight == 1).all()
    assert m.norm.group_size == 128 and m.norm.norm_before_gate
    for lin, fan_in in ((m.in_proj, 64), (m.fc_D, 128), (m.out_proj, 128)):
        bound = 1 / math.sqrt(fan_in)
        assert lin.weight.abs().max() <= bound and lin.weight.std() > 0.8 * bound / math.sqrt(3)
    assert m.conv1d.weight.abs().max() <= 1 / math.sqrt(7)
    other = Hydra(cfg.model_copy(update={"A_init": 4.0}), LayerContext(d_model=64))
    torch.testing.assert_close(other.A_log.data, torch.full((64,), math.log(4.0)))


def test_dt_floor_applies_and_inverse_softplus_is_exact():
    cfg = HydraConfig(d_state=8, headdim=8, dt_min=1e-6, dt_max=2e-6, dt_init_floor=1e-3)
    m = Hydra(cfg, LayerContext(d_model=32)).double()
    m.reset_parameters(torch.Generator().manual_seed(0))
    torch.testing.assert_close(F.softplus(m.dt_bias), torch.full((8,), 1e-3, dtype=F64))


def test_param_hints():
    hints = Hydra(EXAMPLES[0].config, LayerContext(d_model=32)).param_hints()
    for name in ("A_log", "D", "dt_bias"):
        assert hints[name].keep_fp32 and hints[name].no_weight_decay
    assert hints["out_proj.weight"].residual_out
    assert "fc_D.weight" not in hints  # an ordinary weight: decayed, cast


# -- config, loader -------------------------------------------------------------------------------


def test_registered_with_capabilities():
    assert registry.get("hydra").config_cls is HydraConfig
    caps = HydraConfig().capabilities(LayerContext(d_model=64))
    assert not caps.causal and not caps.decode and not caps.length_dependent
    defaults = HydraConfig()
    assert (defaults.d_state, defaults.d_conv, defaults.headdim, defaults.chunk_size) == (
        64,
        7,
        64,
        256,
    )
    assert defaults.dt_limit == (0.0, None)
    assert HydraConfig(dt_limit=(0.0, float("inf"))).dt_limit == (0.0, None)


@pytest.mark.parametrize(
    ("fields", "path", "message"),
    [
        (
            {"headdim": 48},
            ("headdim",),
            r"headdim \(48\) must divide d_inner \(64; expand·d_model = 2·32\); "
            r"allowed headdim: 1, 2, 4, 8, 16, 32, 64",
        ),
        (
            {"headdim": 8, "ngroups": 3},
            ("ngroups",),
            r"ngroups \(3\) must divide .* = 8; allowed ngroups: 1, 2, 4, 8",
        ),
        ({"d_conv": 4}, ("d_conv",), r"d_conv \(4\) must be odd.*allowed: 3 or 5"),
        ({"dt_min": 0.5, "dt_max": 0.1}, ("dt_max",), r"dt_max \(0.1\) is below dt_min"),
    ],
)
def test_check_reports_bad_combinations(fields, path, message):
    cfg = HydraConfig(**fields)
    problems = cfg.check(LayerContext(d_model=32))
    assert [p for p, _ in problems] == [path]
    with pytest.raises(SpecError, match=message):
        Hydra(cfg, LayerContext(d_model=32))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"dt_limit": (0.1, 0.01)}, "dt_limit must satisfy 0 <= lo < hi"),
        ({"A_init": 0.0}, "greater than 0"),
        ({"d_state": 0}, "greater than or equal to 1"),
        ({"d_sate": 4}, "Extra inputs are not permitted"),
    ],
)
def test_field_validation(fields, message):
    with pytest.raises(ValidationError, match=message):
        HydraConfig(**fields)


SPEC = """\
model:
  arch: {arch}
  d_model: 32
  layers:
    pattern: "Y-"
    symbols:
      Y: {{type: hydra, d_state: 8, headdim: 8{extra}}}
"""


def test_causal_lm_refuses_hydra_at_load_naming_its_line(tmp_path):
    path = tmp_path / "lm.yaml"
    path.write_text(SPEC.format(arch="causal_lm", extra=""))
    with pytest.raises(SpecError, match="arch causal_lm needs causal layers") as info:
        mixstack.load_spec(path)
    text = str(info.value)
    assert f"{path}:7:" in text, text  # the line binding Y
    assert "model.layers.symbols.Y" in text and "type hydra" in text
    assert "arch: encoder" in text


def test_encoder_loads_hydra_and_check_errors_name_their_line(tmp_path):
    path = tmp_path / "enc.yaml"
    path.write_text(SPEC.format(arch="encoder", extra=""))
    cfg = mixstack.load_spec(path).model.layer_configs()[0]
    assert isinstance(cfg, HydraConfig) and cfg.d_conv == 7
    path.write_text(SPEC.format(arch="encoder", extra=", d_conv: 4"))
    with pytest.raises(SpecError, match=r"d_conv \(4\) must be odd") as info:
        mixstack.load_spec(path)
    assert f"{path}:7:" in str(info.value) and "model.layers.symbols.Y.d_conv" in str(info.value)


# -- FLOPs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("index", "length"), [(0, 64), (1, 50), (2, 7)])
def test_flops_per_token_matches_counted_matmuls(index, length):
    example = EXAMPLES[index]
    m = Hydra(example.config, example.context())
    m.backends = BackendPolicy("torch")  # the counter sees torch's matmuls, not compiled C
    u = torch.randn(2, length, example.d_model)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        m(u)
    # the depthwise conv runs as shifted multiply-adds the counter does not see: K MACs
    # per channel and token
    conv = 2 * m.conv_dim * m.cfg.d_conv
    counted = counter.get_total_flops() / (2 * length)
    assert m.flops_per_token(length) == pytest.approx(counted + conv)
