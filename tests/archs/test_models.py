"""Whole models: state-dict layout, tying, init, logits, causality, decoding, input errors."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import mixstack
from mixstack.archs.builder import build
from mixstack.archs.models import MixStackModel, pool
from mixstack.blocks.residual import ResidualBlock
from mixstack.dsl.errors import BackendError, MixstackError
from mixstack.dsl.spec import ModelSpec
from mixstack.mixers.base import Mixer

ATTN = {"type": "attention", "n_heads": 2, "n_kv_heads": 1}
MLP = {"type": "mlp", "hidden": 24, "activation": "gelu"}


def make_spec(pattern: str = "*-*-", symbols: dict | None = None, **model: Any) -> ModelSpec:
    data = {
        "arch": "causal_lm",
        "vocab_size": 10,  # + 4 specials = 14 ids, padded to 16 embedding rows
        "max_seq_len": 16,
        "d_model": 8,
        "layers": {"pattern": pattern, "symbols": symbols or {"*": ATTN, "-": MLP}},
    }
    data.update(model)
    return ModelSpec.model_validate(data)


def ids(shape: tuple[int, ...], seed: int = 0, high: int = 14) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


# -- layout ---------------------------------------------------------------------------------
def test_state_dict_keys_tied() -> None:
    model = build(make_spec("*-"), seed=0)
    assert list(model.state_dict()) == [
        "embedding.weight",
        "layers.0.norm.weight",
        *[f"layers.0.mixer.{p}_proj.weight" for p in "qkvo"],
        "layers.1.norm.weight",
        "layers.1.mixer.up_proj.weight",
        "layers.1.mixer.down_proj.weight",
        "norm_f.weight",
        "lm_head.weight",
    ]


def test_state_dict_keys_untied_with_composites() -> None:
    symbols = {
        "S": {"type": "sequential", "layers": [ATTN, MLP]},
        "P": {"type": "parallel", "layers": [ATTN, MLP], "combine": "mean"},
    }
    model = build(make_spec("SP", symbols, tie_embeddings=False), seed=0)
    attn = [f"{p}_proj.weight" for p in "qkvo"]
    mlp = ["up_proj.weight", "down_proj.weight"]
    assert list(model.state_dict()) == [
        "embedding.weight",
        "layers.0.blocks.0.norm.weight",
        *[f"layers.0.blocks.0.mixer.{k}" for k in attn],
        "layers.0.blocks.1.norm.weight",
        *[f"layers.0.blocks.1.mixer.{k}" for k in mlp],
        "layers.1.norm.weight",
        *[f"layers.1.mixer.branches.0.{k}" for k in attn],
        *[f"layers.1.mixer.branches.1.{k}" for k in mlp],
        "norm_f.weight",
        "lm_head.weight",
    ]
    assert model.lm_head.weight is not model.embedding.weight
    assert not torch.equal(model.lm_head.weight, model.embedding.weight)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float64])
def test_tied_head_is_the_embedding_parameter(dtype) -> None:
    model = build(make_spec(), seed=0, dtype=dtype)
    assert model.lm_head.weight is model.embedding.weight
    assert model.lm_head.weight.data_ptr() == model.embedding.weight.data_ptr()
    assert len(list(model.parameters())) == len(model.state_dict()) - 1
    if dtype is not None:
        assert model.embedding.weight.dtype == dtype
    model.to(torch.float32)
    assert model.lm_head.weight is model.embedding.weight


def test_model_records_spec_run_and_seed() -> None:
    spec = mixstack.Spec.model_validate(
        {"model": make_spec().model_dump(), "run": {"backend": "torch"}}
    )
    model = build(spec, seed=7)
    assert isinstance(model, MixStackModel)
    assert model.spec == spec.model and model.run.backend == "torch" and model.seed == 7


# -- construction and init ------------------------------------------------------------------
def test_meta_build_allocates_nothing_and_still_reports() -> None:
    model = build(make_spec(), device="meta")
    tensors = [*model.parameters(), *model.buffers()]
    assert tensors and all(t.device.type == "meta" for t in tensors)
    assert model.report(16).total_params == sum(p.numel() for p in model.parameters())


def test_seeded_build_is_deterministic_and_leaves_the_global_rng_alone() -> None:
    spec = make_spec(embedding={"positional": "learned"})
    torch.manual_seed(0)
    rng_before = torch.get_rng_state()
    a = build(spec, seed=3)
    assert torch.equal(torch.get_rng_state(), rng_before)  # nothing drawn from it
    torch.manual_seed(12345)
    b = build(spec, seed=3)
    c = build(spec, seed=4)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    differs = [k for k, v in a.state_dict().items() if not torch.equal(v, c.state_dict()[k])]
    assert "embedding.weight" in differs and "layers.0.mixer.q_proj.weight" in differs


def test_unseeded_builds_draw_and_record_a_fresh_seed() -> None:
    a, b = build(make_spec(), seed=None), build(make_spec(), seed=None)
    assert isinstance(a.seed, int) and a.seed != b.seed
    rebuilt = build(make_spec(), seed=a.seed)
    assert torch.equal(rebuilt.embedding.weight, a.embedding.weight)


def test_init_norms_ones_embedding_normal() -> None:
    spec = make_spec(d_model=64, vocab_size=2000, init={"std": 0.05})
    model = build(spec, seed=0)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or name == "norm_f.weight":
            assert torch.equal(p, torch.ones_like(p)), name
    assert abs(model.embedding.weight.std().item() - 0.05) < 0.002
    assert abs(model.embedding.weight.mean().item()) < 0.002


@pytest.mark.parametrize(
    ("pattern", "symbols", "branches"),
    [
        ("*-*-", None, 4),
        ("SS-", {"S": {"type": "sequential", "layers": [ATTN, MLP]}, "-": MLP}, 5),
    ],
)
def test_residual_scaling_divides_hinted_outputs_by_sqrt_branches(pattern, symbols, branches):
    scaled = build(make_spec(pattern, symbols), seed=1)
    plain = build(make_spec(pattern, symbols, init={"residual_scaling": False}), seed=1)
    assert scaled.n_residual_branches() == branches
    hinted = {n for n, h in scaled.param_hints().items() if h.residual_out}
    assert hinted and all(n.endswith(("o_proj.weight", "down_proj.weight")) for n in hinted)
    plain_params = dict(plain.named_parameters())
    for name, p in scaled.named_parameters():
        factor = 1 / math.sqrt(branches) if name in hinted else 1.0
        torch.testing.assert_close(p, plain_params[name] * factor, rtol=1e-6, atol=0)


def test_build_accepts_dict_path_and_zoo_via_load_spec(tmp_path) -> None:
    data = {"model": make_spec().model_dump(mode="json")}
    data["model"].pop("layers")
    data["model"]["layers"] = {"pattern": "*-", "symbols": {"*": ATTN, "-": MLP}}
    from_dict = build(data, seed=0)
    import yaml

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    from_path = build(str(path), seed=0)
    assert from_dict.spec == from_path.spec
    assert torch.equal(from_dict.embedding.weight, from_path.embedding.weight)
    assert build("zoo:hybrid-8b-shape", device="meta").spec.n_layers == 56


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"spec": 42}, "build\\(\\) takes a Spec, a ModelSpec, a YAML path, 'zoo:NAME' or a dict"),
        ({"seed": -1}, "seed must be an int in 0..2\\*\\*64-1 or None, got -1"),
        ({"seed": True}, "seed must be an int"),
        ({"dtype": "int8"}, "unknown dtype 'int8'; allowed"),
        ({"dtype": torch.int64}, "model dtype must be floating point"),
        ({"device": "not-a-device"}, "invalid device 'not-a-device'"),
    ],
)
def test_bad_build_arguments_are_clear_errors(kwargs, message) -> None:
    args = {"spec": make_spec(), **kwargs}
    with pytest.raises(MixstackError, match=message):
        build(args.pop("spec"), **args)


def test_one_backend_policy_shared_by_every_mixer() -> None:
    symbols = {"P": {"type": "parallel", "layers": [ATTN, MLP]}, "*": ATTN}
    model = build(make_spec("P*", symbols), seed=0)
    mixers = [m for m in model.modules() if isinstance(m, Mixer)]
    assert len(mixers) == 3 and all(m.backends is model.backends for m in mixers)
    old = model.backends
    model.set_backend({"attention": "torch"})
    assert model.backends is not old and all(m.backends is model.backends for m in mixers)
    with pytest.raises(BackendError, match=r"unknown backend 'trition'.*did you mean 'triton'"):
        model.set_backend("trition")


def test_dropout_reaches_every_block_and_checkpointing_is_a_run_setting() -> None:
    model = build(make_spec(dropout=0.25), seed=0)
    blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
    assert len(blocks) == 4
    assert all(b.dropout.p == 0.25 and not b.checkpointing for b in blocks)


# -- forward -----------------------------------------------------------------------------
def test_logits_cover_total_vocab_and_slice_off_padding_rows() -> None:
    model = build(make_spec(tie_embeddings=False), seed=0)
    assert model.embedding.weight.shape[0] == 16 and model.spec.total_vocab == 14
    captured = {}
    model.norm_f.register_forward_hook(lambda m, i, o: captured.setdefault("h", o))
    logits = model(ids((2, 5)))
    assert logits.shape == (2, 5, 14)
    expected = F.linear(captured["h"], model.lm_head.weight)[..., :14]
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ["causal_lm", "encoder"])
def test_model_level_causality(arch: str) -> None:
    symbols = {"*": ATTN, "-": MLP, "P": {"type": "parallel", "layers": [ATTN, MLP]}}
    model = build(make_spec("*-P", symbols, arch=arch), seed=0, dtype=torch.float64)
    x = ids((2, 9), seed=1)
    t = 5
    x2 = x.clone()
    x2[:, t] = (x[:, t] + 1) % 14
    a, b = model(x), model(x2)
    assert not torch.allclose(a[:, t], b[:, t])
    if arch == "causal_lm":
        torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=0)
    else:
        assert not torch.allclose(a[:, :t], b[:, :t])


@pytest.mark.parametrize("positional", ["none", "learned", "sinusoidal"])
def test_decode_steps_equal_full_forward_after_odd_prefill(positional: str) -> None:
    symbols = {
        "*": ATTN,
        "-": MLP,
        "S": {"type": "sequential", "layers": [ATTN, MLP]},
        "P": {"type": "parallel", "layers": [ATTN, MLP]},
    }
    spec = make_spec("*-SP", symbols, embedding={"positional": positional})
    model = build(spec, seed=0, dtype=torch.float64)
    x = ids((3, 10), seed=2)
    full = model(x)
    state = model.init_state(3, 12)
    prefill = model(x[:, :5], state=state)
    torch.testing.assert_close(prefill, full[:, :5], rtol=0, atol=1e-10)
    for t in range(5, 10):
        torch.testing.assert_close(model.step(x[:, t], state), full[:, t], rtol=0, atol=1e-10)
    assert state.offset == 10


def test_state_reorders_batch_for_beam_search() -> None:
    model = build(make_spec(), seed=0, dtype=torch.float64)
    x = ids((3, 6), seed=3)
    state = model.init_state(3, 8)
    model(x[:, :5], state=state)
    order = torch.tensor([2, 0])
    picked = state.index_select(order)
    assert picked.batch == 2 and picked.offset == 5
    full = model(x[order])
    torch.testing.assert_close(model.step(x[order, 5], picked), full[:, 5], rtol=0, atol=1e-10)
    assert picked.nbytes() * 3 == state.nbytes() * 2


# -- classifier -----------------------------------------------------------------------------
def classifier_spec(pooling: str) -> ModelSpec:
    return make_spec(arch="classifier", classifier={"n_classes": 3, "pooling": pooling})


def test_pool_against_hand_computation() -> None:
    h = torch.arange(2 * 4 * 1, dtype=torch.float64).reshape(2, 4, 1)
    seq_idx = torch.tensor([[-1, 0, 0, -1], [5, 5, 5, 5]])
    assert pool(h, seq_idx, "mean").flatten().tolist() == [1.5, 5.5]
    assert pool(h, seq_idx, "first").flatten().tolist() == [1.0, 4.0]
    assert pool(h, seq_idx, "last").flatten().tolist() == [2.0, 7.0]
    assert pool(h, None, "mean").flatten().tolist() == [1.5, 5.5]


@pytest.mark.parametrize("pooling", ["mean", "first", "last"])
def test_classifier_excludes_padding(pooling: str) -> None:
    model = build(classifier_spec(pooling), seed=0, dtype=torch.float64)
    x = ids((1, 5), seed=4)
    alone = model(x)
    assert alone.shape == (1, 3)
    padded = torch.cat([x, ids((1, 3), seed=5)], dim=1)
    seq_idx = torch.tensor([[0] * 5 + [-1] * 3])
    torch.testing.assert_close(model(padded, seq_idx=seq_idx), alone, rtol=0, atol=1e-10)
    expected = F.linear(
        pool(_final_hidden(model, x), None, pooling), model.classifier.weight, model.classifier.bias
    )
    torch.testing.assert_close(alone, expected, rtol=0, atol=1e-12)


def _final_hidden(model: MixStackModel, x: torch.Tensor) -> torch.Tensor:
    captured = {}
    handle = model.norm_f.register_forward_hook(lambda m, i, o: captured.setdefault("h", o))
    model(x)
    handle.remove()
    return captured["h"]


def test_classifier_refuses_packed_rows_and_empty_rows() -> None:
    model = build(classifier_spec("mean"), seed=0)
    x = ids((2, 4))
    with pytest.raises(MixstackError, match="row 1 packs several documents"):
        model(x, seq_idx=torch.tensor([[0, 0, 0, -1], [0, 0, 1, 1]]))
    with pytest.raises(MixstackError, match="row 0 is all padding"):
        model(x, seq_idx=torch.tensor([[-1, -1, -1, -1], [0, 0, 0, 0]]))
    with pytest.raises(MixstackError, match="decoding needs arch 'causal_lm'"):
        model.init_state(1)


# -- input errors -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "message"),
    [
        (torch.zeros(2, 3), "input_ids must hold integer token ids, got dtype torch.float32"),
        (torch.zeros(2, 3, dtype=torch.bool), "must hold integer token ids"),
        (torch.zeros(3, dtype=torch.long), r"input_ids must have shape \(B, L\), got \(3,\)"),
        ([[1, 2]], "input_ids must be a torch.Tensor of token ids"),
        (torch.tensor([[1, 14]]), r"holds id 14; allowed ids are 0..13 \(vocab_size 10 \+ 4"),
        (torch.tensor([[-1, 2]]), "holds id -1; allowed ids are 0..13"),
        (torch.zeros(1, 17, dtype=torch.long), "length 17, above the spec's max_seq_len 16"),
        (torch.zeros(1, 0, dtype=torch.long), "input_ids is empty"),
    ],
)
def test_bad_input_ids_are_clear_errors(value, message) -> None:
    model = build(make_spec(), seed=0)
    with pytest.raises(MixstackError, match=message):
        model(value)


def test_bad_seq_idx_and_decode_misuse_are_clear_errors() -> None:
    model = build(make_spec(), seed=0)
    x = ids((2, 4))
    with pytest.raises(MixstackError, match=r"seq_idx has shape \(2, 3\); it must match"):
        model(x, seq_idx=torch.zeros(2, 3, dtype=torch.long))
    state = model.init_state(2, 5)
    model(x, state=state)
    with pytest.raises(MixstackError, match="prefill needs a fresh state"):
        model(x, state=state)
    model.step(x[:, 0], state)
    with pytest.raises(MixstackError, match="the state is full"):
        model.step(x[:, 0], state)
    with pytest.raises(MixstackError, match=r"token_t must have shape \(B,\)"):
        model.step(x, model.init_state(2))
    with pytest.raises(MixstackError, match="token_t has batch 1, the state 2"):
        model.step(x[:1, 0], model.init_state(2))
    with pytest.raises(
        MixstackError, match=r"exceeds max_seq_len 16.*layer 0 \(symbol '\*', type 'attention'\)"
    ):
        model.init_state(2, 17)
    with pytest.raises(MixstackError, match=r"state must come from model\.init_state"):
        model.step(x[:, 0], [None])


def test_decoding_refused_when_a_layer_cannot_decode() -> None:
    # Built from a ModelSpec directly (the loader would already refuse this at load).
    symbols = {"*": {**ATTN, "causal": False}, "-": MLP}
    model = build(make_spec("-*", symbols), seed=0)
    with pytest.raises(
        MixstackError,
        match=r"layer 1 \(symbol '\*', type 'attention'\) cannot "
        "decode",
    ):
        model.init_state(1)


def test_device_mismatch_is_a_clear_error() -> None:
    model = build(make_spec(), device="meta")
    with pytest.raises(MixstackError, match="input_ids is on cpu but the model is on meta"):
        model(ids((1, 3)))


def test_deepcopy_keeps_the_tie() -> None:
    model = copy.deepcopy(build(make_spec(), seed=0))
    assert model.lm_head.weight is model.embedding.weight
