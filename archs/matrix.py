"""The matrix view, public: the explicit L×L mixing matrix of one layer on one input.

Every sequence mixer with a matrix view (attention, Mamba-1/2, S4D, Hydra, Hyena, long
convolutions, Orchid) writes its output as ``finish(Σ_t M_t @ v_t)``: a few
``(B, H, L, L)`` matrices applied to value streams (docs/math.md). ``materialize``
returns those matrices for a mixer and an input, or for layer ``i`` of a model fed its
real input (the embedding through layers ``0..i-1`` and the layer's own norm).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from mixstack.dsl.errors import CapabilityError
from mixstack.mixers.base import Mixer, apply_materialized
from mixstack.mixers.base import materialize as _materialize_terms

if TYPE_CHECKING:
    from mixstack.archs.models import MixStackModel


@dataclass
class MixingMatrices:
    """``matrices[t] (B, H, L, L)`` (row i: how output i mixes inputs j) with their value
    streams ``values[t] (B, H, L, P)``; ``apply()`` equals the layer's output."""

    layer_type: str
    matrices: list[Tensor]
    values: list[Tensor]
    finish: Callable[[Tensor], Tensor]

    def apply(self) -> Tensor:
        """``finish(Σ M_t @ v_t)``: the layer's output ``(B, L, D)``, recomputed."""
        return apply_materialized(list(zip(self.matrices, self.values, strict=True)), self.finish)

    def total(self) -> Tensor:
        """``Σ_t M_t (B, H, L, L)``: one matrix per head when the terms share values
        (as for every built-in mixer with a single term)."""
        return sum(self.matrices[1:], self.matrices[0])


class _Captured(Exception):
    """Stops the model's forward once the layer's input is captured."""


def _layer_input(
    model: MixStackModel, layer: int, input_ids: Tensor, seq_idx: Tensor | None
) -> tuple[Tensor, dict[str, Any]]:
    """The normed input ``(B, L, D)`` and keyword arguments layer ``layer``'s mixer gets."""
    captured: dict[str, Any] = {}

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured["x"], captured["kwargs"] = args[0], kwargs
        raise _Captured

    handle = model.layers[layer].mixer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(input_ids, seq_idx=seq_idx)
    except _Captured:
        pass
    finally:
        handle.remove()
    kwargs = {k: v for k, v in captured["kwargs"].items() if k in ("input_ids", "seq_idx")}
    return captured["x"], kwargs


def materialize(
    target: nn.Module,
    inputs: Tensor,
    *,
    layer: int | None = None,
    input_ids: Tensor | None = None,
    seq_idx: Tensor | None = None,
) -> MixingMatrices:
    """The mixing matrices of one call.

    ``materialize(mixer, x (B, L, D), input_ids=…, seq_idx=…)``: of a built mixer.
    ``materialize(model, input_ids (B, L), layer=i, seq_idx=…)``: of the model's layer
    ``i`` fed its real input (the residual stream after layers ``0..i-1``, through the
    layer's norm). Run in float64 for exact comparisons with the layer's output.
    Raises :class:`CapabilityError` for a layer without a matrix view (MLPs, composites)
    and ``IndexError``-free, located errors for a bad ``layer``.
    """
    from mixstack.archs.models import MixStackModel

    if isinstance(target, MixStackModel):
        n = len(target.layers)
        if layer is None or isinstance(layer, bool) or not 0 <= layer < n:
            raise CapabilityError(
                f"materialize(model, input_ids, layer=…) needs a layer index in 0..{n - 1}, "
                f"got {layer!r}"
            )
        mixer = target.layers[layer].mixer
        if not (isinstance(mixer, Mixer) and mixer.has_matrix_view):
            raise _no_view(mixer, f"layer {layer}")
        with torch.no_grad():
            x, kwargs = _layer_input(target, layer, inputs, seq_idx)
        return _of_mixer(mixer, x, **kwargs)
    if layer is not None:
        raise CapabilityError("layer= applies to a model; a mixer is materialized as it is")
    if not (isinstance(target, Mixer) and target.has_matrix_view):
        raise _no_view(target, "this module")
    return _of_mixer(target, inputs, input_ids=input_ids, seq_idx=seq_idx)


def _of_mixer(
    mixer: Mixer, x: Tensor, *, input_ids: Tensor | None = None, seq_idx: Tensor | None = None
) -> MixingMatrices:
    terms, finish = _materialize_terms(mixer, x, input_ids=input_ids, seq_idx=seq_idx)
    return MixingMatrices(
        layer_type=mixer.cfg.type,
        matrices=[m for m, _ in terms],
        values=[v for _, v in terms],
        finish=finish,
    )


def _no_view(module: nn.Module, where: str) -> CapabilityError:
    cfg = getattr(module, "cfg", None)
    kind = getattr(cfg, "type", type(module).__name__)
    return CapabilityError(
        f"{where} ({kind}) has no matrix view: only sequence mixers written as "
        "finish(Σ M @ v) can be materialized (attention, mamba, mamba2, s4d, hydra, hyena, "
        "long_conv, orchid); MLPs mix channels, not positions"
    )


def draw_matrices(matrices: MixingMatrices, out: Any, *, batch: int = 0, title: str = "") -> int:
    """Heatmaps of ``total()[batch]`` per head into a PNG at ``out``; returns the number
    of heads drawn (at most 16, in a grid)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    total = matrices.total()[batch].detach().float().cpu()  # (H, L, L)
    heads = min(total.shape[0], 16)
    cols = min(heads, 4)
    rows = -(-heads // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for h in range(rows * cols):
        ax = axes[h // cols][h % cols]
        if h >= heads:
            ax.axis("off")
            continue
        image = ax.imshow(total[h].numpy(), cmap="RdBu_r", interpolation="nearest")
        limit = float(total[h].abs().max()) or 1.0
        image.set_clim(-limit, limit)
        ax.set_title(f"head {h}", fontsize=9)
        ax.set_xlabel("input position j", fontsize=8)
        ax.set_ylabel("output position i", fontsize=8)
    fig.suptitle(title or f"{matrices.layer_type}: mixing matrix M[i, j]", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return heads
