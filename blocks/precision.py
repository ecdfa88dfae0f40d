"""Casting a model to low precision while keeping the parameters that must stay fp32.

``module.to(torch.bfloat16)`` casts everything, including SSM scalars such as
``A_log``, ``D`` and ``dt_bias`` whose bf16 rounding changes the dynamics (docs/math.md#pitfalls).
Mixers mark those with ``ParamHint(keep_fp32=True)`` in ``param_hints()``;
:func:`cast_module` honours the hints of every mixer inside the module tree.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def keep_fp32_names(module: nn.Module) -> set[str]:
    """Full names (relative to ``module``) of parameters and buffers hinted keep_fp32."""
    names: set[str] = set()
    for prefix, sub in module.named_modules():
        hints = getattr(sub, "param_hints", None)
        if not callable(hints):
            continue
        for name, hint in hints().items():
            if hint.keep_fp32:
                names.add(f"{prefix}.{name}" if prefix else name)
    return names


@torch.no_grad()
def cast_module(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast floating parameters and buffers to ``dtype`` in place; keep_fp32 ones never go
    below fp32.

    ``keep_fp32`` means "at least fp32": under a 16-bit ``dtype`` those tensors are set to
    fp32 (so a model built in fp64 and cast to bf16 still keeps them at fp32); under fp32
    or fp64 they follow ``dtype`` like everything else, so an explicit fp64 model is fp64
    throughout. Non-floating tensors (ints, complex) are left alone. Returns ``module``.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"cast_module: {dtype} is not a floating dtype")
    keep = keep_fp32_names(module)
    for prefix, sub in module.named_modules():
        for tensors in (sub._parameters, sub._buffers):
            for name, tensor in tensors.items():
                if tensor is None or not tensor.is_floating_point():
                    continue
                full = f"{prefix}.{name}" if prefix else name
                target = torch.float32 if full in keep and dtype.itemsize < 4 else dtype
                if tensor.dtype != target:
                    tensor.data = tensor.data.to(target)
    log.debug("cast %s to %s keeping %d tensors fp32", type(module).__name__, dtype, len(keep))
    return module
