"""Pairs of (our module, reference module) with the same weights, checked equal before timing.

References: transformers' ``Mamba2Mixer`` and ``MambaMixer`` (their torch paths, the
ones that run without CUDA kernels), ``LlamaForCausalLM`` with SDPA attention, and our
own naive kernels. transformers is imported inside the functions (the ``bench`` extra).
Weights are copied from ours into theirs (the parameter names are the same for the SSM
mixers; the Llama mapping is :func:`llama_state_dict`), then :func:`check_pair` compares
outputs and every gradient in fp32 with ``rtol`` (1e-4) before any timing is shown.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mixstack.dsl.errors import MixstackError

RTOL = 1e-4


class EqualityError(MixstackError):
    """A benchmark pair does not compute the same numbers: no timing is reported."""


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as error:  # pragma: no cover - the bench extra installs it
        raise MixstackError(
            "the reference comparisons need transformers: pip install 'mixstack[bench]'"
        ) from error
    return transformers


# -- mixers --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MixerShape:
    """One mixer benchmark size (the issue's goal sizes are the defaults)."""

    d_model: int = 512
    headdim: int = 64
    d_state: int = 64
    chunk: int = 128
    ngroups: int = 1
    mamba1_d_state: int = 16


def ours_mamba2(shape: MixerShape, seed: int = 0) -> nn.Module:
    from mixstack.dsl.context import LayerContext
    from mixstack.mixers.mamba2 import Mamba2, Mamba2Config

    torch.manual_seed(seed)
    cfg = Mamba2Config(
        d_state=shape.d_state,
        headdim=shape.headdim,
        ngroups=shape.ngroups,
        chunk_size=shape.chunk,
        expand=2,
        d_conv=4,
    )
    return Mamba2(cfg, LayerContext(d_model=shape.d_model))


def ours_hydra(shape: MixerShape, seed: int = 0) -> nn.Module:
    from mixstack.dsl.context import LayerContext
    from mixstack.mixers.hydra import Hydra, HydraConfig

    torch.manual_seed(seed)
    cfg = HydraConfig(
        d_state=shape.d_state,
        headdim=shape.headdim,
        ngroups=shape.ngroups,
        chunk_size=shape.chunk,
        expand=2,
    )
    return Hydra(cfg, LayerContext(d_model=shape.d_model, arch="encoder"))


def ours_mamba1(shape: MixerShape, seed: int = 0) -> nn.Module:
    from mixstack.dsl.context import LayerContext
    from mixstack.mixers.mamba import Mamba, MambaConfig

    torch.manual_seed(seed)
    cfg = MambaConfig(d_state=shape.mamba1_d_state, expand=2, d_conv=4)
    return Mamba(cfg, LayerContext(d_model=shape.d_model))


def hf_mamba2(ours: nn.Module, shape: MixerShape) -> nn.Module:
    """transformers' ``Mamba2Mixer`` of the same size, holding ``ours``' weights."""
    tf = _transformers()
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    d_inner = 2 * shape.d_model
    cfg = tf.Mamba2Config(
        hidden_size=shape.d_model,
        num_heads=d_inner // shape.headdim,
        head_dim=shape.headdim,
        state_size=shape.d_state,
        expand=2,
        n_groups=shape.ngroups,
        chunk_size=shape.chunk,
        conv_kernel=4,
        use_bias=False,
        use_conv_bias=True,
        layer_norm_epsilon=1e-5,
        time_step_limit=(0.0, float("inf")),
        num_hidden_layers=1,
        vocab_size=16,
    )
    ref = Mamba2Mixer(cfg, layer_idx=0)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ref.train()


def hf_mamba1(ours: nn.Module, shape: MixerShape) -> nn.Module:
    """transformers' ``MambaMixer`` (sequential torch scan, no mambapy) with ``ours``' weights."""
    tf = _transformers()
    from transformers.models.mamba.modeling_mamba import MambaMixer

    cfg = tf.MambaConfig(
        hidden_size=shape.d_model,
        state_size=shape.mamba1_d_state,
        expand=2,
        conv_kernel=4,
        use_bias=False,
        use_conv_bias=True,
        use_mambapy=False,
        time_step_rank=math.ceil(shape.d_model / 16),
        num_hidden_layers=1,
        vocab_size=16,
    )
    ref = MambaMixer(cfg, layer_idx=0)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ref.train()


# -- whole models ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LlamaShape:
    """transformer++ train-step size (the issue's goal size by default)."""

    n_layers: int = 4
    d_model: int = 512
    n_heads: int = 8
    n_kv_heads: int = 2
    ffn: int = 1408
    vocab: int = 8192
    batch: int = 4
    seq_len: int = 512


def transformer_pp_spec(shape: LlamaShape) -> dict[str, Any]:
    """Our spec of the Llama layout: ``(*-)n`` pre-norm sub-layers, RoPE, SwiGLU, untied
    head, no special tokens (so the vocabulary is exactly the reference's)."""
    return {
        "model": {
            "arch": "causal_lm",
            "vocab_size": shape.vocab,
            "special_tokens": [],
            "max_seq_len": shape.seq_len,
            "d_model": shape.d_model,
            "norm": {"type": "rmsnorm", "eps": 1e-5},
            "tie_embeddings": False,
            "layers": {
                "pattern": f"(*-){shape.n_layers}",
                "symbols": {
                    "*": {
                        "type": "attention",
                        "n_heads": shape.n_heads,
                        "n_kv_heads": shape.n_kv_heads,
                        "rope": {"theta": 10000.0},
                    },
                    "-": {"type": "mlp", "hidden": shape.ffn, "activation": "swiglu"},
                },
            },
        }
    }


def llama_param_map(n_layers: int) -> dict[str, str]:
    """Our parameter name -> ``LlamaForCausalLM``'s (untied head): attention at
    ``layers.{2j}``, the MLP at ``layers.{2j+1}``."""
    m = {
        "embedding.weight": "model.embed_tokens.weight",
        "norm_f.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight",
    }
    for j in range(n_layers):
        a, f, h = f"layers.{2 * j}", f"layers.{2 * j + 1}", f"model.layers.{j}"
        m[f"{a}.norm.weight"] = f"{h}.input_layernorm.weight"
        m[f"{f}.norm.weight"] = f"{h}.post_attention_layernorm.weight"
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            m[f"{a}.mixer.{p}.weight"] = f"{h}.self_attn.{p}.weight"
        for p in ("gate_proj", "up_proj", "down_proj"):
            m[f"{f}.mixer.{p}.weight"] = f"{h}.mlp.{p}.weight"
    return m


def llama_state_dict(ours: nn.Module, n_layers: int, vocab: int) -> dict[str, Tensor]:
    """Our weights under Llama's keys (embedding and head cut to ``vocab`` rows)."""
    sd = ours.state_dict()
    out = {}
    for key, ref_key in llama_param_map(n_layers).items():
        t = sd[key]
        out[ref_key] = t[:vocab] if key in ("embedding.weight", "lm_head.weight") else t
    return out


def hf_llama(ours: nn.Module, shape: LlamaShape) -> nn.Module:
    """``LlamaForCausalLM`` (SDPA attention) holding ``ours``' weights."""
    tf = _transformers()
    cfg = tf.LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.d_model,
        intermediate_size=shape.ffn,
        num_hidden_layers=shape.n_layers,
        num_attention_heads=shape.n_heads,
        num_key_value_heads=shape.n_kv_heads,
        max_position_embeddings=shape.seq_len,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
    )
    cfg._attn_implementation = "sdpa"
    ref = tf.LlamaForCausalLM(cfg)
    ref.load_state_dict(llama_state_dict(ours, shape.n_layers, shape.vocab), strict=True)
    return ref.train()


