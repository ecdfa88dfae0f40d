"""What a layer knows about the model around it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Arch = Literal["causal_lm", "encoder", "classifier"]


@dataclass(frozen=True)
class LayerContext:
    """Model-level values a layer config may check against and a module is built with.

    ``layer_idx`` counts symbols of the realized pattern (0-based); ``n_layers`` is the
    number of symbols. Sub-layers of a composite share their symbol's index.
    """

    d_model: int
    layer_idx: int = 0
    n_layers: int = 1
    max_seq_len: int = 2048
    arch: Arch = "causal_lm"
    vocab_size: int = 256
    init_std: float = 0.02

    @property
    def causal_arch(self) -> bool:
        return self.arch == "causal_lm"
