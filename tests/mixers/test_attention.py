"""The attention mixer against an explicit-softmax closed form built from its weights."""

from __future__ import annotations

import math
import re

import pytest
import torch
from pydantic import ValidationError

from mixstack.dsl.context import LayerContext
from mixstack.dsl.errors import MixstackError, SpecError
from mixstack.kernels.backends import BackendPolicy
from mixstack.mixers.attention import Attention, AttentionConfig, AttentionState, RopeConfig
from mixstack.mixers.base import apply_materialized, materialize

F64 = torch.float64


def build(cfg: AttentionConfig, *, d_model: int = 24, arch: str = "causal_lm", seed: int = 0,
          dtype: torch.dtype = F64, random_biases: bool = True) -> Attention:  # fmt: skip
    """A module with large-ish weights (peaked softmax) and, if any, non-zero biases."""
    ctx = LayerContext(d_model=d_model, arch=arch, max_seq_len=64, init_std=0.3)
    module = Attention(cfg, ctx).to(dtype)
    g = torch.Generator().manual_seed(seed)
    module.reset_parameters(g)
    if random_biases:
        with torch.no_grad():
            for name, p in module.named_parameters():
                if name.endswith("bias"):
                    p.copy_(torch.randn(p.shape, generator=g, dtype=dtype))
    return module


def loop_positions(seq_idx: torch.Tensor | None, B: int, L: int) -> torch.Tensor:
    if seq_idx is None:
        return torch.arange(L).expand(B, L)
    out = torch.zeros(B, L, dtype=torch.long)
    for b in range(B):
        prev, nxt = None, 0
        for t in range(L):
            s = int(seq_idx[b, t])
            if s < 0:
                continue
            nxt = 0 if s != prev else nxt
            out[b, t], nxt, prev = nxt, nxt + 1, s
    return out