def lm_loss(logits: Tensor, ids: Tensor) -> Tensor:
    """Next-token cross-entropy the transformers way, and our training path's
    (``training.losses``): the labels are shifted (the last position scores nothing),
    the logits are used whole, every vocabulary column kept. Slicing the logits instead
    would copy the largest activation of the step (and its gradient) for nothing."""
    from mixstack.training.losses import mean_loss, next_token_labels

    return mean_loss(logits, next_token_labels(ids))


# -- equality before timing ------------------------------------------------------------------------


def close(a: Tensor, b: Tensor, rtol: float = RTOL) -> tuple[bool, float]:
    """``|a − b| <= rtol·(|b| + max|b|·1e-2)`` elementwise (a relative test that tolerates
    entries near 0 at 1% of the tensor's scale); returns (ok, max relative error)."""
    a, b = a.detach().double(), b.detach().double()
    scale = b.abs() + b.abs().max() * 1e-2 + 1e-30
    err = ((a - b).abs() / scale).max().item()
    return err <= rtol, err


def _grads(fn: Callable[[], Tensor], params: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    out = fn()
    # a fixed cotangent with both signs, so errors of opposite sign cannot cancel in a sum
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    loss = out if out.dim() == 0 else (out * weights).sum()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return out, [
        torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)
    ]


