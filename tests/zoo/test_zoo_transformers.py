"""The published-configuration presets count exactly the parameters of the same
configuration built by the ``transformers`` library (an independent implementation),
both on the meta device: nothing is allocated, so 8B models count in seconds."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mixstack.archs.builder import build
from mixstack.dsl.loader import load_spec

pytest.importorskip("transformers")  # the interop extra (make test installs it)

# Run in a child process started outside the checkout: with the repository root on
# sys.path, transformers would take our kernels/ folder for the `kernels` hub package.
COUNT = """
import json, sys, torch, transformers
cases = json.loads(sys.argv[1])
out = {}
for name, (config_cls, model_cls, fields) in cases.items():
    config = getattr(transformers, config_cls)(**fields)
    with torch.device("meta"):
        model = getattr(transformers, model_cls)(config)
    out[name] = sum(p.numel() for p in model.parameters())
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def hf_counts(tmp_path_factory) -> dict[str, int]:
    cwd = tmp_path_factory.mktemp("hf")
    result = subprocess.run(
        [sys.executable, "-c", COUNT, json.dumps(CASES)],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _ours(name: str) -> int:
    return sum(p.numel() for p in build(load_spec(f"zoo:{name}"), device="meta").parameters())


# The published configurations (config.json of each checkpoint; sources in docs/zoo.md).
CASES = {
    "llama-7b": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
        ),
    ),
    "mamba-130m": (
        "MambaConfig",
        "MambaForCausalLM",
        dict(vocab_size=50280, hidden_size=768, num_hidden_layers=24, state_size=16, expand=2),
    ),
    "mamba2-130m": (
        "Mamba2Config",
        "Mamba2ForCausalLM",
        dict(
            vocab_size=50288,
            hidden_size=768,
            num_hidden_layers=24,
            state_size=128,
            head_dim=64,
            num_heads=24,
            n_groups=1,
            expand=2,
            tie_word_embeddings=True,
        ),
    ),
    "bamba-9b": (
        "BambaConfig",
        "BambaForCausalLM",
        dict(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            attn_layer_indices=[9, 18, 27],
            mamba_n_heads=128,
            mamba_d_head=64,
            mamba_n_groups=1,
            mamba_d_state=128,
            mamba_d_conv=4,
            mamba_expand=2,
            mamba_chunk_size=256,
            tie_word_embeddings=False,
        ),
    ),
    "nemotron-h-8b": (
        "NemotronHConfig",
        "NemotronHForCausalLM",
        dict(
            vocab_size=131072,
            hidden_size=4096,
            hybrid_override_pattern="M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            intermediate_size=21504,
            mlp_hidden_act="relu2",
            ssm_state_size=128,
            mamba_num_heads=128,
            mamba_head_dim=64,
            n_groups=8,
            conv_kernel=4,
            expand=2,
            chunk_size=128,
            tie_word_embeddings=False,
        ),
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_preset_counts_what_transformers_builds_for_the_published_config(
    name: str, hf_counts: dict[str, int]
) -> None:
    assert _ours(name) == hf_counts[name]
