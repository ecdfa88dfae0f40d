"""Reports: parameter counts by hand, state bytes via init_state, FLOPs plumbing, 8B shape."""

from __future__ import annotations

import pytest
import torch

import mixstack
from mixstack.archs.builder import build
from mixstack.archs.report import layer_label, layer_settings
from mixstack.dsl.errors import MixstackError
from mixstack.dsl.spec import ModelSpec
from mixstack.mixers.base import Mixer

ATTN = {"type": "attention", "n_heads": 4, "n_kv_heads": 2}
MLP = {"type": "mlp", "hidden": 40, "activation": "gelu"}
D = 16


def make_spec(pattern="*-S", tie=True, **model) -> ModelSpec:
    data = {
        "vocab_size": 20,  # 24 ids, 24 rows
        "max_seq_len": 32,
        "d_model": D,
        "tie_embeddings": tie,
        "layers": {
            "pattern": pattern,
            "symbols": {
                "*": ATTN,
                "-": MLP,
                "S": {"type": "sequential", "layers": [ATTN, MLP]},
                "P": {"type": "parallel", "layers": [ATTN, MLP]},
            },
        },
    }
    data.update(model)
    return ModelSpec.model_validate(data)


ATTN_PARAMS = D * 16 + 2 * D * 8 + 16 * D  # q, k, v (2 kv heads of 4), o
MLP_PARAMS = 2 * D * 40


@pytest.mark.parametrize("tie", [True, False])
def test_parameter_counts_by_hand(tie: bool) -> None:
    report = build(make_spec(tie=tie), device="meta").report(32)
    rows = [r.params for r in report.rows]
    assert rows == [ATTN_PARAMS + D, MLP_PARAMS + D, ATTN_PARAMS + MLP_PARAMS + 2 * D]
    assert report.embedding_params == 24 * D
    assert report.head_params == (0 if tie else 24 * D)
    assert report.final_norm_params == D
    assert report.total_params == sum(rows) + 24 * D * (1 if tie else 2) + D


def test_state_bytes_match_a_real_decode_state_and_flops_add_up() -> None:
    model = build(make_spec("*-SP"), seed=0)
    report = model.report(20, dtype=torch.float16)
    state = model.init_state(1, 20, dtype=torch.float16)
    assert report.total_state_bytes == state.nbytes() > 0
    mlp_row = report.rows[1]
    assert (
        mlp_row.state_bytes
        == model.layers[1].mixer.init_state(1, 20, device="cpu", dtype=torch.float16).nbytes()
    )
    mixer_flops = [
        sum(m.flops_per_token(20) for m in model.layers[i].modules() if isinstance(m, Mixer))
        for i in range(4)
    ]
    assert [r.flops_per_token for r in report.rows] == pytest.approx(mixer_flops)
    assert report.head_flops_per_token == 2 * D * 24
    assert report.total_flops_per_token == pytest.approx(sum(mixer_flops) + 2 * D * 24)


def test_rows_by_type_aggregates_in_order() -> None:
    report = build(make_spec("*-*S-P"), device="meta").report(8)
    by_type = report.rows_by_type()
    assert [(t.type, t.count) for t in by_type] == [
        ("attention", 2),
        ("mlp", 2),
        ("sequential[attention+mlp]", 1),
        ("parallel[attention+mlp]", 1),
    ]
    assert sum(t.params for t in by_type) == sum(r.params for r in report.rows)
    assert by_type[0].params == 2 * (ATTN_PARAMS + D)
    data = report.to_dict()
    assert data["dtype"] == "bfloat16" and len(data["layers"]) == 6


def test_non_decode_layers_report_zero_state_and_classifier_head_flops() -> None:
    spec = make_spec("*-P", arch="classifier", classifier={"n_classes": 5})
    report = build(spec, device="meta").report(10)
    assert [r.state_bytes for r in report.rows] == [0, 0, 0]  # bidirectional attention
    assert report.head_flops_per_token == 2 * D * 5 / 10
    assert report.head_params == D * 5 + 5


def test_labels_and_settings() -> None:
    spec = make_spec("SP")
    configs = spec.layer_configs()
    assert layer_label(configs[1]) == "parallel[attention+mlp]"
    assert "n_heads=4" in layer_settings(configs[0]) and "hidden=40" in layer_settings(configs[0])
    with pytest.raises(MixstackError, match="seq_len must be a positive int, got 0"):
        build(spec, device="meta").report(0)


def test_hybrid_8b_shape_builds_on_meta_with_the_published_parameter_count() -> None:
    spec = mixstack.load_spec("zoo:hybrid-8b-shape")
    layers = spec.model.layers
    pattern = "M-M-M--M-M*-M-M-M-M--M*-M-M-M-M-M*--M-M-M-M-M*-M--M-M-M-"  # math.md#hybrid-layouts
    assert layers.pattern == pattern
    model = build(spec, device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    report = model.report(4096)
    d, heads, kv_heads, head_dim, hidden, vocab = 4096, 32, 8, 128, 16384, 256000
    attention = d * heads * head_dim * 2 + 2 * d * kv_heads * head_dim  # q, o + k, v
    mlp = 2 * d * hidden  # non-gated, no bias
    # Mamba-2 (docs/math.md#mamba-2): d_inner 8192, N 128, G 8, H = 8192 / 64 = 128, conv 4.
    d_inner, n, g, h, conv = 2 * d, 128, 8, 128, 4
    conv_dim = d_inner + 2 * g * n
    in_proj = (2 * d_inner + 2 * g * n + h) * d
    assert in_proj // d == 18560 and conv_dim == 10240  # docs/math.md#hybrid-layouts
    mamba2 = in_proj + conv_dim * conv + conv_dim + 3 * h + d_inner + d * d_inner
    counts = {s: pattern.count(s) for s in "M*-"}
    assert counts == {"M": 24, "*": 4, "-": 28}
    expected = (
        counts["M"] * (mamba2 + d)  # + the pre-norm weight of each sub-layer
        + counts["*"] * (attention + d)
        + counts["-"] * (mlp + d)
        + 2 * vocab * d  # untied embedding and head
        + d  # final norm
    )
    assert report.total_params == expected == 8_654_517_248
    assert {t.type: t.count for t in report.rows_by_type()} == {
        "mamba2": 24,
        "attention": 4,
        "mlp": 28,
    }
