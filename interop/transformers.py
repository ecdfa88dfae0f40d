"""transformers-format checkpoints <-> mixstack models (docs/interop.md).

Import: :func:`load_transformers` reads a folder holding transformers' ``config.json``
(with ``model_type``, without ``mixstack_version``) and safetensors weights (one file or
an index of shards). :func:`spec_from_transformers_config` maps the configuration to a
spec dict a person would write (``pattern: "(*-)32"``, one binding per layer kind, no
per-layer overrides); the weights are renamed to our keys (:func:`key_map`) and loaded
as stored (a float64 checkpoint stays float64). Every field the mapping cannot express
(an unsupported ``model_type``, an unimplemented flag with a non-default value, MoE
layers, ...) is collected and refused in ONE :class:`CheckpointError`.

Export: :func:`transformers_config_of` finds the family whose configuration expresses a
spec (or names the first layer none can), :func:`export_transformers` writes
``config.json`` + ``model.safetensors`` loadable by ``AutoModelForCausalLM``.

The vocabulary: an imported model has ``special_tokens: []`` and
``pad_vocab_multiple: 1``, so its logits are exactly the ``vocab_size`` columns of the
transformers model. An exported model's ``vocab_size`` is our ``padded_vocab`` (the
embedding rows); the first ``total_vocab`` columns equal ours, the special tokens'
ids go to ``pad_token_id`` / ``bos_token_id`` / ``eos_token_id``.

Facts about the transformers models (names, defaults, where each norm eps is used)
were read from transformers 5.25's ``models/{llama,mamba,mamba2,bamba,nemotron_h}``.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mixstack.dsl.errors import CheckpointError, MixstackError
from mixstack.hub.integrity import mismatch_lines

FAMILIES = ("llama", "mamba", "mamba2", "bamba", "nemotron_h")
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.ckpt", "tf_model.h5")
GATED_ACTS = {"silu": "swiglu", "gelu": "geglu"}  # transformers hidden_act -> our gated MLP
PLAIN_ACTS = {"relu2": "squared_relu", "relu": "relu", "gelu": "gelu", "silu": "silu"}
GATED_BACK = {v: k for k, v in GATED_ACTS.items()}
PLAIN_BACK = {v: k for k, v in PLAIN_ACTS.items()}


# -- reading a config.json -----------------------------------------------------------------
def _plain(value: Any) -> Any:
    """transformers' JSON encodes inf as ``{"__float__": "Infinity"}``: decode it."""
    if isinstance(value, dict):
        if set(value) == {"__float__"}:
            return float(value["__float__"])
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not readable JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: a config must be a JSON object")
    return _plain(data)


def is_transformers_dir(path: Any) -> bool:
    """A folder whose ``config.json`` names a ``model_type`` and is not a mixstack one."""
    try:
        folder = Path(path)
        if not (folder / CONFIG).is_file():
            return False
        data = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except (OSError, TypeError, ValueError):
        return False
    return isinstance(data, dict) and "model_type" in data and "mixstack_version" not in data


