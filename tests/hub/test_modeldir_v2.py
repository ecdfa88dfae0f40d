"""A model directory saved by schema-v2 code with SGConv layers keeps loading with the
same logits: the v2 -> v3 migration pins ``kernel.normalize: truncated``, the old
sub-kernel default and the GLU output projection.

``tests/fixtures/modeldir_v2`` was written by ``tests/fixtures/make_modeldir_v2.py`` with
schema-2 code (commit 090dba1) and is never regenerated.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

import mixstack
from mixstack.dsl.migrations import SCHEMA_VERSION

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "modeldir_v2"


def test_v2_sgconv_model_directory_loads_with_the_same_logits() -> None:
    config = json.loads((FIXTURE / "config.json").read_text())
    assert config["schema_version"] == 2 and SCHEMA_VERSION == 3
    expected = load_file(FIXTURE / "expected.safetensors")
    model = mixstack.from_pretrained(FIXTURE)
    symbols = model.spec.layers.symbols
    for symbol in ("G", "g"):
        assert symbols[symbol].kernel.normalize == "truncated"
        assert symbols[symbol].output_glu is True
    assert symbols["G"].kernel.sub_kernel_len == 32  # the v2 default, pinned
    with torch.no_grad():
        logits = model(expected["input_ids"]).float()
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-6, atol=1e-6)


def test_read_as_schema_3_the_v2_file_is_another_model() -> None:
    """The pin matters: the same model section read without migration (as schema 3)
    builds a plain output projection, so the saved weights no longer fit."""
    config = json.loads((FIXTURE / "config.json").read_text())
    as_v3 = mixstack.build(mixstack.load_spec({"model": config["model"]}), device="meta")
    saved = load_file(FIXTURE / "model.safetensors")
    shapes = {name: tuple(t.shape) for name, t in as_v3.state_dict().items()}
    differ = sorted(n for n, t in saved.items() if shapes.get(n) != tuple(t.shape))
    assert differ == [
        "layers.0.mixer.output_linear.bias",
        "layers.0.mixer.output_linear.weight",
        "layers.2.mixer.output_linear.bias",
        "layers.2.mixer.output_linear.weight",
    ]


def test_kernel_norm_follows_normalize_at_init() -> None:
    """concat: the norm of the full concatenation (d·2^(S−1) taps) before the cut, as the
    reference GConv computes it; truncated: the norm of the K kept taps."""
    base = {
        "model": {
            "max_seq_len": 20,
            "d_model": 4,
            "layers": {
                "pattern": "G",
                "symbols": {
                    "G": {
                        "type": "long_conv",
                        "channels": 1,
                        "kernel": {"type": "sgconv", "sub_kernel_len": 4},
                    }
                },
            },
        }
    }
    norms = {}
    for mode in ("concat", "truncated"):
        spec = mixstack.load_spec(base, [f"model.layers.symbols.G.kernel.normalize={mode}"])
        kernel = mixstack.build(spec, seed=3).layers[0].mixer.kernel
        w = kernel.weight.detach().double()  # (S=4, 1, 4, 4)
        # independent: the reference's concatenation with nearest/linear upsampling
        pieces = []
        for i in range(w.shape[0]):
            size = 4 * 2 ** max(i - 1, 0)
            up = torch.nn.functional.interpolate(
                w[i], size=size, mode="linear", align_corners=False
            )
            pieces.append(0.5**i * up)
        full = torch.cat(pieces, dim=-1)  # (1, 4, 32)
        ref = full if mode == "concat" else full[..., :20]
        torch.testing.assert_close(kernel.kernel_norm.double(), ref.norm(dim=-1, keepdim=True))
        torch.testing.assert_close(
            kernel().double(), full[..., :20] / ref.norm(dim=-1, keepdim=True)
        )
        norms[mode] = kernel.kernel_norm
    assert not torch.allclose(norms["concat"], norms["truncated"])