def rotate(x: torch.Tensor, positions: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    """Complex-number RoPE on the first rope.dim channels; positions (B, L)."""
    r = rope.dim
    freqs = torch.tensor([rope.theta ** (-2.0 * m / r) for m in range(r // 2)], dtype=F64)
    angle = positions.double()[:, :, None, None] * freqs
    z = torch.complex(x[..., : r // 2], x[..., r // 2 : r]) * torch.polar(
        torch.ones_like(angle), angle
    )
    return torch.cat((z.real, z.imag, x[..., r:]), dim=-1)


def closed_form(m: Attention, x: torch.Tensor, seq_idx: torch.Tensor | None = None):
    """(M (B, H, L, L), v (B, H, L, P), out (B, L, D)) from the module's weights."""
    cfg = m.cfg
    B, L, _ = x.shape
    H, Hkv, P = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def linear(layer: torch.nn.Linear, inp: torch.Tensor) -> torch.Tensor:
        return inp @ layer.weight.T + (0 if layer.bias is None else layer.bias)

    q = linear(m.q_proj, x).view(B, L, H, P)
    k = linear(m.k_proj, x).view(B, L, Hkv, P)
    v = linear(m.v_proj, x).view(B, L, Hkv, P)
    if cfg.rope is not None:
        pos = loop_positions(seq_idx, B, L)
        q, k = rotate(q, pos, cfg.rope), rotate(k, pos, cfg.rope)
    kv = [h * Hkv // H for h in range(H)]  # KV head of each query head
    k, v = k[:, :, kv].transpose(1, 2), v[:, :, kv].transpose(1, 2)  # (B, H, L, P)
    scale = cfg.softmax_scale or 1.0 / math.sqrt(P)
    scores = torch.einsum("bihp,bhjp->bhij", q, k) * scale
    visible = torch.zeros(B, 1, L, L, dtype=torch.bool)
    for b in range(B):
        for i in range(L):
            for j in range(L):
                ok = (not cfg.causal or j <= i) and (cfg.window is None or i - j < cfg.window)
                if seq_idx is not None:
                    ok = ok and int(seq_idx[b, j]) >= 0 and int(seq_idx[b, i]) == seq_idx[b, j]
                visible[b, 0, i, j] = ok
    weights = torch.exp(scores.masked_fill(~visible, -math.inf) - scores.amax(-1, keepdim=True))
    total = weights.sum(-1, keepdim=True)
    M = torch.where(total > 0, weights / total.clamp_min(1e-300), torch.zeros_like(weights))
    o = (M @ v).transpose(1, 2).reshape(B, L, H * P)
    out = linear(m.o_proj, o)
    if seq_idx is not None:
        out = out * (seq_idx >= 0)[..., None]
    return M, v, out


PACKED = torch.tensor([[0, 0, 0, 1, 1, 1, 1, -1, -1], [-1, 4, 4, 4, 4, 7, 7, 7, 7]])

CONFIGS = {
    "causal-mha": (AttentionConfig(n_heads=3), "causal_lm"),
    "bidirectional": (AttentionConfig(n_heads=3), "encoder"),
    "gqa": (AttentionConfig(n_heads=4, n_kv_heads=2), "causal_lm"),
    "mqa-partial-rope": (
        AttentionConfig(n_heads=4, n_kv_heads=1, rope=RopeConfig(dim=2, theta=100.0)),
        "causal_lm",
    ),
    "window": (AttentionConfig(n_heads=2, window=3, rope=None), "causal_lm"),
    "odd-head-dim-scale-biases": (
        AttentionConfig(
            n_heads=2,
            head_dim=5,
            rope=RopeConfig(dim=4),
            softmax_scale=0.9,
            qkv_bias=True,
            out_bias=True,
        ),
        "causal_lm",
    ),
}


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_materialized_matrix_equals_closed_form(name: str, packed: bool) -> None:
    cfg, arch = CONFIGS[name]
    m = build(cfg, arch=arch)
    seq_idx = PACKED if packed else None
    x = torch.randn(2, 9, 24, generator=torch.Generator().manual_seed(1), dtype=F64)
    want_M, want_v, want_out = closed_form(m, x, seq_idx)
    terms, finish = materialize(m, x, seq_idx=seq_idx)
    assert len(terms) == 1
    (M, v), = terms  # fmt: skip
    torch.testing.assert_close(M, want_M, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(v, want_v, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        out = m(x, seq_idx=seq_idx)
    torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(apply_materialized(terms, finish), out, rtol=1e-10, atol=1e-12)
    # the softmax is not uniform: the weights make the test sensitive to mistakes
    assert M.amax() > 0.5


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_gradients_through_matrix_view_and_closed_form_equal_forward(name: str) -> None:
    cfg, arch = CONFIGS[name]
    m = build(cfg, arch=arch, seed=2)
    x0 = torch.randn(2, 7, 24, generator=torch.Generator().manual_seed(3), dtype=F64)
    cot = torch.randn(2, 7, 24, generator=torch.Generator().manual_seed(4), dtype=F64)

    def grads(fn) -> list[torch.Tensor]:
        m.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        (fn(x) * cot).sum().backward()
        return [x.grad, *(p.grad for p in m.parameters())]

    def via_matrix(x: torch.Tensor) -> torch.Tensor:
        terms = m.mixing_terms(x)
        (coeffs, v), = terms.terms  # fmt: skip
        basis = torch.eye(7, dtype=F64)[None, :, None, :].expand(2, 7, m.n_heads, 7)
        M = m.mix(coeffs, basis).permute(0, 2, 1, 3)  # (B, H, L, L), differentiable
        return terms.finish((M @ v.permute(0, 2, 1, 3)).permute(0, 2, 1, 3))

    want = grads(m)
    for fn in (via_matrix, lambda x: closed_form(m, x)[2]):
        for g_got, g_want in zip(grads(fn), want, strict=True):
            torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-12)


def test_padding_outputs_zero_and_changes_nothing_even_with_out_bias() -> None:
    m = build(AttentionConfig(n_heads=2, out_bias=True, qkv_bias=True))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 9, 24, generator=g, dtype=F64)
    out = m(x, seq_idx=PACKED)
    assert torch.equal(out[PACKED < 0], torch.zeros_like(out[PACKED < 0]))
    noisy = torch.where((PACKED < 0)[..., None], torch.randn(x.shape, generator=g, dtype=F64), x)
    torch.testing.assert_close(m(noisy, seq_idx=PACKED), out, rtol=0, atol=0)


# -- decoding -----------------------------------------------------------------------------


def decode_pieces(m: Attention, x: torch.Tensor, chunks: list[int], *, seq_idx=None, max_len=None):
    """Prefill in ``chunks``, then step the remaining tokens one by one."""
    B, L, _ = x.shape
    state = m.init_state(B, max_len or L, device="cpu", dtype=x.dtype)
    outs, t = [], 0
    for n in chunks:
        ids = None if seq_idx is None else seq_idx[:, t : t + n]
        outs.append(m(x[:, t : t + n], seq_idx=ids, state=state))
        t += n
    for s in range(t, L):
        outs.append(m.step(x[:, s], state)[:, None])
    return torch.cat(outs, dim=1), state


@pytest.mark.parametrize("name", ["causal-mha", "gqa", "window", "odd-head-dim-scale-biases"])
@pytest.mark.parametrize("chunks", [[5], [3, 4], [1, 1, 1]], ids=str)
def test_chunked_prefill_then_steps_equal_forward(name: str, chunks: list[int]) -> None:
    m = build(CONFIGS[name][0])
    x = torch.randn(2, 11, 24, generator=torch.Generator().manual_seed(6), dtype=F64)
    with torch.no_grad():
        got, state = decode_pieces(m, x, chunks)
        want = m(x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert state.offset == 11 and state.next_pos.tolist() == [11, 11]


def test_packed_prefill_with_padding_then_steps_continue_the_last_document() -> None:
    m = build(AttentionConfig(n_heads=2, n_kv_heads=1))
    # row 0 ends a document then right-padding; row 1 is left-padded
    prefill_ids = torch.tensor([[0, 0, 1, 1, 1, -1], [-1, -1, 3, 3, 3, 3]])
    L, steps = 6, 3
    full_ids = torch.cat((prefill_ids, torch.tensor([[1] * steps, [3] * steps])), dim=1)
    x = torch.randn(2, L + steps, 24, generator=torch.Generator().manual_seed(7), dtype=F64)
    with torch.no_grad():
        got, state = decode_pieces(m, x, [L], seq_idx=full_ids)
        want = m(x, seq_idx=full_ids)
    real = full_ids >= 0
    torch.testing.assert_close(got[real], want[real], rtol=1e-10, atol=1e-12)
    assert torch.equal(got[~real], torch.zeros_like(got[~real]))
    # RoPE positions continue inside each row's last document
    assert state.next_pos.tolist() == [3 + steps, 4 + steps]
    assert state.seq_id.tolist() == [1, 3]


def test_index_select_reorders_the_cache_for_beam_search() -> None:
    m = build(AttentionConfig(n_heads=2))
    x = torch.randn(3, 8, 24, generator=torch.Generator().manual_seed(8), dtype=F64)
    order = torch.tensor([2, 0, 0])
    with torch.no_grad():
        state = m.init_state(3, 8, device="cpu", dtype=F64)
        m(x[:, :5], state=state)
        state = state.index_select(order)
        assert isinstance(state, AttentionState) and state.offset == 5
        got = torch.stack([m.step(x[order, t], state) for t in range(5, 8)], dim=1)
        want = m(x[order])[:, 5:]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_cache_overflow_is_a_clear_error() -> None:
    m = build(AttentionConfig(n_heads=2))
    state = m.init_state(1, 4, device="cpu", dtype=F64)
    m(torch.zeros(1, 3, 24, dtype=F64), state=state)
    m.step(torch.zeros(1, 24, dtype=F64), state)
    with pytest.raises(MixstackError, match=r"holds 4 tokens, 4 are filled and this call adds 1"):
        m.step(torch.zeros(1, 24, dtype=F64), state)


def test_bidirectional_attention_refuses_to_decode() -> None:
    m = build(AttentionConfig(n_heads=2), arch="encoder")
    assert not m.capabilities.decode and not m.capabilities.causal
    with pytest.raises(MixstackError, match="cannot decode"):
        m.init_state(1, 4, device="cpu", dtype=F64)


def test_state_on_meta_device_and_its_size() -> None:
    m = build(AttentionConfig(n_heads=4, n_kv_heads=2, head_dim=6))
    state = m.init_state(3, 100, device="meta", dtype=torch.bfloat16)
    assert all(t.is_meta for t in state.tensors())
    assert state.k.shape == (3, 100, 2, 6) and state.seq_ids.shape == (3, 100)
    # K and V in bf16, one int32 document id per slot, two int64 per row
    assert m.state_nbytes(100, torch.bfloat16) == 2 * 100 * 2 * 6 * 2 + 100 * 4 + 2 * 8


def test_reference_policy_gives_the_same_result() -> None:
    m = build(CONFIGS["gqa"][0])
    x = torch.randn(2, 9, 24, generator=torch.Generator().manual_seed(9), dtype=F64)
    with torch.no_grad():
        fast = m(x, seq_idx=PACKED)
        m.backends = BackendPolicy("reference")
        ref = m(x, seq_idx=PACKED)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
    assert m.backends.resolved() == {"attention@cpu/float64": "reference"}


# -- bookkeeping -----------------------------------------------------------------------------


def test_parameter_names_and_hints() -> None:
    m = build(AttentionConfig(n_heads=4, n_kv_heads=2, qkv_bias=True), d_model=16)
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert shapes == {
        "q_proj.weight": (16, 16), "q_proj.bias": (16,),
        "k_proj.weight": (8, 16), "k_proj.bias": (8,),
        "v_proj.weight": (8, 16), "v_proj.bias": (8,),
        "o_proj.weight": (16, 16),
    }  # fmt: skip
    hints = m.param_hints()
    assert hints["o_proj.weight"].residual_out and set(hints) == {"o_proj.weight"}


@pytest.mark.parametrize(
    ("cfg", "arch"),
    [
        (AttentionConfig(n_heads=4, n_kv_heads=2), "causal_lm"),
        (AttentionConfig(n_heads=4, window=5), "causal_lm"),
        (AttentionConfig(n_heads=2, window=50), "causal_lm"),
        (AttentionConfig(n_heads=4), "encoder"),
    ],
)
@pytest.mark.parametrize("seq_len", [1, 9, 64])
def test_flops_per_token_counts_visible_keys(cfg: AttentionConfig, arch: str, seq_len: int):
    m = build(cfg, d_model=16, arch=arch)
    H, Hkv, P, D = m.n_heads, m.n_kv_heads, m.head_dim, 16
    causal, window = m.cfg.causal, m.cfg.window
    visible = sum(
        1
        for i in range(seq_len)
        for j in range(seq_len)
        if (not causal or j <= i) and (window is None or i - j < window)
    )
    projections = 2 * (D * H * P * 2 + 2 * D * Hkv * P)
    want = projections + 4 * H * P * visible / seq_len
    assert m.flops_per_token(seq_len) == pytest.approx(want, rel=1e-12)


# -- config --------------------------------------------------------------------------------


def ctx(d_model: int = 32, arch: str = "causal_lm") -> LayerContext:
    return LayerContext(d_model=d_model, arch=arch, max_seq_len=16)


def test_resolve_fills_every_default() -> None:
    cfg = AttentionConfig(n_heads=4).resolve(ctx())
    assert (cfg.n_kv_heads, cfg.head_dim, cfg.causal) == (4, 8, True)
    assert cfg.rope == RopeConfig(theta=10000.0, dim=8)
    assert cfg.softmax_scale is None and cfg.window is None
    assert AttentionConfig().resolve(ctx(arch="classifier")).causal is False
    assert AttentionConfig(causal=True).resolve(ctx(arch="encoder")).causal is True
    assert AttentionConfig(rope=None).resolve(ctx()).rope is None
    assert AttentionConfig(head_dim=6, rope=RopeConfig(dim=4)).resolve(ctx()).rope.dim == 4
    # resolving twice changes nothing (the dumped spec is a fixed point)
    assert cfg.resolve(ctx()) == cfg


def test_capabilities_follow_causality() -> None:
    caps = AttentionConfig().capabilities(ctx())
    assert caps.causal and caps.decode and not caps.needs_input_ids and not caps.length_dependent
    caps = AttentionConfig().capabilities(ctx(arch="encoder"))
    assert not caps.causal and not caps.decode


@pytest.mark.parametrize(
    ("kwargs", "d_model", "arch", "path", "message"),
    [
        ({"n_heads": 6, "n_kv_heads": 4}, 48, "causal_lm", ("n_kv_heads",),
         r"n_heads \(6\) must be a multiple of n_kv_heads \(4\); allowed n_kv_heads: 1, 2, 3, 6"),
        ({"n_heads": 5}, 32, "causal_lm", ("n_heads",),
         r"d_model \(32\) is not divisible by n_heads \(5\); set head_dim"),
        ({"n_heads": 4, "rope": {"dim": 5}}, 32, "causal_lm", ("rope", "dim"),
         r"rotary dim must be even .* got 5"),
        ({"n_heads": 2, "head_dim": 7}, 32, "causal_lm", ("rope", "dim"),
         r"got 7; rope.dim defaults to head_dim"),
        ({"n_heads": 4, "rope": {"dim": 16}}, 32, "causal_lm", ("rope", "dim"),
         r"rotary dim \(16\) exceeds head_dim \(8\)"),
        ({"n_heads": 4, "window": 8}, 32, "encoder", ("window",),
         r"window \(8\) needs causal attention"),
    ],
)  # fmt: skip
def test_check_reports_path_and_message(kwargs, d_model, arch, path, message) -> None:
    cfg = AttentionConfig(**kwargs)
    for candidate in (cfg, cfg.resolve(ctx(d_model, arch))):
        problems = candidate.check(ctx(d_model, arch))
        assert len(problems) == 1, problems
        assert problems[0][0] == path
        assert re.search(message, problems[0][1]), problems[0][1]
    with pytest.raises(SpecError, match=message):
        Attention(cfg, ctx(d_model, arch))


def test_valid_configs_pass_check() -> None:
    good = [
        AttentionConfig(n_heads=4, n_kv_heads=1),
        AttentionConfig(n_heads=5, head_dim=8),  # head_dim given: d_model need not divide
        AttentionConfig(n_heads=4, window=1000),  # window beyond max_seq_len is fine
        AttentionConfig(n_heads=4, rope=RopeConfig(dim=2)),
        AttentionConfig(n_heads=4, window=4, causal=True),
    ]
    for cfg in good:
        assert cfg.check(ctx()) == [] and cfg.resolve(ctx()).check(ctx()) == []


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"n_heads": 0}, "greater than or equal to 1"),
        ({"window": 0}, "greater than or equal to 1"),
        ({"rope": {"theta": -1.0}}, "greater than 0"),
        ({"softmax_scale": 0.0}, "greater than 0"),
        ({"n_head": 4}, "Extra inputs are not permitted"),
        ({"rope": {"base": 10.0}}, "Extra inputs are not permitted"),
        ({"type": "mamba2"}, "Input should be 'attention'"),
    ],
)
def test_field_validation(data: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        AttentionConfig.model_validate({"type": "attention", **data})


def test_every_field_is_described() -> None:
    for model in (AttentionConfig, RopeConfig):
        for name, field in model.model_fields.items():
            assert name == "type" or field.description, f"{model.__name__}.{name}"


def test_examples_cover_the_modes() -> None:
    examples = AttentionConfig.examples()
    resolved = [e.config.resolve(e.context()) for e in examples]
    assert len({e.name for e in examples}) == len(examples)
    assert any(c.n_kv_heads == 1 for c in resolved)
    assert any(1 < c.n_kv_heads < c.n_heads for c in resolved)
    assert any(c.window for c in resolved) and any(not c.causal for c in resolved)
    assert any(c.rope is None for c in resolved)
    assert any(c.rope is not None and c.rope.dim < c.head_dim for c in resolved)
    assert any(c.qkv_bias and c.out_bias for c in resolved)


def test_bf16_module_runs_and_is_close_to_fp32() -> None:
    m = build(AttentionConfig(n_heads=2, n_kv_heads=1), dtype=torch.float32)
    x = torch.randn(2, 9, 24, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        want = m(x, seq_idx=PACKED)
        got = m.to(torch.bfloat16)(x.bfloat16(), seq_idx=PACKED)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert ((got.float() - want).norm() / want.norm()) < 3e-2