class _Fields:
    """The fields of one config with the transformers class defaults filled in; records
    every problem instead of raising at the first."""

    def __init__(self, data: dict[str, Any], defaults: dict[str, Any]):
        self.data = data
        self.defaults = defaults
        self.problems: list[str] = []
        self.used: set[str] = set()

    def __call__(self, name: str) -> Any:
        self.used.add(name)
        value = self.data.get(name)
        return self.defaults.get(name) if value is None else value

    def refuse(self, name: str, why: str) -> None:
        self.problems.append(f"{name} = {json.dumps(self.data.get(name))}: {why}")

    def expect(self, name: str, allowed: Any, why: str) -> None:
        """Refuse ``name`` unless its value (default filled) equals ``allowed``."""
        value = self(name)
        if value != allowed:
            self.problems.append(f"{name} = {json.dumps(value)}: {why} (supported: {allowed!r})")

    def positive_int(self, name: str) -> int:
        value = self(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            self.refuse(name, "must be a positive integer")
            return 1
        return value


def _rope(f: _Fields, head_dim: int, factor: float) -> dict[str, Any] | None:
    """RoPE binding from ``rope_parameters`` (transformers 5) or ``rope_theta`` /
    ``rope_scaling`` (older files); refuses scaled RoPE variants. ``factor``: the rotary
    fraction transformers' model applies (Llama: 1, its default RoPE ignores
    ``partial_rotary_factor``; Bamba: 0.5, forced by ``BambaConfig``)."""
    params = f("rope_parameters") or {}
    if not isinstance(params, dict):
        f.refuse("rope_parameters", "must be a mapping")
        params = {}
    scaling = f("rope_scaling")
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else None
        if kind not in (None, "default"):
            f.refuse("rope_scaling", "only plain RoPE (rope_type default) is implemented")
    kind = params.get("rope_type", "default")
    if kind != "default":
        f.problems.append(
            f"rope_parameters.rope_type = {json.dumps(kind)}: only plain RoPE "
            "(rope_type default) is implemented"
        )
    theta = params.get("rope_theta", f.data.get("rope_theta", 10000.0))
    dim = int(head_dim * factor)
    if dim < 2 or dim % 2:
        f.problems.append(
            f"head_dim = {head_dim}: rotating a fraction {factor} of it gives {dim} rotary "
            "dims; an even number >= 2 is needed"
        )
    rope: dict[str, Any] = {"theta": float(theta)}
    if dim != head_dim:
        rope["dim"] = dim
    return rope


def _zero(f: _Fields, *names: str) -> None:
    for name in names:
        if f(name) not in (0, 0.0, None):
            f.refuse(name, "dropout is not implemented by the import (inference-only field)")


def readable_pattern(symbols: str) -> str:
    """``"*-*-*-"`` -> ``"(*-)3"``; a sequence with no repeating unit stays literal."""
    n = len(symbols)
    for size in range(1, n // 2 + 1):
        if n % size == 0 and symbols[:size] * (n // size) == symbols:
            return f"({symbols[:size]}){n // size}"
    return symbols


def _model(
    f: _Fields, *, eps_field: str, layers: dict[str, Any], max_seq_len: int | None = None
) -> dict[str, Any]:
    model: dict[str, Any] = {
        "arch": "causal_lm",
        "vocab_size": f.positive_int("vocab_size"),
        "special_tokens": [],
        "pad_vocab_multiple": 1,
        "d_model": f.positive_int("hidden_size"),
        "norm": {"type": "rmsnorm", "eps": float(f(eps_field))},
        "tie_embeddings": bool(f("tie_word_embeddings")),
    }
    if max_seq_len is not None:
        model["max_seq_len"] = max_seq_len
    std = f.data.get("initializer_range")
    if isinstance(std, (int, float)) and std > 0:
        model["init"] = {"std": float(std)}
    model["layers"] = layers
    return model


def _dt_limit(f: _Fields, name: str) -> list[float | None]:
    value = f(name)
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        f.refuse(name, "must be a pair [lo, hi]")
        return [0.0, None]
    return [lo, None if math.isinf(hi) else hi]


def _mamba2_binding(
    f: _Fields,
    *,
    d_model: int,
    heads: str,
    head_dim: str,
    groups: str,
    d_state: str,
    d_conv: str,
    chunk: str,
    bias: str,
    conv_bias: str,
    act: str,
    eps: str,
    expand: str | None,
) -> dict[str, Any]:
    n_heads, p = f.positive_int(heads), f.positive_int(head_dim)
    width = n_heads * p
    if expand is not None and f(expand) * d_model != width:
        f.problems.append(
            f"{heads} × {head_dim} = {width} differs from {expand} × hidden_size = "
            f"{f(expand) * d_model}; Mamba-2 heads must fill expand·d_model"
        )
    if width % d_model:
        f.problems.append(
            f"{heads} × {head_dim} = {width} is not a multiple of hidden_size {d_model}: "
            "mixstack's Mamba-2 width is expand·d_model with an integer expand"
        )
    if f(act) != "silu":
        f.refuse(act, "the Mamba-2 short convolution uses silu only")
    binding: dict[str, Any] = {
        "type": "mamba2",
        "d_state": f.positive_int(d_state),
        "d_conv": f.positive_int(d_conv),
        "expand": max(width // d_model, 1),
        "headdim": p,
        "ngroups": f.positive_int(groups),
        "chunk_size": f.positive_int(chunk),
        "bias": bool(f(bias)),
        "conv_bias": bool(f(conv_bias)),
        "dt_limit": _dt_limit(f, "time_step_limit"),
        "norm_eps": float(f(eps)),
    }
    for ours, theirs in (
        ("dt_min", "time_step_min"),
        ("dt_max", "time_step_max"),
        ("dt_init_floor", "time_step_floor"),
    ):
        if theirs in f.data:
            binding[ours] = float(f.data[theirs])
    return binding


def _attention_binding(
    f: _Fields, d_model: int, *, bias: bool, rope_factor: float | None
) -> dict[str, Any]:
    n_heads = f.positive_int("num_attention_heads")
    kv = f("num_key_value_heads") or n_heads
    head_dim = f("head_dim") or d_model // n_heads
    binding: dict[str, Any] = {"type": "attention", "n_heads": n_heads}
    if kv != n_heads:
        binding["n_kv_heads"] = kv
    if head_dim != d_model // n_heads or d_model % n_heads:
        binding["head_dim"] = head_dim
    binding["rope"] = None if rope_factor is None else _rope(f, head_dim, rope_factor)
    if bias:
        binding["qkv_bias"] = binding["out_bias"] = True
    return binding


# -- the five families: config -> spec -----------------------------------------------------
LLAMA_DEFAULTS = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
    "pretraining_tp": 1,
}


def _llama(f: _Fields) -> dict[str, Any]:
    d = f.positive_int("hidden_size")
    act = f("hidden_act")
    if act not in GATED_ACTS:
        f.refuse("hidden_act", f"the gated MLP supports {', '.join(GATED_ACTS)}")
    _zero(f, "attention_dropout")
    f("pretraining_tp")  # transformers 5 no longer reads it
    symbols = {
        "*": _attention_binding(f, d, bias=bool(f("attention_bias")), rope_factor=1.0),
        "-": {
            "type": "mlp",
            "hidden": f.positive_int("intermediate_size"),
            "activation": GATED_ACTS.get(act, "swiglu"),
            "bias": bool(f("mlp_bias")),
        },
    }
    n = f.positive_int("num_hidden_layers")
    layers = {"pattern": readable_pattern("*-" * n), "symbols": symbols}
    return _model(
        f,
        eps_field="rms_norm_eps",
        layers=layers,
        max_seq_len=f.positive_int("max_position_embeddings"),
    )


MAMBA_DEFAULTS = {
    "vocab_size": 50280,
    "hidden_size": 768,
    "state_size": 16,
    "num_hidden_layers": 32,
    "layer_norm_epsilon": 1e-5,
    "expand": 2,
    "conv_kernel": 4,
    "use_bias": False,
    "use_conv_bias": True,
    "hidden_act": "silu",
    "residual_in_fp32": True,
    "time_step_rank": "auto",
    "tie_word_embeddings": True,
}


def _mamba(f: _Fields) -> dict[str, Any]:
    d = f.positive_int("hidden_size")
    if f("hidden_act") != "silu":
        f.refuse("hidden_act", "the Mamba short convolution uses silu only")
    f("residual_in_fp32")  # a precision policy: no effect in fp32 / fp64 (docs/interop.md)
    rank = f("time_step_rank")
    binding: dict[str, Any] = {
        "type": "mamba",
        "d_state": f.positive_int("state_size"),
        "d_conv": f.positive_int("conv_kernel"),
        "expand": f.positive_int("expand"),
        "dt_rank": math.ceil(d / 16) if rank == "auto" else rank,
        "bias": bool(f("use_bias")),
        "conv_bias": bool(f("use_conv_bias")),
    }
    for ours, theirs in (
        ("dt_min", "time_step_min"),
        ("dt_max", "time_step_max"),
        ("dt_init_floor", "time_step_floor"),
        ("dt_scale", "time_step_scale"),
        ("dt_init", "time_step_init_scheme"),
    ):
        if theirs in f.data:
            binding[ours] = f.data[theirs]
    n = f.positive_int("num_hidden_layers")
    layers = {"pattern": readable_pattern("M" * n), "symbols": {"M": binding}}
    return _model(f, eps_field="layer_norm_epsilon", layers=layers)


MAMBA2_DEFAULTS = {
    "num_heads": 128,
    "head_dim": 64,
    "vocab_size": 32768,
    "hidden_size": 4096,
    "state_size": 128,
    "num_hidden_layers": 64,
    "layer_norm_epsilon": 1e-5,
    "expand": 2,
    "conv_kernel": 4,
    "n_groups": 8,
    "use_bias": False,
    "use_conv_bias": True,
    "hidden_act": "silu",
    "residual_in_fp32": True,
    "time_step_limit": [0.0, math.inf],
    "chunk_size": 256,
    "tie_word_embeddings": False,
}


def _mamba2(f: _Fields) -> dict[str, Any]:
    d = f.positive_int("hidden_size")
    f("residual_in_fp32")
    f("time_step_rank")  # transformers' Mamba-2 computes it but never reads it
    binding = _mamba2_binding(
        f,
        d_model=d,
        heads="num_heads",
        head_dim="head_dim",
        groups="n_groups",
        d_state="state_size",
        d_conv="conv_kernel",
        chunk="chunk_size",
        bias="use_bias",
        conv_bias="use_conv_bias",
        act="hidden_act",
        eps="layer_norm_epsilon",
        expand="expand",
    )
    n = f.positive_int("num_hidden_layers")
    layers = {"pattern": readable_pattern("M" * n), "symbols": {"M": binding}}
    return _model(f, eps_field="layer_norm_epsilon", layers=layers)


BAMBA_DEFAULTS = {
    "vocab_size": 128000,
    "tie_word_embeddings": False,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 262144,
    "attention_dropout": 0.0,
    "attn_layer_indices": None,
    "mamba_n_heads": 128,
    "mamba_d_head": "auto",
    "mamba_n_groups": 1,
    "mamba_d_state": 256,
    "mamba_d_conv": 4,
    "mamba_expand": 2,
    "mamba_chunk_size": 256,
    "mamba_conv_bias": True,
    "mamba_proj_bias": False,
    "time_step_limit": [0.0, math.inf],
    "z_loss_coefficient": 0.0,
    "attention_bias": False,
    "mlp_bias": False,
}


def _bamba(f: _Fields) -> dict[str, Any]:
    d = f.positive_int("hidden_size")
    if f("hidden_act") != "silu":
        f.refuse(
            "hidden_act", "Bamba's MLP and Mamba-2 convolution share it; only silu is implemented"
        )
    _zero(f, "attention_dropout")
    if f("z_loss_coefficient") not in (0, 0.0, None):
        f.refuse("z_loss_coefficient", "a training loss term mixstack does not implement")
    if f("mamba_d_head") == "auto":
        f.data["mamba_d_head"] = f("mamba_expand") * d // f.positive_int("mamba_n_heads")
    mamba = _mamba2_binding(
        f,
        d_model=d,
        heads="mamba_n_heads",
        head_dim="mamba_d_head",
        groups="mamba_n_groups",
        d_state="mamba_d_state",
        d_conv="mamba_d_conv",
        chunk="mamba_chunk_size",
        bias="mamba_proj_bias",
        conv_bias="mamba_conv_bias",
        act="hidden_act",
        eps="rms_norm_eps",
        expand="mamba_expand",
    )
    n = f.positive_int("num_hidden_layers")
    attn = f("attn_layer_indices") or []
    bad = [i for i in attn if not isinstance(i, int) or not 0 <= i < n]
    if bad:
        f.refuse("attn_layer_indices", f"indices outside 0..{n - 1}: {bad}")
    symbols = {
        "M": mamba,
        "-": {
            "type": "mlp",
            "hidden": f.positive_int("intermediate_size"),
            "activation": "swiglu",
            "bias": bool(f("mlp_bias")),
        },
    }
    if attn:
        # transformers forces partial_rotary_factor 0.5 for Bamba (BambaConfig.__post_init__)
        symbols["*"] = _attention_binding(f, d, bias=bool(f("attention_bias")), rope_factor=0.5)
    pattern = "".join("*-" if i in attn else "M-" for i in range(n))
    layers = {"pattern": readable_pattern(pattern), "symbols": symbols}
    return _model(
        f,
        eps_field="rms_norm_eps",
        layers=layers,
        max_seq_len=f.positive_int("max_position_embeddings"),
    )


NEMOTRON_DEFAULTS = {
    "vocab_size": 131072,
    "hidden_size": 4096,
    "tie_word_embeddings": False,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 4096,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "sliding_window": None,
    "intermediate_size": 21504,
    "mlp_hidden_act": "relu2",
    "mlp_bias": False,
    "ssm_state_size": 128,
    "mamba_num_heads": 128,
    "mamba_head_dim": 64,
    "mamba_hidden_act": "silu",
    "n_groups": 8,
    "conv_kernel": 4,
    "expand": 2,
    "time_step_limit": [0.0, math.inf],
    "use_conv_bias": True,
    "chunk_size": 128,
    "num_nextn_predict_layers": 0,
    "use_bias": False,
    "layer_norm_epsilon": 1e-5,
    "residual_in_fp32": False,
    "hidden_dropout": 0.0,
}
NEMOTRON_SYMBOLS = {"linear_attention": "M", "full_attention": "*", "mlp": "-", "moe": "E"}


def _nemotron_h(f: _Fields) -> dict[str, Any]:
    d = f.positive_int("hidden_size")
    kinds = f("layers_block_type")
    if kinds is None and isinstance(f.data.get("hybrid_override_pattern"), str):
        reverse = {v: k for k, v in NEMOTRON_SYMBOLS.items()}
        kinds = [reverse.get(c, c) for c in f.data["hybrid_override_pattern"]]
    if not isinstance(kinds, list) or not kinds:
        f.refuse("layers_block_type", "a non-empty list of layer kinds is needed")
        kinds = []
    unknown = sorted({k for k in kinds if k not in NEMOTRON_SYMBOLS})
    if unknown:
        f.refuse("layers_block_type", f"unknown layer kinds {unknown}")
    moe = [i for i, k in enumerate(kinds) if k == "moe"]
    if moe:
        f.problems.append(
            f"layers_block_type: MoE layers at {moe}: mixture-of-experts layers are not "
            "implemented by mixstack"
        )
    if f("num_nextn_predict_layers") not in (0, None):
        f.refuse("num_nextn_predict_layers", "multi-token prediction layers are not implemented")
    if f("sliding_window") is not None:
        f.refuse("sliding_window", "sliding-window attention is not mapped for nemotron_h")
    _zero(f, "attention_dropout", "hidden_dropout")
    f("residual_in_fp32")
    f("attention_bias")  # transformers' NemotronHAttention has no biases whatever this says
    act = f("mlp_hidden_act")
    if act not in PLAIN_ACTS:
        f.refuse("mlp_hidden_act", f"supported: {', '.join(PLAIN_ACTS)}")
    symbols: dict[str, Any] = {}
    if "linear_attention" in kinds:
        symbols["M"] = _mamba2_binding(
            f,
            d_model=d,
            heads="mamba_num_heads",
            head_dim="mamba_head_dim",
            groups="n_groups",
            d_state="ssm_state_size",
            d_conv="conv_kernel",
            chunk="chunk_size",
            bias="use_bias",
            conv_bias="use_conv_bias",
            act="mamba_hidden_act",
            eps="layer_norm_epsilon",
            expand=None,
        )
    if "full_attention" in kinds:
        symbols["*"] = _attention_binding(f, d, bias=False, rope_factor=None)
    if "mlp" in kinds:
        symbols["-"] = {
            "type": "mlp",
            "hidden": f.positive_int("intermediate_size"),
            "activation": PLAIN_ACTS.get(act, "squared_relu"),
            "bias": bool(f("mlp_bias")),
        }
    pattern = "".join(NEMOTRON_SYMBOLS.get(k, "?") for k in kinds)
    layers = {"pattern": readable_pattern(pattern), "symbols": symbols}
    model = _model(
        f,
        eps_field="layer_norm_epsilon",
        layers=layers,
        max_seq_len=f.positive_int("max_position_embeddings"),
    )
    model["tie_embeddings"] = False  # transformers never ties Nemotron-H's head
    return model


@dataclass(frozen=True)
class Family:
    """One transformers model type: its config defaults, config -> spec, key prefixes."""

    name: str
    architecture: str
    defaults: dict[str, Any]
    to_spec: Callable[[_Fields], dict[str, Any]]
    embedding: str
    norm_f: str
    # (position in our pattern, its layer type, the transformers layer index, whether it
    # is the first sub-layer of that layer) -> (norm prefix, mixer prefix)
    prefixes: Callable[[int, str, int, bool], tuple[str, str]]
    sublayers: int  # our sub-layers per transformers layer
    extra: dict[str, Any] = field(default_factory=dict)


def _llama_prefixes(pos: int, sym: str, layer: int, first: bool) -> tuple[str, str]:
    p = f"model.layers.{layer}"
    if first:
        return f"{p}.input_layernorm", f"{p}.self_attn"
    return f"{p}.post_attention_layernorm", f"{p}.mlp"


def _backbone_prefixes(pos: int, sym: str, layer: int, first: bool) -> tuple[str, str]:
    return f"backbone.layers.{layer}.norm", f"backbone.layers.{layer}.mixer"


def _bamba_prefixes(pos: int, kind: str, layer: int, first: bool) -> tuple[str, str]:
    p = f"model.layers.{layer}"
    if first:
        return f"{p}.input_layernorm", f"{p}.{'mamba' if kind == 'mamba2' else 'self_attn'}"
    return f"{p}.pre_ff_layernorm", f"{p}.feed_forward"


FAMILY: dict[str, Family] = {
    "llama": Family(
        "llama",
        "LlamaForCausalLM",
        LLAMA_DEFAULTS,
        _llama,
        "model.embed_tokens",
        "model.norm",
        _llama_prefixes,
        2,
    ),
    "mamba": Family(
        "mamba",
        "MambaForCausalLM",
        MAMBA_DEFAULTS,
        _mamba,
        "backbone.embeddings",
        "backbone.norm_f",
        _backbone_prefixes,
        1,
    ),
    "mamba2": Family(
        "mamba2",
        "Mamba2ForCausalLM",
        MAMBA2_DEFAULTS,
        _mamba2,
        "backbone.embeddings",
        "backbone.norm_f",
        _backbone_prefixes,
        1,
    ),
    "bamba": Family(
        "bamba",
        "BambaForCausalLM",
        BAMBA_DEFAULTS,
        _bamba,
        "model.embed_tokens",
        "model.final_layernorm",
        _bamba_prefixes,
        2,
    ),
    "nemotron_h": Family(
        "nemotron_h",
        "NemotronHForCausalLM",
        NEMOTRON_DEFAULTS,
        _nemotron_h,
        # transformers keeps Nemotron-H's legacy "backbone." names on disk (it renames them
        # to "model." when loading); both are read, "backbone." is written.
        "backbone.embeddings",
        "backbone.norm_f",
        _backbone_prefixes,
        1,
        # ... and never ties its head (NemotronHForCausalLM._tied_weights_keys is empty),
        # whatever tie_word_embeddings says.
        {"aliases": {"model.": "backbone."}, "never_tied": True},
    ),
}


def _family(config: dict[str, Any], where: str) -> Family:
    kind = config.get("model_type")
    if kind not in FAMILY:
        raise CheckpointError(
            f"{where}: model_type {kind!r} is not supported by the transformers import; "
            f"supported: {', '.join(FAMILIES)}"
        )
    return FAMILY[kind]


def spec_from_transformers_config(config: dict[str, Any], where: str = CONFIG) -> dict[str, Any]:
    """A transformers ``config.json`` (as a dict) -> ``{"model": ...}`` spec dict.

    Raises one :class:`CheckpointError` listing every field the mapping cannot express.
    """
    config = _plain(dict(config))
    family = _family(config, where)
    fields = _Fields(config, family.defaults)
    model = family.to_spec(fields)
    if fields.problems:
        raise CheckpointError(
            f"{where}: this {family.name} configuration cannot be imported exactly; "
            f"{len(fields.problems)} field(s) are not expressible in mixstack:\n"
            + "\n".join(f"  - {p}" for p in fields.problems)
        )
    return {"model": model}


# -- weights ----------------------------------------------------------------------------------
_LAYER_KEY = re.compile(r"layers\.(\d+)\.(norm|mixer)\.(.+)")


def key_map(family: Family, types: list[str], tied: bool) -> Callable[[str], str | None]:
    """Our state-dict key -> the transformers key (None: not stored, the tied head).

    ``types``: the layer type of each pattern position (``mamba2``, ``attention``, ...).
    """
    layout = []
    for pos, kind in enumerate(types):
        layer, sub = divmod(pos, family.sublayers)
        layout.append(family.prefixes(pos, kind, layer, sub == 0))

    def theirs(ours: str) -> str | None:
        if ours == "embedding.weight":
            return f"{family.embedding}.weight"
        if ours == "norm_f.weight":
            return f"{family.norm_f}.weight"
        if ours == "lm_head.weight":
            return None if tied else "lm_head.weight"
        match = _LAYER_KEY.fullmatch(ours)
        if match is None:
            raise MixstackError(f"no transformers name for parameter {ours!r}")
        norm, mixer = layout[int(match[1])]
        return f"{norm if match[2] == 'norm' else mixer}.{match[3]}"

    return theirs


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of ``model.safetensors`` or of the shards its index lists."""
    from safetensors import safe_open

    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index}: not a safetensors index: {exc}") from None
    elif (folder / WEIGHTS).is_file():
        files = [WEIGHTS]
    else:
        pickles = [p for p in PICKLES if (folder / p).exists()]
        found = (
            f" (found {', '.join(pickles)}: pickled weights are never loaded; convert them "
            "to safetensors with the library that wrote them, or use a safetensors revision)"
            if pickles
            else ""
        )
        raise CheckpointError(f"{folder}: no {WEIGHTS} or {INDEX}{found}")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        path = folder / name
        if Path(name).name != name or not path.is_file():
            raise CheckpointError(f"{folder}: the index names a missing shard {name!r}")
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    tensors[key] = f.get_tensor(key)
        except Exception as exc:  # safetensors raises its own types for damaged files
            raise CheckpointError(f"{path}: not a readable safetensors file: {exc}") from None
    return tensors


def mismatches(
    expected: dict[str, tuple[int, ...]], got: dict[str, tuple[int, ...]], rename: Any = None
) -> list[str]:
    """Missing / unexpected / mis-shaped lines, by (renamed) name, in the format of
    :func:`mixstack.hub.integrity.header_mismatches`."""
    rename = rename or (lambda k: k)
    missing = [rename(k) for k in expected if k not in got]
    unexpected = sorted(rename(k) for k in got if k not in expected)
    misshaped = [
        f"{rename(k)} (file {list(got[k])}, model {list(shape)})"
        for k, shape in expected.items()
        if k in got and tuple(got[k]) != tuple(shape)
    ]
    return mismatch_lines(
        [("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)]
    )


def load_transformers(
    folder: str | os.PathLike[str],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
) -> Any:
    """Build the mixstack model of a transformers checkpoint folder (see module doc).

    Weights keep their stored dtype unless ``dtype`` is given (then ``keep_fp32``
    parameters stay fp32, as :func:`mixstack.from_pretrained` casts).
    """
    from mixstack.archs.builder import build, parse_dtype
    from mixstack.dsl.loader import load_spec

    folder = Path(folder)
    if not (folder / CONFIG).is_file():
        raise CheckpointError(f"{folder}: no {CONFIG} (a transformers checkpoint folder)")
    config = read_config(folder)
    family = _family(config, str(folder / CONFIG))
    spec = load_spec(spec_from_transformers_config(config, str(folder / CONFIG)))
    model = build(spec, device="meta")
    tensors = read_safetensors(folder)
    theirs = key_map(family, [c.type for c in spec.model.layer_configs()], model.tied)
    ours: dict[str, torch.Tensor] = {}
    expected = model.state_dict()
    wanted = {theirs(k): k for k in expected if theirs(k) is not None}
    for prefix, alias in family.extra.get("aliases", {}).items():
        tensors = {
            alias + k.removeprefix(prefix) if k.startswith(prefix) else k: v
            for k, v in tensors.items()
        }
    for key, tensor in tensors.items():
        if key in wanted:
            ours[wanted[key]] = tensor
        elif key == "lm_head.weight" and model.tied:
            continue  # transformers ties it to the embedding and ignores the stored copy
        else:
            ours[f"<{key}>"] = tensor  # reported as unexpected below, by its own name
    names = {v: k for k, v in wanted.items()}
    problems = mismatches(
        {k: tuple(v.shape) for k, v in expected.items() if theirs(k) is not None},
        {k: tuple(v.shape) for k, v in ours.items()},
        lambda k: names.get(k, k.strip("<>")),
    )
    if problems:
        raise CheckpointError(
            f"{folder}: the weights do not match the {family.name} configuration "
            "(names as transformers writes them):\n" + "\n".join(problems)
        )
    bad = sorted(k for k, v in ours.items() if not v.is_floating_point())
    if bad:
        raise CheckpointError(f"{folder}: non-float tensors where weights are expected: {bad}")
    if model.tied:
        ours["lm_head.weight"] = ours["embedding.weight"]
    model.load_state_dict(ours, strict=True, assign=True)
    model.tie_weights()
    if device is not None:
        model.to(device=device)
    if dtype is not None:
        from mixstack.blocks.precision import cast_module

        cast_module(model, parse_dtype(dtype))
        model.tie_weights()
    return model.eval()


# -- export ---------------------------------------------------------------------------------
def _dtype_name(model: Any) -> str:
    return str(model.embedding.weight.dtype).removeprefix("torch.")


def _same(configs: list[Any], what: str, positions: list[int]) -> list[str]:
    if not configs:
        return []
    first = configs[0]
    for cfg, pos in zip(configs[1:], positions[1:], strict=True):
        if cfg != first:
            return [
                f"layer {pos} ({what}) differs from layer {positions[0]}: transformers "
                "configs hold one setting per layer kind"
            ]
    return []


def _base_problems(spec: Any) -> list[str]:
    out = []
    if spec.arch != "causal_lm":
        out.append(f"arch {spec.arch}: only causal_lm exports")
    if spec.norm.type != "rmsnorm":
        out.append(f"norm {spec.norm.type}: the five families use RMSNorm")
    if spec.embedding.positional != "none" or spec.embedding.scale:
        out.append("embedding: absolute positions / scaling do not exist in these families")
    return out


def _by_type(spec: Any) -> dict[str, list[tuple[int, Any]]]:
    out: dict[str, list[tuple[int, Any]]] = {}
    for pos, cfg in enumerate(spec.layer_configs()):
        out.setdefault(cfg.type, []).append((pos, cfg))
    return out


def _tokens(spec: Any) -> dict[str, Any]:
    ids = spec.special_ids
    return {
        "vocab_size": spec.padded_vocab,
        "hidden_size": spec.d_model,
        "tie_word_embeddings": spec.tie_embeddings,
        "pad_token_id": ids.get("pad"),
        "bos_token_id": ids.get("bos"),
        "eos_token_id": ids.get("eos"),
        "initializer_range": spec.init.std,
    }


def _mamba2_problems(cfg: Any, pos: int) -> list[str]:
    out = []
    if not cfg.rmsnorm or cfg.norm_before_gate:
        out.append(f"layer {pos} (mamba2): needs rmsnorm true, norm_before_gate false")
    if cfg.D_has_hdim:
        out.append(f"layer {pos} (mamba2): D per channel (D_has_hdim) is not expressible")
    return out


def _mamba2_fields(cfg: Any, d_model: int) -> dict[str, Any]:
    lo, hi = cfg.dt_limit
    return {
        "state_size": cfg.d_state,
        "conv_kernel": cfg.d_conv,
        "expand": cfg.expand,
        "n_groups": cfg.ngroups,
        "chunk_size": cfg.chunk_size,
        "head_dim": cfg.headdim,
        "num_heads": cfg.d_ssm // cfg.headdim,
        "use_conv_bias": cfg.conv_bias,
        "time_step_min": cfg.dt_min,
        "time_step_max": cfg.dt_max,
        "time_step_floor": cfg.dt_init_floor,
        "time_step_limit": [lo, math.inf if hi is None else hi],
        "hidden_act": "silu",
        "_bias": cfg.bias,
        "_eps": cfg.norm_eps,
        "_width_ok": cfg.d_ssm == cfg.expand * d_model,
    }


def _attention_fields(cfg: Any) -> dict[str, Any]:
    return {
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "_bias": (cfg.qkv_bias, cfg.out_bias),
        "_rope": cfg.rope,
        "_ok": cfg.window is None and cfg.softmax_scale in (None, cfg.head_dim**-0.5),
    }


def _layer_types(spec: Any) -> tuple[list[str], dict[str, list[tuple[int, Any]]]]:
    return [c.type for c in spec.layer_configs()], _by_type(spec)


def _try_family(name: str, spec: Any) -> tuple[dict[str, Any] | None, list[str]]:
    """(transformers config, []) when ``spec`` is expressible as family ``name``, else
    (None, reasons naming layers)."""
    types, groups = _layer_types(spec)
    problems = _base_problems(spec)
    allowed = {
        "llama": {"attention", "mlp"},
        "mamba": {"mamba"},
        "mamba2": {"mamba2"},
        "bamba": {"mamba2", "attention", "mlp"},
        "nemotron_h": {"mamba2", "attention", "mlp"},
    }[name]
    foreign = [(i, t) for i, t in enumerate(types) if t not in allowed]
    if foreign:
        i, t = foreign[0]
        return None, [f"layer {i} is {t!r}, which {name} has no layer for"]
    for kind, members in groups.items():
        problems += _same([c for _, c in members], kind, [p for p, _ in members])
    config: dict[str, Any] = {"model_type": name, "architectures": [FAMILY[name].architecture]}
    config.update(_tokens(spec))
    config["dtype"] = "float32"
    n = spec.n_layers
    eps = spec.norm.eps
    mlp = groups.get("mlp", [(0, None)])[0][1]
    attn = groups.get("attention", [(0, None)])[0][1]
    m2 = groups.get("mamba2", [(0, None)])[0][1]
    if name in ("llama", "bamba"):
        if n % 2 or any(types[i + 1] != "mlp" or types[i] == "mlp" for i in range(0, n, 2)):
            return None, [f"{name} needs (mixer, MLP) pairs: the pattern is {types}"]
        if mlp is not None and mlp.activation not in GATED_BACK:
            problems.append(f"layer {groups['mlp'][0][0]} (mlp): {name} needs a gated MLP")
    if name == "llama":
        if attn is None:
            return None, ["llama needs attention layers"]
        a = _attention_fields(attn)
        if a["_bias"][0] != a["_bias"][1]:
            problems.append("attention: qkv_bias and out_bias must agree (attention_bias)")
        if not a["_ok"] or a["_rope"] is None or a["_rope"].dim != attn.head_dim:
            problems.append(
                f"layer {groups['attention'][0][0]} (attention): llama needs full RoPE, "
                "no window and the default softmax scale"
            )
        config.update(
            {
                "num_hidden_layers": n // 2,
                "intermediate_size": mlp.hidden,
                "hidden_act": GATED_BACK.get(mlp.activation, "silu"),
                "mlp_bias": mlp.bias,
                "attention_bias": a["_bias"][0],
                "rms_norm_eps": eps,
                "max_position_embeddings": spec.max_seq_len,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": a["_rope"].theta if a["_rope"] else 10000.0,
                },
                **{k: v for k, v in a.items() if not k.startswith("_")},
            }
        )
    elif name == "mamba":
        c = groups["mamba"][0][1]
        config.update(
            {
                "num_hidden_layers": n,
                "state_size": c.d_state,
                "expand": c.expand,
                "intermediate_size": c.expand * spec.d_model,
                "conv_kernel": c.d_conv,
                "use_bias": c.bias,
                "use_conv_bias": c.conv_bias,
                "hidden_act": "silu",
                "layer_norm_epsilon": eps,
                "residual_in_fp32": False,
                "time_step_rank": c.dt_rank,
                "time_step_scale": c.dt_scale,
                "time_step_min": c.dt_min,
                "time_step_max": c.dt_max,
                "time_step_init_scheme": c.dt_init,
                "time_step_floor": c.dt_init_floor,
            }
        )
    else:
        if m2 is not None:
            problems += _mamba2_problems(m2, groups["mamba2"][0][0])
            f2 = _mamba2_fields(m2, spec.d_model)
            if not f2["_width_ok"]:
                problems.append(
                    f"layer {groups['mamba2'][0][0]} (mamba2): d_ssm must be expand·d_model"
                )
            if f2["_eps"] != eps:
                problems.append(
                    f"layer {groups['mamba2'][0][0]} (mamba2): norm_eps {f2['_eps']} must equal "
                    f"model.norm.eps {eps} ({name} has one eps)"
                )
        if name == "mamba2":
            config.update({k: v for k, v in f2.items() if not k.startswith("_")})
            config.update(
                {
                    "num_hidden_layers": n,
                    "use_bias": f2["_bias"],
                    "layer_norm_epsilon": eps,
                    "residual_in_fp32": False,
                }
            )
        elif name == "bamba":
            if m2 is None:
                return None, ["bamba needs Mamba-2 layers"]
            attn_idx = [i // 2 for i in range(0, n, 2) if types[i] == "attention"]
            if mlp.activation != "swiglu":
                problems.append(
                    f"layer {groups['mlp'][0][0]} (mlp): bamba's MLP is swiglu (its hidden_act "
                    "also drives the Mamba-2 convolution)"
                )
            a = _attention_fields(attn) if attn is not None else None
            if a is not None:
                if a["_bias"][0] != a["_bias"][1]:
                    problems.append("attention: qkv_bias and out_bias must agree (attention_bias)")
                if not a["_ok"] or a["_rope"] is None:
                    problems.append(
                        f"layer {groups['attention'][0][0]} (attention): bamba needs RoPE, no "
                        "window and the default softmax scale"
                    )
            config.update(
                {
                    "num_hidden_layers": n // 2,
                    "intermediate_size": mlp.hidden,
                    "hidden_act": "silu",
                    "mlp_bias": mlp.bias,
                    "rms_norm_eps": eps,
                    "max_position_embeddings": spec.max_seq_len,
                    "attn_layer_indices": attn_idx,
                    "mamba_n_heads": f2["num_heads"],
                    "mamba_d_head": f2["head_dim"],
                    "mamba_n_groups": f2["n_groups"],
                    "mamba_d_state": f2["state_size"],
                    "mamba_d_conv": f2["conv_kernel"],
                    "mamba_expand": f2["expand"],
                    "mamba_chunk_size": f2["chunk_size"],
                    "mamba_conv_bias": f2["use_conv_bias"],
                    "mamba_proj_bias": f2["_bias"],
                    "time_step_limit": f2["time_step_limit"],
                }
            )
            if a is not None:
                rope = a["_rope"]
                factor = (rope.dim / attn.head_dim) if rope is not None else 0.5
                if factor != 0.5:
                    problems.append(
                        f"layer {groups['attention'][0][0]} (attention): transformers' Bamba "
                        f"always rotates half the head dims; rope.dim is {rope.dim} of "
                        f"{attn.head_dim}"
                    )
                config.update(
                    {
                        "num_attention_heads": a["num_attention_heads"],
                        "num_key_value_heads": a["num_key_value_heads"],
                        "attention_bias": a["_bias"][0],
                        "rope_parameters": {
                            "rope_type": "default",
                            "rope_theta": rope.theta if rope is not None else 10000.0,
                            "partial_rotary_factor": 0.5,
                        },
                    }
                )
                if attn.head_dim != spec.d_model // attn.n_heads:
                    problems.append(
                        f"layer {groups['attention'][0][0]} (attention): bamba's head_dim is "
                        "hidden_size / num_attention_heads"
                    )
        else:  # nemotron_h
            kinds = {"mamba2": "linear_attention", "attention": "full_attention", "mlp": "mlp"}
            config.update(
                {
                    "tie_word_embeddings": False,  # written as a separate lm_head.weight
                    "layers_block_type": [kinds[t] for t in types],
                    "layer_norm_epsilon": eps,
                    "residual_in_fp32": False,
                    "max_position_embeddings": spec.max_seq_len,
                    "use_bias": False,
                }
            )
            if m2 is not None:
                config.update(
                    {
                        "ssm_state_size": f2["state_size"],
                        "mamba_num_heads": f2["num_heads"],
                        "mamba_head_dim": f2["head_dim"],
                        "mamba_hidden_act": "silu",
                        "n_groups": f2["n_groups"],
                        "conv_kernel": f2["conv_kernel"],
                        "expand": f2["expand"],
                        "chunk_size": f2["chunk_size"],
                        "use_conv_bias": f2["use_conv_bias"],
                        "use_bias": f2["_bias"],
                        "time_step_limit": f2["time_step_limit"],
                    }
                )
            if mlp is not None:
                if mlp.activation not in PLAIN_BACK:
                    problems.append(
                        f"layer {groups['mlp'][0][0]} (mlp): nemotron_h's MLP is not gated "
                        f"({mlp.activation})"
                    )
                config.update(
                    {
                        "intermediate_size": mlp.hidden,
                        "mlp_hidden_act": PLAIN_BACK.get(mlp.activation, "relu2"),
                        "mlp_bias": mlp.bias,
                    }
                )
            if attn is not None:
                a = _attention_fields(attn)
                if a["_rope"] is not None or not a["_ok"] or any(a["_bias"]):
                    problems.append(
                        f"layer {groups['attention'][0][0]} (attention): nemotron_h attention "
                        "has no RoPE, no biases, no window and the default softmax scale"
                    )
                config.update({k: v for k, v in a.items() if not k.startswith("_")})
    return (None, problems) if problems else (config, [])


def transformers_config_of(model_or_spec: Any) -> dict[str, Any]:
    """The transformers ``config.json`` content expressing a model (or its spec).

    Tries llama, mamba, mamba2, bamba, nemotron_h in turn; when none fits, raises a
    :class:`MixstackError` with each family's first reason (naming the layer).
    """
    spec = getattr(model_or_spec, "spec", model_or_spec)
    spec = getattr(spec, "model", spec)
    reasons = []
    for name in FAMILIES:
        config, problems = _try_family(name, spec)
        if config is not None:
            if hasattr(model_or_spec, "embedding"):
                config["dtype"] = _dtype_name(model_or_spec)
            return config
        reasons.append(f"  {name}: {'; '.join(problems[:3])}")
    raise MixstackError(
        "this model is not expressible as a transformers checkpoint of the supported types:\n"
        + "\n".join(reasons)
    )


def transformers_state_dict(model: Any, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Our weights under the transformers names of ``config``'s family (tied head once)."""
    family = FAMILY[config["model_type"]]
    spec = model.spec
    never_tied = family.extra.get("never_tied", False)
    types = [c.type for c in spec.layer_configs()]
    theirs = key_map(family, types, model.tied and not never_tied)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        name = theirs(key)
        if name is not None:
            # a tied head written twice (never_tied families) must be two tensors
            out[name] = tensor.detach().clone() if name == "lm_head.weight" else tensor.detach()
    return {k: v.contiguous() for k, v in out.items()}


def export_transformers(model: Any, out: str | os.PathLike[str]) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (transformers layout) to ``out``.

    ``out`` must not exist or be an empty folder or a folder holding a ``config.json``
    (replaced as a whole: written next to it, then swapped in).
    """
    from safetensors.torch import save_file

    config = transformers_config_of(model)
    tensors = transformers_state_dict(model, config)
    target = Path(out)
    if target.exists() and not (
        target.is_dir() and (not any(target.iterdir()) or (target / CONFIG).is_file())
    ):
        raise CheckpointError(f"{target} exists and is not a model folder; refusing to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    tmp.mkdir()
    try:
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        os.chmod(tmp / WEIGHTS, (tmp / CONFIG).stat().st_mode & 0o777)
        swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def swap_in(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; an old ``target`` is moved aside first, then removed."""
    if not target.exists():
        os.replace(new, target)
        return
    old = target.with_name(f".{target.name}.{secrets.token_hex(6)}.old")
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
