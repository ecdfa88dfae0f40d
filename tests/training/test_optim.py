"""Parameter groups from param_hints and the LR schedules against explicit formulas."""

from __future__ import annotations

import math

import pytest
import torch

import mixstack
from mixstack.dsl import registry
from mixstack.dsl.errors import MixstackError
from mixstack.dsl.spec import AdamWConfig, ScheduleConfig, SGDConfig
from mixstack.mixers.base import ParamHint
from mixstack.mixers.mlp import Mlp
from mixstack.training.optim import Schedule, build_optimizer, build_scheduler, param_groups

SPEC = {
    "model": {
        "vocab_size": 16,
        "max_seq_len": 16,
        "d_model": 16,
        "norm": {"type": "layernorm", "bias": True},
        "layers": {
            "pattern": "*-",
            "symbols": {
                "*": {"type": "attention", "n_heads": 2, "qkv_bias": True},
                "-": {"type": "mlp", "hidden": 32},
            },
        },
    }
}


def _groups_by_name(groups):
    return {name: g for g in groups for name in g["param_names"]}


def test_no_decay_on_norms_biases_and_hinted_params(monkeypatch: pytest.MonkeyPatch) -> None:
    def hints(self):
        return {
            "down_proj.weight": ParamHint(residual_out=True),
            "up_proj.weight": ParamHint(no_weight_decay=True, lr_scale=0.5),
        }

    monkeypatch.setattr(Mlp, "param_hints", hints)
    model = mixstack.build(SPEC, seed=0)
    groups = param_groups(model, weight_decay=0.1, lr=1e-3)
    by_name = _groups_by_name(groups)
    names = {n for n, _ in model.named_parameters()}
    assert set(by_name) == names  # every trainable parameter once (tied head included once)
    assert sum(len(g["params"]) for g in groups) == len(names)
    for name, group in by_name.items():
        param = dict(model.named_parameters())[name]
        no_decay = (
            param.ndim < 2 or name.endswith("bias") or name == "layers.1.mixer.up_proj.weight"
        )
        assert group["weight_decay"] == (0.0 if no_decay else 0.1), name
    assert by_name["layers.0.norm.bias"]["weight_decay"] == 0.0
    assert by_name["layers.0.mixer.q_proj.bias"]["weight_decay"] == 0.0
    assert by_name["embedding.weight"]["weight_decay"] == 0.1
    scaled = by_name["layers.1.mixer.up_proj.weight"]
    assert scaled["lr"] == pytest.approx(5e-4) and scaled["lr_scale"] == 0.5
    assert by_name["layers.1.mixer.down_proj.weight"]["lr"] == pytest.approx(1e-3)


def test_optimizers_and_lr_scale_survive_the_schedule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        Mlp, "param_hints", lambda self: {"up_proj.weight": ParamHint(lr_scale=2.0)}
    )
    model = mixstack.build(SPEC, seed=0)
    opt = build_optimizer(model, AdamWConfig(lr=0.01, weight_decay=0.2, betas=(0.8, 0.9)))
    assert isinstance(opt, torch.optim.AdamW)
    assert all(g["betas"] == (0.8, 0.9) for g in opt.param_groups)
    sched = build_scheduler(
        opt, ScheduleConfig(type="linear", warmup_steps=2, min_lr_ratio=0.0), 10
    )
    for _ in range(5):
        opt.step()
        sched.step()
    factor = Schedule("linear", 2, 10, 0.0)(5)
    for group in opt.param_groups:
        assert group["lr"] == pytest.approx(0.01 * group["lr_scale"] * factor)
    sgd = build_optimizer(model, SGDConfig(lr=0.1, momentum=0.5, nesterov=True))
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["nesterov"]


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedules_follow_their_formulas(kind: str) -> None:
    warmup, total, m = 5, 45, 0.1
    schedule = Schedule(kind, warmup, total, m)
    for step in range(0, 60):
        if step < warmup:
            expected = (step + 1) / warmup
        else:
            p = min(1.0, (step - warmup) / (total - warmup))
            expected = {
                "cosine": m + (1 - m) * 0.5 * (1 + math.cos(math.pi * p)),
                "linear": 1 - (1 - m) * p,
                "constant": 1.0,
            }[kind]
        assert schedule(step) == pytest.approx(expected, abs=1e-12), step
    if kind != "constant":
        assert schedule(total) == pytest.approx(m) and schedule(total + 10) == pytest.approx(m)


