"""The gated RMSNorm module of the SSD mixers (mamba_ssm ``RMSNormGated``); the
computation and its backends live in :mod:`mixstack.kernels.gated_norm`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mixstack.kernels.backends import BackendPolicy
from mixstack.kernels.gated_norm import gated_rms_norm, gated_rms_norm_plain

__all__ = ["GatedRMSNorm", "gated_rms_norm", "gated_rms_norm_plain"]


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

    def forward(
        self, y: Tensor, z: Tensor | None = None, backends: BackendPolicy | None = None
    ) -> Tensor:
        """``y (..., D)``, gate ``z (..., D) | None`` -> ``(..., D)``; ``backends``: the
        mixer's kernel policy (``None``: ``auto``)."""
        return gated_rms_norm(
            y,
            z,
            self.weight,
            group_size=self.group_size,
            eps=self.eps,
            norm_before_gate=self.norm_before_gate,
            backends=backends,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.dim}, group_size={self.group_size}, eps={self.eps}, "
            f"norm_before_gate={self.norm_before_gate}"
        )
