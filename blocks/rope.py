"""Rotary position embedding, rotate-half layout (docs/math.md#attention).

GPT-NeoX / Llama convention (flash-attn ``interleaved=False``): for rotary dim ``r``
the vector's first ``r/2`` entries pair with the next ``r/2``; dims ``>= r`` pass
through (partial rotary). ``inv_freq_m = theta^(-2m/r)``, angle ``p * inv_freq_m``.
Angles, cos and sin are computed in fp32 (fp64 for fp64 inputs) and only then cast
to the input dtype: bf16 angles would be off by whole radians at long positions.

Positions are explicit integers per token, so packed documents restart at 0
(:func:`document_positions`) and decoding continues at the cache's offset.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Rope:
    """Rotate-half RoPE on the first ``dim`` channels of each head.

    Holds no tensors (nothing to initialise, nothing in the state dict, fine on the
    meta device): the frequencies are recomputed per call, ``dim/2`` numbers.
    """

    dim: int
    theta: float = 10000.0

    def __post_init__(self) -> None:
        if self.dim < 2 or self.dim % 2:
            raise ValueError(f"RoPE dim must be an even number >= 2, got {self.dim}")
        if not self.theta > 0:
            raise ValueError(f"RoPE theta must be > 0, got {self.theta}")

    def inv_freq(self, device: torch.device | str | None, dtype: torch.dtype) -> Tensor:
        """``theta^(-2m/r)`` for m = 0..r/2-1, shape (r/2,)."""
        exponents = torch.arange(0, self.dim, 2, device=device, dtype=dtype) / self.dim
        return 1.0 / (self.theta**exponents)

    def cos_sin(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and sin of the angles, each ``(*positions.shape, r/2)`` in ``dtype``."""
        compute = torch.promote_types(dtype, torch.float32)
        angles = positions.to(compute)[..., None] * self.inv_freq(positions.device, compute)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def __call__(self, x: Tensor, positions: Tensor) -> Tensor:
        """Rotate ``x (B, L, H, P)`` at integer ``positions`` (L,) or (B, L)."""
        if x.shape[-1] < self.dim:
            raise ValueError(f"RoPE dim {self.dim} exceeds the head dim {x.shape[-1]}")
        cos, sin = self.cos_sin(positions, x.dtype)  # (B|1, L, r/2) after the line below
        if cos.dim() == 2:
            cos, sin = cos[None], sin[None]
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # (B|1, L, 1, r/2): shared by heads
        if torch.compiler.is_compiling():  # inductor fuses the plain expression itself (and
            # cannot trace the out= products of the eager node)
            half = self.dim // 2
            x1, x2, rest = x[..., :half], x[..., half : self.dim], x[..., self.dim :]
            return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)
        return _RotateHalf.apply(x, cos, sin)


def _rotate_half(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``[x1·cos − x2·sin, x2·cos + x1·sin, rest]`` written into one output buffer.

    x (B, L, H, P); cos, sin (B|1, L, 1, r/2). Each half is produced in place in its
    slice of the output (no per-half temporaries, no concatenation).
    """
    half = cos.shape[-1]
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    o1, o2 = out[..., :half], out[..., half : 2 * half]
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-1.0)
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin)
    if x.shape[-1] > 2 * half:  # partial rotary: the remaining channels pass through
        out[..., 2 * half :] = x[..., 2 * half :]
    return out


class _RotateHalf(torch.autograd.Function):
    """RoPE as one autograd node. The rotation is orthogonal, so its backward is the
    rotation by the opposite angle: ``_rotate_half(grad, cos, −sin)``. Autograd through
    the sliced expression instead zero-filled and copied a full-size gradient for every
    slice, and ran twice as many half-width products (docs/performance.md)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, x: Tensor, cos: Tensor, sin: Tensor
    ) -> Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate_half(x, cos, sin)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: Tensor
    ) -> tuple[Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        return _rotate_half(grad, cos, -sin), None, None


def document_positions(
    seq_idx: Tensor,
    *,
    start_id: Tensor | None = None,
    start_pos: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Position of each token inside its document, for packed sequences.

    seq_idx (B, L): document ids, -1 = padding. A document is a run of equal ids,
    padding in between skipped (left padding then gives positions 0, 1, ... like HF's
    ``attention_mask.cumsum() - 1``). ``start_id`` / ``start_pos`` (B,) describe what
    came before this chunk (a KV cache): a first run with id ``start_id`` continues at
    ``start_pos``. Returns ``(positions (B, L) int64, last_id (B,), next_pos (B,))``,
    the latter two being the values to carry into the next chunk (unchanged for rows
    that hold only padding). Padding tokens get position 0.
    """
    B, L = seq_idx.shape
    device = seq_idx.device
    seq = seq_idx.long()
    t = torch.arange(L, device=device).expand(B, L)
    if start_id is None:
        start_id = torch.full((B,), -2, dtype=torch.long, device=device)  # matches no id
    if start_pos is None:
        start_pos = torch.zeros(B, dtype=torch.long, device=device)
    start_id, start_pos = start_id.long(), start_pos.long()
    valid = seq >= 0
    last_valid = torch.cummax(torch.where(valid, t, -1), dim=1).values  # (B, L): <= t
    prev_valid = torch.cat((t.new_full((B, 1), -1), last_valid[:, :-1]), dim=1)  # < t
    prev_id = torch.gather(seq, 1, prev_valid.clamp(min=0))
    prev_id = torch.where(prev_valid >= 0, prev_id, start_id[:, None])
    new_doc = valid & (seq != prev_id)
    doc_start = torch.cummax(torch.where(new_doc, t, -1), dim=1).values  # (B, L)
    count = torch.cumsum(valid.long(), dim=1)  # valid tokens in [0, t]
    since_start = count - torch.gather(count, 1, doc_start.clamp(min=0))
    continued = start_pos[:, None] + count - 1  # the run that continues the cache
    positions = torch.where(doc_start >= 0, since_start, continued)
    positions = torch.where(valid, positions, torch.zeros_like(positions))
    has_valid = last_valid[:, -1] >= 0  # (B,)
    last = last_valid[:, -1].clamp(min=0)[:, None]
    last_id = torch.where(has_valid, torch.gather(seq, 1, last)[:, 0], start_id)
    next_pos = torch.where(has_valid, torch.gather(positions, 1, last)[:, 0] + 1, start_pos)
    return positions, last_id, next_pos