def check_pair(
    name: str,
    ours: Callable[[], Tensor],
    ours_params: dict[str, Tensor],
    ref: Callable[[], Tensor],
    ref_params: dict[str, Tensor],
    rtol: float = RTOL,
    exact: tuple[Callable[[], Tensor], dict[str, Tensor]] | None = None,
) -> float:
    """Outputs and gradients of two callables; ``*_params`` name the tensors to
    differentiate by the same keys (our parameter names). Raises :class:`EqualityError`
    naming the first tensor that differs; returns the largest relative error.

    ``exact``: the same computation in float64 (our module copied to float64, on the
    input in float64), with its tensors under the same keys. A tensor that differs by
    more than ``rtol`` still passes when ours is within ``rtol`` of the float64 result
    and the reference is further from it than ours: the gap is then the reference's
    rounding (transformers' Mamba-2 at L = 2048 sums its conv-bias gradient in fp32 to
    1.1e-4 of the exact value; ours is within 1e-5). Its error against float64 counts."""
    if set(ours_params) != set(ref_params):
        raise EqualityError(
            f"{name}: parameters differ: {sorted(set(ours_params) ^ set(ref_params))}"
        )
    keys = sorted(ours_params)
    out_a, grads_a = _grads(ours, [ours_params[k] for k in keys])
    out_b, grads_b = _grads(ref, [ref_params[k] for k in keys])
    names = ["output"] + [f"gradient of {k}" for k in keys]
    exact_tensors: dict[str, Tensor] | None = None
    worst = 0.0
    for what, a, b in zip(names, [out_a, *grads_a], [out_b, *grads_b], strict=True):
        if a.shape != b.shape:
            raise EqualityError(
                f"{name}: {what}: shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
            )
        ok, err = close(a, b, rtol)
        if not ok and exact is not None:
            if exact_tensors is None:
                fn, params = exact
                out_e, grads_e = _grads(fn, [params[k] for k in keys])
                exact_tensors = dict(zip(names, [out_e, *grads_e], strict=True))
            ours_ok, ours_err = close(a, exact_tensors[what], rtol)
            _, ref_err = close(b, exact_tensors[what], rtol)
            if ours_ok and ref_err > ours_err:
                ok, err = True, ours_err
            else:
                err = max(err, ours_err)
        worst = max(worst, err)
        if not ok:
            raise EqualityError(
                f"{name}: {what} differs from the reference (max relative error {err:.2e} > "
                f"rtol {rtol:g}); no timing reported"
            )
    return worst
