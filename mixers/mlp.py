"""Position-wise MLP (channel mixer), plain or gated (GLU family).

Plain: ``out = down(act(up(x)))`` with act in gelu (erf), gelu_tanh, relu,
squared_relu (Primer, So et al. 2021), silu. Gated (Shazeer 2020, "GLU Variants
Improve Transformer"): ``out = down(act(gate(x)) * up(x))``; swiglu uses silu, geglu
the erf GELU. Names follow HF Llama (``gate_proj``/``up_proj``/``down_proj``).

Default hidden width: 4·d_model (plain); for gated MLPs ``8·d_model/3`` rounded up to
``multiple_of`` (mamba_ssm ``GatedMLP`` / Llama), which keeps the parameter count of
a 4·d_model plain MLP. Capabilities: causal and decode trivially (each token alone);
the decode state is empty.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from mixstack.dsl.base import Capabilities, LayerConfig, LayerExample
from mixstack.dsl.context import LayerContext
from mixstack.dsl.registry import register
from mixstack.mixers.base import Mixer, ParamHint, State

Activation = Literal["gelu", "gelu_tanh", "relu", "squared_relu", "silu", "swiglu", "geglu"]
GATED: dict[str, str] = {"swiglu": "silu", "geglu": "gelu"}  # gated name -> gate activation


def _squared_relu(x: Tensor) -> Tensor:
    return torch.square(F.relu(x))


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": _gelu_tanh,
    "relu": F.relu,
    "squared_relu": _squared_relu,
    "silu": F.silu,
}


class MlpConfig(LayerConfig):
    """Two- or three-matrix feed-forward layer applied to each position independently."""

    kind = "channel"
    type: Literal["mlp"] = "mlp"
    hidden: int | None = Field(
        None,
        ge=1,
        description="hidden width; None -> 4·d_model (plain) or round_up(8·d_model/3, "
        "multiple_of) (gated)",
    )
    activation: Activation = Field(
        "swiglu",
        description="gelu | gelu_tanh | relu | squared_relu | silu (plain); "
        "swiglu | geglu (gated: act(gate(x)) * up(x))",
    )
    bias: bool = Field(False, description="biases on every projection")
    multiple_of: int = Field(
        128, ge=1, description="round the default hidden width up to this (unused if hidden set)"
    )

    @property
    def gated(self) -> bool:
        return self.activation in GATED

    def capabilities(self, ctx: LayerContext) -> Capabilities:
        return Capabilities(causal=True, decode=True)

    def resolve(self, ctx: LayerContext) -> MlpConfig:
        if self.hidden is not None:
            return self
        if self.gated:
            raw = int(8 * ctx.d_model / 3)
            hidden = -(-raw // self.multiple_of) * self.multiple_of
        else:
            hidden = 4 * ctx.d_model
        return self.model_copy(update={"hidden": hidden})

    @classmethod
    def examples(cls) -> list[LayerExample]:
        return [
            LayerExample(cls(), name="swiglu-default"),
            LayerExample(cls(activation="geglu", hidden=40, bias=True), name="geglu-bias"),
            LayerExample(cls(activation="gelu"), name="gelu"),
            LayerExample(cls(activation="gelu_tanh", hidden=24), name="gelu-tanh"),
            LayerExample(cls(activation="relu", hidden=24), name="relu"),
            LayerExample(cls(activation="squared_relu", hidden=24), name="squared-relu"),
            LayerExample(cls(activation="silu", hidden=24, bias=True), name="silu-bias"),
        ]


@register(MlpConfig)
class Mlp(Mixer):
    """Feed-forward channel mixer; see the module docstring."""

    cfg: MlpConfig

    def __init__(self, cfg: MlpConfig, ctx: LayerContext):
        super().__init__(cfg, ctx)
        cfg = self.cfg  # resolved and checked by Mixer.__init__
        assert cfg.hidden is not None  # set by resolve
        D, hidden = ctx.d_model, cfg.hidden
        self.gate_proj = nn.Linear(D, hidden, bias=cfg.bias) if cfg.gated else None
        self.up_proj = nn.Linear(D, hidden, bias=cfg.bias)
        self.down_proj = nn.Linear(hidden, D, bias=cfg.bias)
        self.act = ACTIVATIONS[GATED.get(cfg.activation, cfg.activation)]

    def _mlp(self, x: Tensor) -> Tensor:
        """(..., D) -> (..., D)."""
        if self.gate_proj is None:
            return self.down_proj(self.act(self.up_proj(x)))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))

    def forward_sequence(
        self, x: Tensor, *, input_ids: Tensor | None, seq_idx: Tensor | None
    ) -> Tensor:
        """x (B, L, D) -> (B, L, D); positions never interact, so packing and padding
        need nothing (the arguments are accepted for the common protocol)."""
        return self._mlp(x)

    def prefill(
        self, x: Tensor, state: State, *, input_ids: Tensor | None, seq_idx: Tensor | None
    ) -> Tensor:
        """The same as without state: the (empty) state holds nothing to continue."""
        return self._mlp(x)

    def init_state(
        self, batch: int, max_len: int, *, device: torch.device | str | None, dtype: torch.dtype
    ) -> State:
        return State()

    def step(self, x_t: Tensor, state: State, *, token_t: Tensor | None = None) -> Tensor:
        """x_t (B, D) -> (B, D)."""
        return self._mlp(x_t)

    @property
    def bounded_state(self) -> bool:
        """The state is empty: each token alone."""
        return True

    def param_hints(self) -> dict[str, ParamHint]:
        return {"down_proj.weight": ParamHint(residual_out=True)}
