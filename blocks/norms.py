"""Normalisation layers used by every pre-norm block and as the final norm.

Both compute in at least fp32 (fp64 stays fp64) and cast back to the input dtype: the
mean of squares of a bf16 activation loses enough precision to shift the output
visibly (mamba_ssm and HF Llama upcast for the same reason). Parameters:
``weight (D,)`` (ones at init) and, for LayerNorm with ``bias: true``, ``bias (D,)``
(zeros).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixstack.dsl.errors import SpecError, SpecIssue
from mixstack.dsl.spec import NormConfig
from mixstack.kernels.backends import BackendPolicy
from mixstack.kernels.gated_norm import gated_rms_norm


def _compute_dtype(x: Tensor) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 inputs, fp64 for fp64 (exact reference comparisons)."""
    return torch.promote_types(x.dtype, torch.float32)


class RMSNorm(nn.Module):
    """``y = x / sqrt(mean(x², -1) + eps) · weight`` (Zhang & Sennrich 2019): the
    ``gated_rms_norm`` kernel without a gate, over one group of the whole width, through
    the model's kernel policy ``backends`` (``auto`` until the model sets its own)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.backends = BackendPolicy.default()
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Ones; ``generator`` is accepted for a uniform init protocol and not used."""
        with torch.no_grad():
            self.weight.fill_(1.0)

    def forward(self, x: Tensor) -> Tensor:
        """``x (..., D) -> (..., D)`` in the dtype of ``x``."""
        return gated_rms_norm(
            x, None, self.weight, group_size=self.dim, eps=self.eps, backends=self.backends
        )

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


class LayerNorm(nn.Module):
    """``y = (x - mean) / sqrt(var + eps) · weight (+ bias)`` (Ba et al. 2016), biased variance."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = False) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim)) if bias else None
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Weight ones, bias zeros; ``generator`` is accepted for a uniform protocol."""
        with torch.no_grad():
            self.weight.fill_(1.0)
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        """``x (..., D) -> (..., D)`` in the dtype of ``x``."""
        compute = _compute_dtype(x)
        bias = self.bias.to(compute) if self.bias is not None else None
        y = F.layer_norm(x.to(compute), (self.dim,), self.weight.to(compute), bias, self.eps)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, bias={self.bias is not None}"


def build_norm(cfg: NormConfig, dim: int) -> RMSNorm | LayerNorm:
    """The norm a spec's ``norm`` section asks for, over the last axis of width ``dim``."""
    if cfg.type == "rmsnorm":
        if cfg.bias:
            raise SpecError(
                SpecIssue(
                    "a bias is only learned by layernorm",
                    path=("model", "norm", "bias"),
                    value=True,
                    has_value=True,
                    allowed="bias: false with type: rmsnorm, or type: layernorm",
                )
            )
        return RMSNorm(dim, eps=cfg.eps)
    return LayerNorm(dim, eps=cfg.eps, bias=cfg.bias)
