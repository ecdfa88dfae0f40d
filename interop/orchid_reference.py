"""Checkpoints of the Orchid reference code (``Karami-m/orchid``, ``OrchidOperator``) as
weights of mixstack's :class:`~mixstack.mixers.orchid.Orchid` (docs/zoo.md#orchid-checkpoints).

The reference computes every transform with ``rfft(x, n)/n`` and inverts with
``irfft(X, n, norm="forward")`` (no 1/n). Written out for one sequence of n tokens
(its ``causal=False`` conditioning, the only one that maps; FFT size n everywhere):

* static filters (``fixed_conv`` inside the gated convolution, ``fixed_conv_res`` on the
  raw input): ``n·F⁻¹(F(u)/n · F(k)/n) = (k ⊛ u)/n`` — the true circular convolution
  divided by n, so our filter is the reference's divided by n. The filter is
  ``MLP(z)·decay`` and the MLP's last Linear has no bias, so the mapping is
  ``implicit_filter.{last}.weight / n``;
* the adaptive spectrum ``ĥ`` is added to ``F(k)/n`` and multiplies ``F(u)/n`` before the
  unscaled inverse: it acts as a kernel whose standard spectrum is ``ĥ`` itself — no
  change;
* the conditioning network's frequency input is ``|rfft(a)/n|² = |F(a)|²/n²``: the
  frequency conv (``nn_model2``, linear before its bias and LayerNorm) reads our input
  times 1/n², so ``freq_conv.weight = nn_model2 weight / n²`` (the bias is unchanged).

n is the length the checkpoint is used at: the mapping is exact at that one length
(``length``), and at any other length the two models differ. The reference's Sin
activation is ``sin(w_mod·freq·x)``: ``freq`` is multiplied by ``w_mod``.

Exact agreement (outputs equal to rounding) also needs every convolution to agree:
mixstack's ``circular`` mode wraps the causal short conv and the conditioning's time
conv around the sequence, and zero-pads the frequency conv; the reference zero-pads
the short conv and uses ``padding_mode`` for both conditioning convs. With
``short_filter_order = 1`` and ``conv_filter_size = 1`` there is nothing to pad and the
two are equal; with wider filters they differ near the sequence's (and the spectrum's)
ends, and :func:`convert_state_dict` logs that.

Not mappable (refused, every field named): ``causal=True`` conditioning (its 2n
spectrum is used as a time kernel with FFT size n: circular and future-dependent, MATH
§7), Type II ``corrTime`` (its frequency conv groups neighbouring channels' real parts:
not the per-channel pairing of mixstack), DCT transforms, ``n_layer > 1`` conditioning
networks, ``order != 2``, several heads, normalised or bidirectional static filters.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from mixstack.blocks.implicit_filter import ImplicitFilterConfig, ModulationConfig
from mixstack.dsl.errors import CheckpointError
from mixstack.mixers.orchid import OrchidConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReferenceConfig:
    """The reference's constructor arguments that shape or scale the weights
    (``OrchidOperator(d_model, l_max, filter_order, ...)``, its ``conv_kernel`` dict and
    the ``**filter_args`` it passes to ``ConvKernel_Static`` / ``ConvKernel_Time_Frequency``);
    defaults are the reference's."""

    d_model: int
    l_max: int = 128
    filter_order: int = 64
    short_filter_order: int = 3
    order: int = 2
    num_heads: int = 1
    residual_long_conv: str = "sconv"
    # conv_kernel (the conditioning network)
    conv_type: str = "absfreq"
    conv_nn: str = "convtf"
    conv_filter_size: int = 3
    conv_norm: str = "layernorm"
    conv_n_layer: int = 1
    conv_bias: bool = True
    padding_mode: str = "zeros"
    # filter_args
    emb_dim: int = 3
    num_inner_mlps: int = 2
    w: float = 1.0
    w_mod: float = 1.0
    causal: bool = True
    dxt: str = "fft"
    normalized: bool = False
    bidirectional: bool = False
    fast_decay_pct: float = 0.3
    slow_decay_pct: float = 1.5
    target: float = 1e-2
    shift: float = 0.0

    def unsupported(self) -> list[str]:
        """Every field the mapping cannot express, with why."""
        rules = [
            (not self.causal, "causal=True (circular, future-dependent kernel; use causal=False)"),
            (self.conv_type == "absfreq", f"conv_kernel.type={self.conv_type!r} (only absfreq)"),
            (self.conv_nn == "convtf", f"conv_kernel.nn={self.conv_nn!r} (only convtf)"),
            (self.conv_n_layer == 1, f"conv_kernel.n_layer={self.conv_n_layer} (only 1)"),
            (self.conv_bias, "conv_kernel.bias=False (mixstack's conditioning convs have biases)"),
            (self.conv_norm in ("layernorm", "none"), f"conv_kernel.norm={self.conv_norm!r}"),
            (self.dxt == "fft", f"dxt={self.dxt!r} (only fft)"),
            (self.order == 2, f"order={self.order} (only 2)"),
            (self.num_heads == 1, f"num_heads={self.num_heads} (only 1)"),
            (not self.normalized, "normalized=True (L1-normalised static filters)"),
            (not self.bidirectional, "bidirectional=True static filters"),
            (
                self.residual_long_conv in ("sconv", "none"),
                f"residual_long_conv={self.residual_long_conv!r}",
            ),
        ]
        return [message for ok, message in rules if not ok]

    @property
    def exact(self) -> bool:
        """Whether converted outputs equal the reference's at the conversion length."""
        return self.short_filter_order == 1 and self.conv_filter_size == 1


