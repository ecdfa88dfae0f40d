"""Several linear maps of the same input as one GEMM (q/k/v, gate/up).

The parameters stay separate (``q_proj.weight``, ``k_proj.weight``, ... keep their
state-dict keys, so checkpoints, the HF interop and the hub paths see no change); the
weights are concatenated at call time instead. On the CPU one (N, ΣOut) GEMM beats two
or three narrower ones (the k/v projections of a GQA layer are only Hkv·P wide), and
the backward gives one input-gradient GEMM instead of several plus their sum. The
concatenation copies the weights once per call (D · ΣOut values, small next to the
GEMM's B·L · D · ΣOut work).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def fused_linear(x: Tensor, linears: Sequence[nn.Linear]) -> tuple[Tensor, ...]:
    """``x (..., D)`` -> one ``(..., out_i)`` per linear, as ``linear_i(x)`` would give.

    One GEMM over the concatenated weights when the linears share their dtype and either
    all or none have a bias; otherwise (mixed layouts) each linear is called on its own.
    The outputs are views into one ``(..., Σ out_i)`` tensor (last dim split).
    """
    weights = [lin.weight for lin in linears]
    biases = [lin.bias for lin in linears]
    has_bias = [b is not None for b in biases]
    same_dtype = len({w.dtype for w in weights}) == 1
    if len(linears) < 2 or not same_dtype or (any(has_bias) and not all(has_bias)):
        return tuple(lin(x) for lin in linears)
    weight = torch.cat(weights)  # (Σ out_i, D)
    bias = torch.cat([b for b in biases if b is not None]) if all(has_bias) else None
    out = F.linear(x, weight, bias)  # (..., Σ out_i)
    return out.split([w.shape[0] for w in weights], dim=-1)
