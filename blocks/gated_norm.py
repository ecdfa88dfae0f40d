"""Group-wise gated RMSNorm (mamba_ssm ``RMSNormGated``; docs/math.md#mamba-2 step 6, #hydra).

With gate ``z`` and weight ``w``, over groups of ``group_size`` channels:

* ``norm_before_gate=False`` (Mamba-2 default): ``rms_g(y ⊙ silu(z)) · w``
* ``norm_before_gate=True`` (Hydra):            ``rms_g(y) · w ⊙ silu(z)``

where ``rms_g`` divides every group by ``sqrt(mean(group²) + eps)``. A group size
smaller than the width matters: Mamba-2 with G groups normalises each group of
d_ssm/G channels on its own (1024 channels in the 8B hybrid), so a tensor-parallel
split by groups gives the same numbers. Without ``z`` it is a plain (grouped) RMSNorm.

Computed in fp32 (fp64 for fp64 inputs) and cast back to the input dtype, like the
other norms (blocks/norms.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def gated_rms_norm(
    y: Tensor,
    z: Tensor | None,
    weight: Tensor,
    *,
    group_size: int,
    eps: float = 1e-5,
    norm_before_gate: bool = False,
) -> Tensor:
    """``y (..., D)``, ``z (..., D) | None``, ``weight (D,)`` -> ``(..., D)`` in ``y.dtype``.

    ``group_size`` must divide D.
    """
    width = y.shape[-1]
    if width % group_size != 0:
        raise ValueError(f"gated_rms_norm: group_size {group_size} does not divide width {width}")
    f = torch.float64 if y.dtype == torch.float64 else torch.float32
    yf = y.to(f)
    gate = F.silu(z.to(f)) if z is not None else None
    if gate is not None and not norm_before_gate:
        yf = yf * gate
    grouped = yf.unflatten(-1, (width // group_size, group_size))  # (..., groups, group_size)
    rstd = torch.rsqrt(grouped.pow(2).mean(dim=-1, keepdim=True) + eps)
    out = (grouped * rstd).flatten(-2) * weight.to(f)
    if gate is not None and norm_before_gate:
        out = out * gate
    return out.to(y.dtype)


class GatedRMSNorm(nn.Module):
    """Module form of :func:`gated_rms_norm` with a learned ``weight (D,)`` (ones at init).

    The parameter is named ``weight`` so a mixer's ``norm.weight`` maps one to one to
    mamba_ssm / Hydra checkpoints.
    """

    def __init__(
        self,
        dim: int,
        *,
        group_size: int | None = None,
        eps: float = 1e-5,
        norm_before_gate: bool = False,
    ) -> None:
        super().__init__()
        group_size = dim if group_size is None else group_size
        if group_size < 1 or dim % group_size != 0:
            raise ValueError(f"GatedRMSNorm: group_size {group_size} must divide dim {dim}")
        self.dim = dim
        self.group_size = group_size
        self.eps = eps
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Ones; ``generator`` is accepted for a uniform init protocol and not used."""
        with torch.no_grad():
            self.weight.fill_(1.0)

    def forward(self, y: Tensor, z: Tensor | None = None) -> Tensor:
        """``y (..., D)``, gate ``z (..., D) | None`` -> ``(..., D)``."""
        return gated_rms_norm(
            y,
            z,
            self.weight,
            group_size=self.group_size,
            eps=self.eps,
            norm_before_gate=self.norm_before_gate,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.dim}, group_size={self.group_size}, eps={self.eps}, "
            f"norm_before_gate={self.norm_before_gate}"
        )