def orchid_config(ref: ReferenceConfig) -> OrchidConfig:
    """The mixstack layer config of a reference operator (mode ``circular``)."""
    problems = ref.unsupported()
    if problems:
        raise CheckpointError(
            "the Orchid reference configuration cannot be expressed: " + "; ".join(problems)
        )
    return OrchidConfig(
        mode="circular",
        conditioning="absfreq",
        conv_filter_size=ref.conv_filter_size,
        norm="layernorm" if ref.conv_norm == "layernorm" else "none",
        short_filter_order=ref.short_filter_order,
        residual_long_conv="sconv" if ref.residual_long_conv == "sconv" else "none",
        filter=ImplicitFilterConfig(
            width=ref.filter_order,
            emb_dim=ref.emb_dim,
            inner_layers=ref.num_inner_mlps,
            w=ref.w * ref.w_mod,
            modulation=ModulationConfig(
                fast_decay_pct=ref.fast_decay_pct,
                slow_decay_pct=ref.slow_decay_pct,
                target=ref.target,
                shift=ref.shift,
            ),
            bias=True,
        ),
    )


_CONDITIONING = {
    "conv_kernel_nn.nn_model.conv1d_ls.0.": "conditioning.time_conv.",
    "conv_kernel_nn.nn_model.norm_ls.0.norm_conv_kernel.": "conditioning.time_norm.",
    "conv_kernel_nn.nn_model2.conv1d_ls.0.": "conditioning.freq_conv.",
    "conv_kernel_nn.nn_model2.norm_ls.0.norm_conv_kernel.": "conditioning.freq_norm.",
}
_SAME = ("in_linear.", "out_linear.", "conv1d_short.", "fixed_conv.", "fixed_conv_res.")


def _target(key: str) -> str | None:
    for old, new in _CONDITIONING.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return key if key.startswith(_SAME) else None


def convert_state_dict(
    state: Mapping[str, Tensor], ref: ReferenceConfig, length: int, *, prefix: str = ""
) -> dict[str, Tensor]:
    """Our ``Orchid`` state dict from the reference operator's, exact at ``length`` tokens.

    ``state``: a reference state dict (safetensors-loaded; this never unpickles), the
    operator's keys under ``prefix`` (e.g. ``"bert.encoder.layer.0.mixer."``); other keys
    are ignored. Raises :class:`CheckpointError` naming every unsupported field, every
    missing key and every key that has no counterpart.
    """
    orchid_config(ref)  # refuses what cannot be expressed
    if not 1 <= length <= ref.l_max:
        raise CheckpointError(f"length must be in 1..l_max ({ref.l_max}), got {length}")
    own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if ref.residual_long_conv != "sconv":
        own = {k: v for k, v in own.items() if not k.startswith("fixed_conv_res.")}
    last = 2 * (ref.num_inner_mlps + 1)  # index of the MLP's final (bias-free) Linear
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in own.items():
        target = _target(key)
        if target is None:
            unknown.append(prefix + key)
            continue
        value = value.detach().clone()
        if target.startswith("fixed_conv") and target.endswith(f"implicit_filter.{last}.weight"):
            value = value / length  # the reference's static convolution carries 1/n
        elif target.startswith("fixed_conv") and target.endswith(".freq"):
            value = value * ref.w_mod  # sin(w_mod·freq·x)
        elif target == "conditioning.freq_conv.weight":
            value = value / length**2  # its input is |rfft(a)/n|² = |F(a)|²/n²
        out[target] = value
    expected = set(_expected_keys(ref))
    missing = sorted(expected - set(out))
    if unknown or missing:
        parts = []
        if missing:
            parts.append("missing: " + ", ".join(prefix + _source_key(k) for k in missing))
        if unknown:
            parts.append("no counterpart: " + ", ".join(sorted(unknown)))
        raise CheckpointError("Orchid reference state dict does not fit: " + "; ".join(parts))
    if not ref.exact:
        log.warning(
            "Orchid conversion is approximate: short_filter_order %d / conv_filter_size %d "
            "> 1 pad differently in the reference (zeros) and in mixstack's circular mode "
            "(docs/zoo.md#orchid-checkpoints)",
            ref.short_filter_order,
            ref.conv_filter_size,
        )
    return out


def _expected_keys(ref: ReferenceConfig) -> list[str]:
    """Our parameter and buffer names for ``ref`` (built on the meta device)."""
    from mixstack.dsl.context import LayerContext
    from mixstack.mixers.orchid import Orchid

    ctx = LayerContext(d_model=ref.d_model, max_seq_len=ref.l_max, arch="encoder")
    with torch.device("meta"):
        module = Orchid(orchid_config(ref), ctx)
    return list(module.state_dict())


def _source_key(target: str) -> str:
    for old, new in _CONDITIONING.items():
        if target.startswith(new):
            return old + target[len(new) :]
    return target
