"""The Lightning adapter: bf16-true keeps keep_fp32 params fp32, checkpoints are plain
data, activation checkpointing changes memory, not gradients."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar, Literal

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

import mixstack
from mixstack.blocks.residual import ResidualBlock
from mixstack.dsl import registry
from mixstack.dsl.base import Capabilities, LayerConfig
from mixstack.dsl.context import LayerContext
from mixstack.mixers.base import Mixer, ParamHint, init_linear
from mixstack.training.lit import KeepFP32HalfPrecision, LitModel, TaskData
from mixstack.training.run import make_trainer
from mixstack.training.rundir import RunDir


class GainConfig(LayerConfig):
    """A channel layer with an fp32-only gain, standing in for SSM scalars (A_log, D)."""

    kind: ClassVar = "channel"
    type: Literal["test_fp32_gain"] = "test_fp32_gain"

    def capabilities(self, ctx: LayerContext) -> Capabilities:
        return Capabilities(causal=True, decode=False)


class Gain(Mixer):
    def __init__(self, cfg: GainConfig, ctx: LayerContext) -> None:
        super().__init__(cfg, ctx)
        self.proj = nn.Linear(ctx.d_model, ctx.d_model, bias=False)
        self.gain = nn.Parameter(torch.ones(ctx.d_model))

    def forward(self, x: Tensor, *, input_ids=None, seq_idx=None, state=None) -> Tensor:
        return self.proj(x) * self.gain.to(x.dtype)  # computes in x's dtype, stores fp32

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        init_linear(self.proj, self.ctx.init_std, generator)
        with torch.no_grad():
            self.gain.fill_(1.0)

    def param_hints(self) -> dict[str, ParamHint]:
        return {"gain": ParamHint(keep_fp32=True, no_weight_decay=True)}


@pytest.fixture(autouse=True, scope="module")
def gain_layer() -> Iterator[None]:
    with registry.scoped():
        registry.register(GainConfig)(Gain)
        yield


def _gain_spec(*overrides: str):
    data = {
        "model": {
            "vocab_size": 16,
            "max_seq_len": 16,
            "d_model": 16,
            "layers": {
                "pattern": "*G-",
                "symbols": {
                    "*": {"type": "attention", "n_heads": 2},
                    "G": {"type": "test_fp32_gain"},
                    "-": {"type": "mlp", "hidden": 32},
                },
            },
        },
        "train": {
            "task": {"type": "mqar", "n_pairs": 2, "seq_len": 16, "val_size": 8},
            "optimizer": {"lr": 0.05},
            "max_steps": 3,
            "batch_size": 4,
            "val_every": 3,
            "log_every": 1,
        },
        "run": {"precision": "bf16-true"},
    }
    return mixstack.load_spec(data, overrides)


def test_bf16_true_training_keeps_hinted_params_fp32(tmp_path: Path) -> None:
    spec = _gain_spec()
    lit = LitModel(spec)
    data = TaskData(spec, lit)
    trainer = make_trainer(
        spec, RunDir(tmp_path), 0, lit.total_steps, data.steps_per_epoch, progress=False
    )
    assert any(isinstance(p, KeepFP32HalfPrecision) for p in [trainer.precision_plugin])
    before = lit.model.layers[1].mixer.gain.detach().clone()
    trainer.fit(lit, datamodule=data)
    dtypes = {n: p.dtype for n, p in lit.model.named_parameters()}
    assert dtypes.pop("layers.1.mixer.gain") == torch.float32
    assert set(dtypes.values()) == {torch.bfloat16}
    assert lit.model.lm_head.weight is lit.model.embedding.weight
    assert not torch.equal(lit.model.layers[1].mixer.gain.detach(), before)  # it trained


def test_plugin_alone_casts_like_cast_module() -> None:
    lit = LitModel(_gain_spec())
    KeepFP32HalfPrecision("16-true").convert_module(lit)
    assert lit.model.layers[1].mixer.gain.dtype == torch.float32
    assert lit.model.layers[1].mixer.proj.weight.dtype == torch.float16


def test_checkpoints_are_plain_data(tiny_run) -> None:
    path = tiny_run.run_dir / "checkpoints" / "last.ckpt"
    state = torch.load(path, weights_only=True)
    assert isinstance(state["hyper_parameters"]["spec"], dict)
    lit = LitModel.load_from_checkpoint(path, weights_only=True)
    exported = load_file(tiny_run.model_dir / "model.safetensors")
    for name, tensor in exported.items():
        assert torch.equal(lit.model.state_dict()[name], tensor), name


@pytest.mark.parametrize("selection", [True, [1]])
def test_activation_checkpointing_selects_blocks_and_keeps_gradients(
    tiny_spec, selection: bool | list[int]
) -> None:
    plain = LitModel(tiny_spec("model.dropout=0.0"))
    text = "true" if selection is True else str(selection)
    ckpt = LitModel(tiny_spec("model.dropout=0.0", f"run.activation_checkpointing={text}"))
    flags = [b.checkpointing for b in ckpt.model.layers if isinstance(b, ResidualBlock)]
    assert flags == ([True, True] if selection is True else [False, True])
    ids = torch.randint(0, 20, (3, 16))
    grads = []
    for lit in (plain, ckpt):
        lit.train()
        lit(ids).logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in lit.model.named_parameters()})
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-6), name


@pytest.mark.skipif(not registry.has("mamba2"), reason="the mamba2 mixer is not registered yet")
def test_mamba2_ssm_scalars_stay_fp32_under_bf16_true(tmp_path: Path) -> None:
    spec = _gain_spec(
        "model.layers.symbols.G={type: mamba2, d_state: 8, headdim: 8, chunk_size: 8}",
        "train.max_steps=2",
    )
    lit = LitModel(spec)
    data = TaskData(spec, lit)
    trainer = make_trainer(
        spec, RunDir(tmp_path), 0, lit.total_steps, data.steps_per_epoch, progress=False
    )
    trainer.fit(lit, datamodule=data)
    mixer = lit.model.layers[1].mixer
    assert {mixer.A_log.dtype, mixer.D.dtype, mixer.dt_bias.dtype} == {torch.float32}
    assert mixer.in_proj.weight.dtype == torch.bfloat16
    assert torch.isfinite(mixer.A_log).all()
