"""``mixstack.materialize``: a mixer's matrices, or a model layer's on its real input,
against the layer's own forward (float64), plus ``info --show-matrix``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import mixstack
from mixstack.cli.main import app
from mixstack.dsl.errors import CapabilityError

SPEC = {
    "model": {
        "d_model": 32,
        "vocab_size": 16,
        "max_seq_len": 32,
        "layers": {
            "pattern": "M*M-",
            "symbols": {
                "M": {"type": "mamba2", "headdim": 16, "d_state": 8, "chunk_size": 8},
                "*": {"type": "attention", "n_heads": 2},
                "-": {"type": "mlp", "hidden": 64},
            },
        },
    }
}


@pytest.fixture
def model() -> mixstack.archs.models.MixStackModel:
    return mixstack.build(mixstack.load_spec(SPEC), seed=3, dtype=torch.float64).eval()


def _real_input(model, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """Independent of the hook: embedding, then blocks 0..layer-1, then the layer's norm."""
    h = model.embedding(ids)
    for block in model.layers[:layer]:
        h = block(h)
    return model.layers[layer].norm(h)


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_a_model_layer_is_materialized_on_its_real_input(model, layer: int) -> None:
    ids = torch.randint(0, 16, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = _real_input(model, ids, layer)
        expected = model.layers[layer].mixer(x)
        matrices = mixstack.materialize(model, ids, layer=layer)
        assert torch.allclose(matrices.apply(), expected, atol=1e-10, rtol=1e-9)
    total = matrices.total()  # (B, H, L, L)
    assert total.shape[-2:] == (19, 19)
    assert torch.count_nonzero(torch.triu(total, diagonal=1)) == 0  # causal


def test_attention_rows_are_softmax_weights(model) -> None:
    ids = torch.randint(0, 16, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        total = mixstack.materialize(model, ids, layer=1).total()
    assert torch.allclose(total.sum(-1), torch.ones(1, 2, 12, dtype=torch.float64))
    assert bool((total >= 0).all())


def test_a_mixer_is_materialized_directly(model) -> None:
    mixer = model.layers[0].mixer
    x = torch.randn(1, 10, 32, dtype=torch.float64)
    with torch.no_grad():
        matrices = mixstack.materialize(mixer, x)
        assert torch.allclose(matrices.apply(), mixer(x), atol=1e-10, rtol=1e-9)


def test_layers_without_a_matrix_view_and_bad_indices_are_refused(model) -> None:
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(CapabilityError, match=r"layer 3 \(mlp\) has no matrix view"):
        mixstack.materialize(model, ids, layer=3)
    with pytest.raises(CapabilityError, match=r"layer index in 0\.\.3, got 4"):
        mixstack.materialize(model, ids, layer=4)
    with pytest.raises(CapabilityError, match="layer index"):
        mixstack.materialize(model, ids)


def test_info_show_matrix_draws_one_panel_per_head(tmp_path: Path) -> None:
    import yaml
    from matplotlib.image import imread

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    png = tmp_path / "m.png"
    result = CliRunner().invoke(
        app, ["info", str(spec), "--show-matrix", "1", "--out", str(png), "--seq-len", "16"]
    )
    assert result.exit_code == 0, result.output
    assert f"drawn to {png}" in result.output
    image = imread(png)
    assert image.ndim == 3 and image.shape[1] > image.shape[0]  # two panels side by side
    bad = CliRunner().invoke(app, ["info", str(spec), "--show-matrix", "3", "--out", str(png)])
    assert bad.exit_code == 1 and "has no matrix view" in bad.output
