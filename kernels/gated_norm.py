"""Group-wise gated RMSNorm (mamba_ssm ``RMSNormGated``; docs/math.md#mamba-2 step 6, #hydra).

With gate ``z`` and weight ``w``, over groups of ``group_size`` channels:

* ``norm_before_gate=False`` (Mamba-2 default): ``rms_g(y ⊙ silu(z)) · w``
* ``norm_before_gate=True`` (Hydra):            ``rms_g(y) · w ⊙ silu(z)``

where ``rms_g`` divides every group by ``sqrt(mean(group²) + eps)``. A group size
smaller than the width matters: Mamba-2 with G groups normalises each group of
d_ssm/G channels on its own (1024 channels in the 8B hybrid), so a tensor-parallel
split by groups gives the same numbers. Without ``z`` it is a plain (grouped) RMSNorm.

Computed in fp32 (fp64 for fp64 inputs) and cast back to the input dtype, like the
other norms (blocks/norms.py). Backends: ``reference`` (the plain expression, whose
backward autograd derives), ``torch`` (one autograd node with a written-out backward)
and ``native`` (the same node in compiled C, ``csrc/norm.c``). Under ``torch.compile``
every backend computes the plain expression, which inductor fuses on its own.
"""

from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from mixstack.kernels import native
from mixstack.kernels.backends import BackendPolicy, dispatch, register_backend

KERNEL = "gated_rms_norm"


def _check_args(y: Tensor, z: Tensor | None, weight: Tensor, group_size: int) -> None:
    width = y.shape[-1]
    if group_size < 1 or width % group_size != 0:
        raise ValueError(f"gated_rms_norm: group_size {group_size} does not divide width {width}")
    if weight.shape != (width,) or (z is not None and z.shape != y.shape):
        raise ValueError(
            f"gated_rms_norm: y {tuple(y.shape)} needs weight ({width},) and z of y's shape; "
            f"got weight {tuple(weight.shape)}, z {None if z is None else tuple(z.shape)}"
        )


@register_backend(KERNEL, "reference")
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
    _check_args(y, z, weight, group_size)
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


@register_backend(KERNEL, "torch")
def gated_rms_norm_torch(
    y: Tensor,
    z: Tensor | None,
    weight: Tensor,
    *,
    group_size: int,
    eps: float = 1e-5,
    norm_before_gate: bool = False,
) -> Tensor:
    """One autograd node (:class:`_GatedRMSNorm`); contract of :func:`gated_rms_norm_plain`."""
    return _through_node(_GatedRMSNorm, y, z, weight, group_size, eps, norm_before_gate)


def _through_node(
    node: type[torch.autograd.Function],
    y: Tensor,
    z: Tensor | None,
    weight: Tensor,
    group_size: int,
    eps: float,
    norm_before_gate: bool,
) -> Tensor:
    """The norm as ``node``, or under ``torch.compile`` as the plain expression (which
    inductor fuses on its own)."""
    _check_args(y, z, weight, group_size)
    if torch.compiler.is_compiling():
        return gated_rms_norm_plain(
            y, z, weight, group_size=group_size, eps=eps, norm_before_gate=norm_before_gate
        )
    return node.apply(y, z, weight, group_size, eps, norm_before_gate)


# -- native: csrc/norm.c ------------------------------------------------------------------

ROWS_PER_UNIT = 32  # rows per work unit; each unit sums its own share of dw


@functools.cache
def _norm_library() -> ctypes.CDLL:
    """csrc/norm.c, with its entry points' argument types declared."""
    lib = native.load("norm")
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    return native.declare(
        lib,
        {
            "gated_norm_forward": [i64, i64, *[ptr] * 5, *[i64] * 4, ctypes.c_float, i64],
            "gated_norm_backward": [i64, i64, *[ptr] * 8, *[i64] * 5],
        },
    )


class _NativeGatedNorm(torch.autograd.Function):
    """The node of :class:`_GatedRMSNorm` in compiled C; rows are all leading dims."""

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
        width = y.shape[-1]
        f = torch.float32
        y2 = y.reshape(-1, width).to(f).contiguous()
        z2 = None if z is None else z.reshape(-1, width).to(f).contiguous()
        w = weight.to(f).contiguous()
        rows = y2.shape[0]
        out = torch.empty_like(y2)
        rstd = y2.new_empty(rows, width // group_size)
        units = -(-rows // ROWS_PER_UNIT)
        native.run_units(
            _norm_library().gated_norm_forward,
            units,
            *map(native.pointer, (y2, z2, w, out, rstd)),
            ROWS_PER_UNIT, rows, width, group_size, eps, int(norm_before_gate),
        )  # fmt: skip
        ctx.save_for_backward(y2, z2, w, rstd)
        ctx.group_size, ctx.norm_before_gate = group_size, norm_before_gate
        ctx.dtypes = (y.dtype, None if z is None else z.dtype, weight.dtype)
        return out.view(y.shape).to(y.dtype)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: Tensor
    ) -> tuple[Tensor | None, Tensor | None, Tensor, None, None, None]:
        y2, z2, w, rstd = ctx.saved_tensors
        rows, width = y2.shape
        g = grad.reshape(rows, width).to(torch.float32).contiguous()
        units = -(-rows // ROWS_PER_UNIT)
        dy, dz = torch.empty_like(y2), None if z2 is None else torch.empty_like(z2)
        dw_part = y2.new_empty(units, width)
        native.run_units(
            _norm_library().gated_norm_backward,
            units,
            *map(native.pointer, (y2, z2, w, rstd, g, dy, dz, dw_part)),
            ROWS_PER_UNIT, rows, width, ctx.group_size, int(ctx.norm_before_gate),
        )  # fmt: skip
        y_dtype, z_dtype, w_dtype = ctx.dtypes
        d_z = None if dz is None else dz.view(grad.shape).to(z_dtype)
        return dy.view(grad.shape).to(y_dtype), d_z, dw_part.sum(0).to(w_dtype), None, None, None


@native.register(KERNEL, "norm")
def gated_rms_norm_native(
    y: Tensor,
    z: Tensor | None,
    weight: Tensor,
    *,
    group_size: int,
    eps: float = 1e-5,
    norm_before_gate: bool = False,
) -> Tensor:
    """:class:`_NativeGatedNorm`; contract of :func:`gated_rms_norm_plain`."""
    return _through_node(_NativeGatedNorm, y, z, weight, group_size, eps, norm_before_gate)


def gated_rms_norm(
    y: Tensor,
    z: Tensor | None,
    weight: Tensor,
    *,
    group_size: int,
    eps: float = 1e-5,
    norm_before_gate: bool = False,
    backends: BackendPolicy | None = None,
) -> Tensor:
    """``y (..., D)``, ``z (..., D) | None``, ``weight (D,)`` -> ``(..., D)`` in ``y.dtype``,
    through the backend ``backends`` picks (``None``: ``auto``); ``group_size`` must
    divide D."""
    return dispatch(KERNEL, locals())
