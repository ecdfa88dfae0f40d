"""Turn a validated spec into a model (DESIGN §6).

Steps of :func:`build`:

1. Every module is constructed on the meta device: no memory, no randomness, so an 8B
   spec builds (and reports) in seconds.
2. Unless ``device="meta"``, each top-level part (embedding, every layer, final norm,
   head) in turn is given real CPU storage (``to_empty``), initialised from ONE
   explicit ``torch.Generator`` seeded with ``seed`` (never the global RNG), then
   moved to ``device``. Drawing on the CPU makes a seed give the same weights on
   every device; doing it part by part bounds the extra host memory to one layer.
3. ``spec.init.scheme == "normal_linear"``: right after a part's own init, every
   ``nn.Linear`` in it (Δ projections, filter MLPs, heads) is redrawn from
   N(0, ``init.std``) with a zero bias: the safari / zoology LM init. The redraws come
   from a second generator (seeded from ``seed``), so every other parameter
   (embedding, A_log, dt_bias, convs, norms) is exactly the one the ``mixstack``
   scheme (default, no redraw) gives for that seed.
4. Residual scaling: parameters a mixer hints as ``residual_out`` are multiplied by
   ``1/sqrt(n_residual)`` (``spec.init.residual_scaling``), where ``n_residual`` counts
   residual branches: one per symbol, one per sub-block of a sequential composite
   (the mamba_ssm ``n_residuals_per_layer · n_layer`` rule). So ``"M-"`` repeated and a
   ``sequential [mamba2, mlp]`` symbol repeated initialise alike. It applies under
   both schemes: safari / zoology redraw ``out_proj`` / ``fc2`` from
   N(0, std/√(2·n_layer)), which is N(0, std) scaled by 1/√(residual branches) when
   each layer is a mixer plus an MLP.
5. ``dtype``: :func:`mixstack.blocks.precision.cast_module` (``keep_fp32`` params stay
   fp32 under 16-bit dtypes; ``float64`` is fp64 throughout).
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mixstack.archs.models import MixStackModel
from mixstack.blocks.norms import build_norm
from mixstack.blocks.residual import ResidualBlock
from mixstack.dsl import registry
from mixstack.dsl.base import LayerConfig
from mixstack.dsl.context import LayerContext
from mixstack.dsl.errors import MixstackError
from mixstack.dsl.spec import ModelSpec, RunSpec, Spec
from mixstack.mixers.base import init_linear

log = logging.getLogger(__name__)

# Seeds the ``normal_linear`` redraw generator (``seed ^ salt``, both < 2**64): a stream
# apart from the main one, which therefore draws the same under both init schemes.
LINEAR_REDRAW_SALT = 0x9E3779B97F4A7C15

DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "fp64": torch.float64,
    "float64": torch.float64,
    "double": torch.float64,
}


def parse_dtype(value: torch.dtype | str) -> torch.dtype:
    """``torch.bfloat16`` or a name (``bf16``, ``fp32``, ``float16``, ...) -> floating dtype."""
    if isinstance(value, torch.dtype):
        dtype = value
    elif isinstance(value, str) and value.removeprefix("torch.") in DTYPES:
        dtype = DTYPES[value.removeprefix("torch.")]
    else:
        raise MixstackError(
            f"unknown dtype {value!r}; allowed: a floating torch.dtype or one of "
            f"{', '.join(DTYPES)}"
        )
    if not dtype.is_floating_point:
        raise MixstackError(f"model dtype must be floating point, got {dtype}")
    return dtype


def _as_spec(spec: Any) -> tuple[ModelSpec, RunSpec]:
    """Spec / ModelSpec / path / ``zoo:NAME`` / dict -> (architecture, run section)."""
    if isinstance(spec, Spec):
        return spec.model, spec.run
    if isinstance(spec, ModelSpec):
        return spec, RunSpec()
    if isinstance(spec, (str, Path, dict)):
        from mixstack.dsl.loader import load_spec

        loaded = load_spec(spec)
        return loaded.model, loaded.run
    raise MixstackError(
        "build() takes a Spec, a ModelSpec, a YAML path, 'zoo:NAME' or a dict; "
        f"got {type(spec).__name__}"
    )


def _check_seed(seed: Any) -> int:
    """``None`` -> a fresh seed from the OS (never from torch's global RNG)."""
    if seed is None:
        return random.SystemRandom().randrange(2**63)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise MixstackError(f"seed must be an int in 0..2**64-1 or None, got {seed!r}")
    return seed


def _device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise MixstackError(f"invalid device {device!r}: {exc}") from None


# -- construction (on the meta device) ----------------------------------------------------
def _composite_role(cfg: LayerConfig, module_cls: type) -> str | None:
    """``"block"`` / ``"mixer"`` for composites (blocks/composite.py protocol), else None."""
    if cfg.kind != "composite":
        return None
    role = getattr(module_cls, "child_role", None)
    if role not in ("block", "mixer"):
        raise MixstackError(
            f"composite layer type {cfg.type!r} ({module_cls.__name__}) must declare "
            "child_role = 'block' or 'mixer'"
        )
    return role


def build_mixer(cfg: LayerConfig, ctx: LayerContext) -> nn.Module:
    """The bare layer of ``cfg`` (a parallel composite gets its branches built first)."""
    module_cls = registry.get(cfg.type).module_cls
    role = _composite_role(cfg, module_cls)
    if role is None:
        return module_cls(cfg, ctx)
    if role != "mixer":
        raise MixstackError(f"a {cfg.type!r} composite cannot sit inside another composite")
    return module_cls(cfg, ctx, [build_mixer(child, ctx) for child in cfg.children()])


def build_block(cfg: LayerConfig, ctx: LayerContext, spec: ModelSpec) -> ResidualBlock:
    """Norm + layer + residual (+ dropout). Activation checkpointing is a run setting
    (``run.activation_checkpointing``, set by the trainer), not part of the model."""
    return ResidualBlock(build_norm(spec.norm, spec.d_model), build_mixer(cfg, ctx), spec.dropout)


def build_position(cfg: LayerConfig, index: int, spec: ModelSpec) -> nn.Module:
    """The block at pattern position ``index``: a ResidualBlock or a sequential composite."""
    ctx = spec.context(index)
    module_cls = registry.get(cfg.type).module_cls
    if _composite_role(cfg, module_cls) == "block":
        return module_cls(cfg, ctx, [build_block(child, ctx, spec) for child in cfg.children()])
    return build_block(cfg, ctx, spec)


# -- initialisation -------------------------------------------------------------------------
@torch.no_grad()
def initialize(model: MixStackModel, seed: int, device: torch.device) -> None:
    """Real storage on ``device`` and every weight drawn from one seeded CPU generator."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    linear_redraw = None
    if model.spec.init.scheme == "normal_linear":
        linear_redraw = torch.Generator(device="cpu").manual_seed(seed ^ LINEAR_REDRAW_SALT)
    for part, init in model.init_parts():
        part.to_empty(device="cpu")
        init(generator)
        if linear_redraw is not None:
            for module in part.modules():
                if isinstance(module, nn.Linear):
                    init_linear(module, model.spec.init.std, linear_redraw)
        part.to(device)
    model.tie_weights()
    if model.spec.init.residual_scaling:
        _scale_residual_outputs(model)


def _scale_residual_outputs(model: MixStackModel) -> None:
    scale = 1.0 / math.sqrt(max(model.n_residual_branches(), 1))
    params = dict(model.named_parameters())
    for name, hint in model.param_hints().items():
        if hint.residual_out:
            params[name].mul_(scale)


def build(
    spec: Any,
    *,
    seed: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
) -> MixStackModel:
    """Build a model from a spec (``Spec``, ``ModelSpec``, YAML path, ``zoo:NAME`` or dict).

    Args:
        seed: weights are a pure function of (spec, seed); ``None`` draws a seed from
            the OS. The seed used is ``model.seed``.
        device: where the weights live (default CPU). ``"meta"`` allocates nothing and
            draws nothing: enough for :meth:`MixStackModel.report`.
        dtype: cast after init (``keep_fp32`` parameters stay fp32 under bf16 / fp16;
            ``torch.float64`` casts every floating tensor).
    """
    model_spec, run = _as_spec(spec)
    seed = _check_seed(seed)
    target = _device(device)
    cast_to = None if dtype is None else parse_dtype(dtype)
    with torch.device("meta"):
        layers = [
            build_position(cfg, i, model_spec) for i, cfg in enumerate(model_spec.layer_configs())
        ]
        model = MixStackModel(model_spec, layers, run)
    model.seed = seed
    if target.type != "meta":
        initialize(model, seed, target)
    if cast_to is not None:
        from mixstack.blocks.precision import cast_module

        cast_module(model, cast_to)
        model.tie_weights()
    log.debug("built %s (%d layers) on %s, seed %d", model_spec.arch, len(layers), target, seed)
    return model