def test_schedule_state_is_plain_data() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, ScheduleConfig(), 10)
    state = sched.state_dict()
    assert state["lr_lambdas"] == [
        {"kind": "cosine", "warmup_steps": 0, "total_steps": 10, "min_lr_ratio": 0.1}
    ]


HYBRID = {
    "model": {
        "vocab_size": 16,
        "max_seq_len": 32,
        "d_model": 32,
        "layers": {
            "pattern": "MH-",
            "symbols": {
                "M": {"type": "mamba2", "d_state": 8, "headdim": 8, "chunk_size": 8},
                "H": {"type": "hyena", "filter": {"pos_emb_lr_scale": 0.25}},
                "-": {"type": "mlp", "hidden": 32},
            },
        },
    }
}


@pytest.mark.skipif(
    not (registry.has("mamba2") and registry.has("hyena")), reason="needs mamba2 and hyena"
)
def test_real_mixer_hints_reach_the_groups() -> None:
    """Mamba-2's SSM scalars get no decay; Hyena's positional embedding its own lr."""
    model = mixstack.build(HYBRID, seed=0)
    by_name = _groups_by_name(param_groups(model, weight_decay=0.1, lr=1e-3))
    for scalar in ("A_log", "D", "dt_bias"):
        assert by_name[f"layers.0.mixer.{scalar}"]["weight_decay"] == 0.0, scalar
    assert by_name["layers.0.mixer.in_proj.weight"]["weight_decay"] == 0.1
    z = by_name["layers.1.mixer.filter_fn.pos_emb.z"]
    assert z["weight_decay"] == 0.0 and z["lr"] == pytest.approx(2.5e-4) and z["lr_scale"] == 0.25
    assert by_name["layers.1.mixer.in_proj.weight"]["lr"] == pytest.approx(1e-3)


def test_a_hint_naming_no_tensor_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        Mlp, "param_hints", lambda self: {"up_proj.wieght": ParamHint(no_weight_decay=True)}
    )
    model = mixstack.build(SPEC, seed=0)
    with pytest.raises(
        MixstackError, match=r"tensor\(s\) the model does not have: .*up_proj\.wieght"
    ):
        param_groups(model, weight_decay=0.1, lr=1e-3)


def test_adamw_runs_fused_and_follows_the_written_out_update() -> None:
    """The fused kernel is chosen for float CPU parameters; three steps of it match the
    AdamW update written out here (decoupled decay, bias-corrected moments), per group."""
    from mixstack.training.optim import adamw_impl_kwargs

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5))
    cfg = AdamWConfig(lr=1e-2, weight_decay=0.1)
    opt = build_optimizer(model, cfg)
    assert all(g["fused"] for g in opt.param_groups)
    start = {id(p): p.detach().double().clone() for p in model.parameters()}
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert sorted(set(decay.values())) == [0.0, 0.1]  # LayerNorm and biases undecayed
    grads = [{id(p): torch.randn_like(p) for p in model.parameters()} for _ in range(3)]
    for step_grads in grads:
        for p in model.parameters():
            p.grad = step_grads[id(p)].clone()
        opt.step()
    b1, b2 = cfg.betas
    for p in model.parameters():
        w, m, v = start[id(p)], 0.0, 0.0
        for t, step_grads in enumerate(grads, start=1):
            g = step_grads[id(p)].double()
            w = w * (1 - cfg.lr * decay[id(p)])
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
            w = w - cfg.lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + cfg.eps)
        torch.testing.assert_close(p.detach().double(), w, rtol=1e-5, atol=1e-6)
    # a parameter the fused kernel cannot take falls back to the multi-tensor loop
    assert adamw_impl_kwargs([torch.zeros(2, dtype=torch.int64)]) == {"foreach": True}
    assert adamw_impl_kwargs([torch.zeros(2)]) == {"fused": True}
    # training under 16-mixed asks for the loop (Lightning's scaler clips it)
    assert all(g["foreach"] for g in build_optimizer(model, cfg, fused=False).param_groups)
