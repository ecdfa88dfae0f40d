"""An explicit fp64 build is fp64 throughout; the tied head survives meta / to_empty moves."""

from __future__ import annotations

import torch

import mixstack

SPEC = {
    "model": {
        "vocab_size": 16,
        "max_seq_len": 32,
        "d_model": 16,
        "layers": {
            "pattern": "S-M-",
            "symbols": {
                "S": {"type": "s4d", "d_state": 4},
                "M": {"type": "mamba2", "d_state": 8, "headdim": 8, "chunk_size": 8},
                "-": {"type": "mlp", "hidden": 32},
            },
        },
    }
}


def test_fp64_build_is_fp64_throughout_and_decode_matches_forward() -> None:
    model = mixstack.build(SPEC, seed=3, dtype=torch.float64).eval()
    keep = {n for n, h in model.param_hints().items() if h.keep_fp32}
    assert keep  # the S4D / Mamba-2 scalars that bf16 keeps in fp32
    dtypes = {n: t.dtype for n, t in model.state_dict().items() if t.is_floating_point()}
    assert set(dtypes.values()) == {torch.float64}, {n: d for n, d in dtypes.items() if n in keep}
    ids = torch.randint(0, 20, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)  # (B, L, V)
        state = model.init_state(2, 11)
        model(ids[:, :5], state=state)
        steps = torch.stack([model.step(ids[:, t], state) for t in range(5, 11)], dim=1)
    # fp64 throughout: decode equals forward to fp64 rounding (fp32 scalars gave ~2e-7).
    torch.testing.assert_close(steps, full[:, 5:], rtol=0, atol=1e-12)
    # bf16 still keeps the hinted scalars in fp32.
    half = mixstack.build(SPEC, seed=3, dtype=torch.bfloat16)
    kept = {n: p.dtype for n, p in half.named_parameters() if n in keep}
    assert set(kept.values()) == {torch.float32}


def test_tied_head_survives_meta_to_empty_and_moves_to_meta() -> None:
    model = mixstack.build(SPEC, device="meta")
    assert model.lm_head.weight is model.embedding.weight
    model.to_empty(device="cpu")
    assert model.lm_head.weight is model.embedding.weight
    assert model.lm_head.weight.data_ptr() == model.embedding.weight.data_ptr()
    with torch.no_grad():
        model.embedding.weight.fill_(0.5)
    assert torch.equal(model.lm_head.weight, torch.full_like(model.lm_head.weight, 0.5))
    model.to("meta")
    assert model.lm_head.weight is model.embedding.weight
    # Parameter count: the head is not a parameter of its own.
    real = mixstack.build(SPEC, seed=0)
    assert sum(p.numel() for p in real.parameters()) == sum(
        t.numel() for n, t in real.state_dict().items() if n != "lm_head.weight"
    )
