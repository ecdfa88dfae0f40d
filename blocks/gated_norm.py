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

    ``group_size`` must divide D. One autograd node (:class:`_GatedRMSNorm`) with a
    written-out backward; under ``torch.compile`` the plain expression
    (:func:`gated_rms_norm_plain`), which inductor fuses on its own.
    """
    width = y.shape[-1]
    if width % group_size != 0:
        raise ValueError(f"gated_rms_norm: group_size {group_size} does not divide width {width}")
    if torch.compiler.is_compiling():
        return gated_rms_norm_plain(
            y, z, weight, group_size=group_size, eps=eps, norm_before_gate=norm_before_gate
        )
    return _GatedRMSNorm.apply(y, z, weight, group_size, eps, norm_before_gate)


def gated_rms_norm_plain(
    y: Tensor,
    z: Tensor | None,
    weight: Tensor,
    *,
    group_size: int,
    eps: float = 1e-5,
    norm_before_gate: bool = False,
) -> Tensor:
    """The same as :func:`gated_rms_norm`, written as plain tensor ops (autograd derives
    its backward); the reference of the tests and the form ``torch.compile`` traces."""
    width = y.shape[-1]
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


class _GatedRMSNorm(torch.autograd.Function):
    """:func:`gated_rms_norm` as one node. With ``h`` the normalised input (``y ⊙ silu(z)``
    or ``y``), ``n = h · rstd`` per group and ``out = n ⊙ w`` (``⊙ silu(z)`` after the norm
    when ``norm_before_gate``), the backward is, per group of size S:
    ``dn = dout ⊙ w (⊙ gate)``, ``dh = rstd · (dn − n · mean_S(dn ⊙ n))``,
    ``dw = Σ_rows dout ⊙ n (⊙ gate)``, ``dy = dh ⊙ gate`` (or ``dh``) and
    ``dz = silu'(z) ⊙ (dh ⊙ y)`` (or ``silu'(z) ⊙ dout ⊙ n ⊙ w``), written in place
    where it can: autograd through the plain expression allocates a fresh (..., D)
    tensor for each of its ~12 passes."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        y: Tensor,
        z: Tensor | None,
        weight: Tensor,
        group_size: int,
        eps: float,
        norm_before_gate: bool,
    ) -> Tensor:
        f = torch.float64 if y.dtype == torch.float64 else torch.float32
        width = y.shape[-1]
        yf = y.to(f)
        zf = z.to(f) if z is not None else None
        gate = F.silu(zf) if zf is not None else None
        h = yf * gate if gate is not None and not norm_before_gate else yf
        grouped = h.unflatten(-1, (width // group_size, group_size))  # (..., G, S)
        rstd = grouped.square().mean(dim=-1, keepdim=True).add_(eps).rsqrt_()  # (..., G, 1)
        n = (grouped * rstd).flatten(-2)  # (..., D)
        out = n * weight.to(f)
        if gate is not None and norm_before_gate:
            out.mul_(gate)
        ctx.save_for_backward(yf, zf, gate, n, rstd, weight)
        ctx.group_size, ctx.norm_before_gate = group_size, norm_before_gate
        ctx.dtypes = (y.dtype, None if z is None else z.dtype)
        return out.to(y.dtype)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: Tensor
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None, None]:
        yf, zf, gate, n, rstd, weight = ctx.saved_tensors
        f = n.dtype
        wf = weight.to(f)
        g = grad.to(f)
        after = gate is not None and ctx.norm_before_gate  # gate applied after the norm
        g_out = g * gate if after else g  # gradient reaching n ⊙ w
        d_weight = None
        if ctx.needs_input_grad[2]:
            lead = tuple(range(n.dim() - 1))
            d_weight = (g_out * n).sum(dim=lead).to(weight.dtype)
        d_gate = (g * n).mul_(wf) if after and ctx.needs_input_grad[1] else None
        dn = g_out * wf if g_out is g else g_out.mul_(wf)  # (..., D)
        S = ctx.group_size
        dng = dn.unflatten(-1, (-1, S))  # (..., G, S)
        ng = n.unflatten(-1, (-1, S))
        proj = (dng * ng).mean(dim=-1, keepdim=True)  # (..., G, 1)
        dh = dng.sub_(ng * proj).mul_(rstd).flatten(-2)  # (..., D), in dn's buffer
        d_y = d_z = None
        if gate is not None and not ctx.norm_before_gate:
            if ctx.needs_input_grad[1]:
                d_gate = dh * yf
            if ctx.needs_input_grad[0]:
                d_y = dh.mul_(gate)
        elif ctx.needs_input_grad[0]:
            d_y = dh
        if d_gate is not None:
            d_z = torch.ops.aten.silu_backward(d_gate, zf).to(ctx.dtypes[1])
        if d_y is not None:
            d_y = d_y.to(ctx.dtypes[0])
        return d_y, d_z, d_weight, None, None, None


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
