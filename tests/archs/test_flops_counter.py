"""``report()``'s per-layer forward FLOPs against torch's own counter
(``torch.utils.flop_counter.FlopCounterMode``) on small shapes.

FlopCounterMode counts matrix products (mm / bmm / addmm, and attention when SDPA runs
its math path, which decomposes into bmm). For layers whose FLOPs are all matrix
products the report must equal the count exactly; for attention the counter sees the
full L×L score matrix while a causal layer does (L+1)/2 keys per query on average, which
is what the report counts."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import mixstack

B, L, D = 2, 64, 32


def _single_layer(symbol: dict, arch: str = "causal_lm") -> torch.nn.Module:
    spec = mixstack.load_spec(
        {
            "model": {
                "arch": arch,
                "d_model": D,
                "vocab_size": 16,
                "max_seq_len": L,
                "layers": {"pattern": "X", "symbols": {"X": symbol}},
            }
        }
    )
    return mixstack.build(spec, seed=0)


def _counted_per_token(model: torch.nn.Module) -> float:
    model.set_backend("torch")  # the counter sees torch's matmuls, not compiled C kernels
    mixer = model.layers[0].mixer
    x = torch.randn(B, L, D)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        mixer(x)
    return counter.get_total_flops() / (B * L)


@pytest.mark.parametrize(
    "symbol, arch",
    [
        ({"type": "mlp", "hidden": 96}, "causal_lm"),
        ({"type": "mlp", "hidden": 96, "activation": "swiglu"}, "causal_lm"),
        ({"type": "mamba2", "headdim": 16, "d_state": 8, "chunk_size": 16}, "causal_lm"),
        (
            {"type": "mamba2", "headdim": 8, "d_state": 8, "chunk_size": 64, "ngroups": 2},
            "causal_lm",
        ),
        ({"type": "hydra", "headdim": 16, "d_state": 8, "chunk_size": 16}, "encoder"),
    ],
)
def test_matmul_only_layers_report_exactly_what_torch_counts(symbol: dict, arch: str) -> None:
    model = _single_layer(symbol, arch)
    reported = model.report(L).rows[0].flops_per_token
    mixer = model.layers[0].mixer
    # the SSM layers' depthwise conv runs as shifted multiply-adds (kernels/causal_conv1d),
    # which the counter does not see: K MACs per channel and token
    conv = 2 * mixer.conv_dim * mixer.cfg.d_conv if hasattr(mixer, "conv_dim") else 0
    assert reported == pytest.approx(_counted_per_token(model) + conv, rel=1e-9)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_causal_attention_counts_half_the_score_matrix(n_kv_heads: int) -> None:
    model = _single_layer({"type": "attention", "n_heads": 4, "n_kv_heads": n_kv_heads})
    reported = model.report(L).rows[0].flops_per_token
    counted = _counted_per_token(model)
    # scores and values: 2 matmuls x 2 FLOPs x (n_heads * head_dim) = 4 D per key
    full_scores = 4 * D * L
    projections = counted - full_scores
    assert reported == pytest.approx(projections + full_scores * (L + 1) / (2 * L), rel=1e-9)


def test_bidirectional_attention_counts_the_whole_score_matrix() -> None:
    model = _single_layer({"type": "attention", "n_heads": 4, "causal": False}, "encoder")
    reported = model.report(L).rows[0].flops_per_token
    assert reported == pytest.approx(_counted_per_token(model), rel=1e-9)
