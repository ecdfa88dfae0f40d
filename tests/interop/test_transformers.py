"""transformers checkpoints -> mixstack -> transformers, against transformers' own models.

For each family a small model is built with the transformers library, in float64, with
a configuration that moves every field off its default where the family allows it
(norm eps 1e-3, RoPE theta, GQA, explicit head_dim, n_groups > 1, biases, dt limits,
tied/untied heads) and EVERY parameter redrawn (norm weights, A_log, dt_bias, D, conv
biases included). It is saved with ``save_pretrained`` and then:

* imported: logits on ids of length 19 (not a multiple of the SSD chunk of 8), batch 2,
  equal transformers' within max|Δ|/max|logit| < 1e-6 (transformers computes RMSNorm,
  RoPE angles and the SSD scan in float32 even in a float64 model: that is the floor);
* decoded: 8 greedy tokens with our ``step`` equal transformers' cached ``generate``,
  and the per-step logits agree as closely;
* exported back: ``AutoModelForCausalLM.from_pretrained`` of our export gives the same
  logits; import -> export -> import is bit-exact on every weight.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import mixstack
from mixstack.dsl.errors import CheckpointError, MixstackError
from mixstack.interop.transformers import (
    export_transformers,
    load_transformers,
    spec_from_transformers_config,
)
from tests.support.hf_transformers import import_transformers

transformers = import_transformers()

VOCAB = 61
LENGTH = 19
NEW_TOKENS = 8
TOLERANCE = 1e-6


def _llama() -> Any:
    return transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,  # not hidden_size / heads
        hidden_act="gelu",
        max_position_embeddings=64,
        rms_norm_eps=1e-3,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=True,
    )


def _mamba() -> Any:
    return transformers.MambaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        state_size=5,
        num_hidden_layers=2,
        layer_norm_epsilon=1e-3,
        expand=3,
        conv_kernel=3,
        use_bias=True,
        time_step_rank=3,
        residual_in_fp32=False,
        tie_word_embeddings=False,
    )


def _mamba2() -> Any:
    return transformers.Mamba2Config(
        vocab_size=VOCAB,
        hidden_size=16,
        num_heads=8,
        head_dim=4,
        state_size=6,
        num_hidden_layers=2,
        layer_norm_epsilon=1e-3,
        conv_kernel=3,
        n_groups=2,
        use_bias=True,
        chunk_size=8,
        time_step_limit=(0.01, 3.0),
        residual_in_fp32=False,
        tie_word_embeddings=True,
    )


def _bamba() -> Any:
    return transformers.BambaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=40,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_layer_indices=[1],
        mamba_n_heads=8,
        mamba_n_groups=2,
        mamba_d_state=6,
        mamba_d_conv=3,
        mamba_chunk_size=8,
        mamba_proj_bias=True,
        time_step_limit=(0.01, 3.0),
        rms_norm_eps=1e-3,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        attention_bias=True,
        mlp_bias=True,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )


def _nemotron_h() -> Any:
    return transformers.NemotronHConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        layers_block_type=["linear_attention", "mlp", "full_attention", "mlp", "linear_attention"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=6,
        intermediate_size=40,
        mlp_hidden_act="relu2",
        mlp_bias=True,
        mamba_num_heads=8,
        mamba_head_dim=4,
        ssm_state_size=6,
        n_groups=2,
        conv_kernel=3,
        chunk_size=8,
        use_bias=True,
        layer_norm_epsilon=1e-3,
        time_step_limit=(0.01, 3.0),
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )


CONFIGS: dict[str, Callable[[], Any]] = {
    "llama": _llama,
    "mamba": _mamba,
    "mamba2": _mamba2,
    "bamba": _bamba,
    "nemotron_h": _nemotron_h,
}
# The readable spec each family must map to (the realized pattern, one binding per kind).
PATTERNS = {
    "llama": "*-*-",
    "mamba": "MM",
    "mamba2": "MM",
    "bamba": "M-*-M-",
    "nemotron_h": "M-*-M",
}


@torch.no_grad()
def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Redraw every parameter: weights N(0, 0.3), norm weights and D around 1, A_log in
    [-1, 1.5] (A = -exp(A_log)), dt_bias and biases N(0, 0.5)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
        if name.endswith("A_log"):
            value = torch.rand(p.shape, generator=g, dtype=torch.float64) * 2.5 - 1.0
        elif "norm" in name or name.endswith(".D"):
            value = 1.0 + 0.3 * noise
        elif name.endswith(("bias", "dt_bias")):
            value = 0.5 * noise
        else:
            value = 0.3 * noise
        p.copy_(value.to(p.dtype))


def _hf_checkpoint(family: str, folder: Path) -> Any:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[family]())
    model = model.to(torch.float64).eval()
    _randomise(model, seed=len(family))
    model.save_pretrained(folder)
    return model


def _ids(seed: int = 1, length: int = LENGTH) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (2, length), generator=g)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module", params=list(CONFIGS))
def imported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    family = request.param
    folder = tmp_path_factory.mktemp(family)
    hf = _hf_checkpoint(family, folder)
    return family, folder, hf, mixstack.from_pretrained(folder)


def test_spec_is_readable_and_exact(imported: Any) -> None:
    family, _, hf, model = imported
    spec = model.spec
    assert spec.layers.pattern == PATTERNS[family]
    assert spec.layers.overrides == []
    # one binding per layer kind, named by the default symbols a person would use
    assert set(spec.layers.symbols) == set(PATTERNS[family])
    assert spec.norm.eps == 1e-3
    # tied exactly when transformers' model shares the tensors (Nemotron-H never does)
    shared = hf.lm_head.weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
    assert spec.tie_embeddings == shared
    assert spec.total_vocab == spec.padded_vocab == VOCAB
    n_ours = sum(p.numel() for p in model.parameters())
    n_theirs = sum(p.numel() for p in hf.parameters())
    assert n_ours == n_theirs
    # the weights are the stored ones, in the stored dtype
    assert all(p.dtype == torch.float64 for p in model.parameters())


def test_logits_equal_transformers(imported: Any) -> None:
    family, _, hf, model = imported
    ids = _ids()
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(ids).logits
    assert ours.shape == theirs.shape == (2, LENGTH, VOCAB)
    rel = _rel(ours, theirs)
    print(f"{family}: max|Δlogit|/max|logit| = {rel:.2e}")
    assert rel < TOLERANCE, (family, rel)


def test_decode_equals_cached_generation(imported: Any) -> None:
    family, _, hf, model = imported
    prompt = _ids(seed=2, length=17)
    with torch.no_grad():
        out = hf.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            use_cache=True,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=0,
            eos_token_id=None,
        )
        state = model.init_state(2, prompt.shape[1] + NEW_TOKENS)
        logits = model(prompt, state=state)[:, -1]
        tokens, step_logits = [], []
        for _ in range(NEW_TOKENS):
            step_logits.append(logits)
            token = logits.argmax(-1)
            tokens.append(token)
            logits = model.step(token, state)
    ours = torch.stack(tokens, dim=1)
    theirs = out.sequences[:, prompt.shape[1] :]
    assert torch.equal(ours, theirs), (family, ours, theirs)
    # Per-step logits against the full forward over the generated sequence: ours to
    # rounding, transformers' within its float32 floor (its cached Mamba-2 step ignores
    # time_step_limit, only its chunked scan clamps Δ, so its own decode scores are not
    # the reference here).
    with torch.no_grad():
        ours_full = model(out.sequences)[:, prompt.shape[1] - 1 : -1]
        hf_full = hf(out.sequences).logits[:, prompt.shape[1] - 1 : -1]
    assert _rel(torch.stack(step_logits, 1), ours_full) < 1e-10
    assert _rel(ours_full, hf_full) < 2 * TOLERANCE, (family, _rel(ours_full, hf_full))


def test_export_loads_in_transformers_with_equal_logits(imported: Any, tmp_path: Path) -> None:
    family, _, hf, model = imported
    out = export_transformers(model, tmp_path / "exported")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == family
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64).eval()
    ids = _ids(seed=3)
    with torch.no_grad():
        rel_hf = _rel(back(ids).logits, hf(ids).logits)
        rel_ours = _rel(back(ids).logits, model(ids))
    assert rel_hf < TOLERANCE and rel_ours < TOLERANCE, (family, rel_hf, rel_ours)
    # the round trip import -> export -> import is bit-exact on every weight
    again = load_transformers(out)
    assert again.spec == model.spec
    first, second = model.state_dict(), again.state_dict()
    assert first.keys() == second.keys()
    for key in first:
        assert first[key].dtype == second[key].dtype
        assert torch.equal(first[key], second[key]), key


def test_convert_writes_a_model_directory(imported: Any, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from mixstack.interop import convert

    _, folder, _, model = imported
    out = convert(folder, tmp_path / "converted")
    assert json.loads((out / "config.json").read_text())["mixstack_version"]
    stored = load_file(out / "model.safetensors")
    for key, value in model.state_dict().items():
        if key == "lm_head.weight" and model.tied:
            continue  # stored once, as embedding.weight
        assert stored[key].dtype == value.dtype and torch.equal(stored[key], value), key
    # a mixstack model directory loads (in fp32, the loader's default) as the same model
    loaded = mixstack.from_pretrained(out)
    assert loaded.spec == model.spec
    with torch.no_grad():
        assert _rel(loaded(_ids()).double(), model(_ids())) < 1e-5


# -- refusals ---------------------------------------------------------------------------------
def test_every_unexpressible_field_is_named_at_once() -> None:
    config = _llama().to_dict()
    config.update(
        {
            "hidden_act": "relu",
            "attention_dropout": 0.1,
            "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0},
        }
    )
    with pytest.raises(CheckpointError) as info:
        spec_from_transformers_config(config)
    message = str(info.value)
    assert "3 field(s)" in message
    for field in ("hidden_act", "attention_dropout", "rope_type"):
        assert field in message
    assert "llama3" in message


def test_moe_and_mtp_layers_are_refused() -> None:
    config = _nemotron_h().to_dict()
    config["layers_block_type"] = ["linear_attention", "moe", "full_attention", "moe"]
    config["num_nextn_predict_layers"] = 1
    config["mamba_hidden_act"] = "gelu"
    with pytest.raises(CheckpointError) as info:
        spec_from_transformers_config(config)
    message = str(info.value)
    assert "MoE layers at [1, 3]" in message
    assert "num_nextn_predict_layers" in message and "mamba_hidden_act" in message


def test_unsupported_model_type_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(CheckpointError, match=r"model_type 'gpt2' is not supported.*llama"):
        mixstack.from_pretrained(tmp_path)


def test_pickled_weights_are_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(_mamba().to_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: pickled weights are never"):
        mixstack.from_pretrained(tmp_path)


def test_missing_and_extra_tensors_named_with_their_transformers_names(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    _hf_checkpoint("mamba", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["backbone.layers.1.mixer.dt_proj.bias"]
    tensors["backbone.layers.1.mixer.extra"] = torch.zeros(2)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as info:
        mixstack.from_pretrained(tmp_path)
    message = str(info.value)
    assert "missing (1): backbone.layers.1.mixer.dt_proj.bias" in message
    assert "backbone.layers.1.mixer.extra" in message


def test_export_refuses_a_layer_no_family_has(tmp_path: Path) -> None:
    spec = {
        "model": {
            "vocab_size": 32,
            "d_model": 16,
            "layers": {
                "pattern": "*-H-",
                "symbols": {
                    "*": {"type": "attention", "n_heads": 2},
                    "H": {"type": "hyena"},
                },
            },
        }
    }
    model = mixstack.build(spec, seed=0)
    with pytest.raises(MixstackError) as info:
        export_transformers(model, tmp_path / "out")
    message = str(info.value)
    assert "layer 2 is 'hyena'" in message
    assert not (tmp_path / "out").exists()


def test_time_step_limit_infinity_is_read() -> None:
    config = _mamba2().to_dict()
    config["time_step_limit"] = [0.0, {"__float__": "Infinity"}]
    spec = spec_from_transformers_config(config)
    assert spec["model"]["layers"]["symbols"]["M"]["dt_limit"] == [0.0, None]
    assert math.isclose(spec["model"]["norm"]["eps"], 1e-3)


def test_a_native_spec_with_its_own_symbols_exports_as_bamba(tmp_path: Path) -> None:
    """Layer kinds are found by type, not by symbol letter; specials and vocabulary padding
    travel (logits compared on the first total_vocab columns)."""
    spec = {
        "model": {
            "vocab_size": 32,
            "d_model": 16,
            "max_seq_len": 64,
            "layers": {
                "pattern": "S-A-S-",
                "symbols": {
                    "S": {"type": "mamba2", "d_state": 4, "headdim": 4, "ngroups": 2},
                    "A": {"type": "attention", "n_heads": 4, "n_kv_heads": 2, "rope": {"dim": 2}},
                    "-": {"type": "mlp", "hidden": 24},
                },
            },
        }
    }
    model = mixstack.build(spec, seed=0).to(torch.float64)  # fp64 throughout (A_log too)
    out = export_transformers(model, tmp_path / "bamba")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "bamba" and config["attn_layer_indices"] == [1]
    assert config["vocab_size"] == model.spec.padded_vocab == 40
    assert config["eos_token_id"] == model.spec.special_ids["eos"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64).eval()
    ids = torch.randint(0, model.spec.total_vocab, (2, LENGTH))
    with torch.no_grad():
        rel = _rel(hf(ids).logits[..., : model.spec.total_vocab], model(ids))
    assert rel < TOLERANCE, rel
