"""What a model costs: parameters, decode state and FLOPs, per layer and in total.

Works on a meta-device model (nothing is allocated: parameter counts come from
shapes, state sizes from ``init_state(..., device="meta")``), so ``mixstack info`` on
an 8B spec is instant.

Definitions:
  params           unique parameters (a tied embedding / LM head is counted once, under
                   the embedding); a layer's row includes its norm(s).
  state bytes      decode state for ONE sequence of ``seq_len`` tokens at ``dtype``
                   (``mixer.state_nbytes``); 0 for layers that cannot decode.
  state bounded    the layer's state has a fixed size however long the context
                   (``Mixer.bounded_state``: recurrences, MLPs, windowed attention), so
                   it may decode past ``max_seq_len``; ``Report.state_bounded`` is true
                   when every layer's is and no learned position table limits the model.
  FLOPs per token  forward FLOPs (2·MACs) per token averaged over a sequence of
                   ``seq_len`` (``mixer.flops_per_token``), plus the head: 2·D·V for the
                   LM head, 2·D·C / seq_len for the classifier (it runs once per
                   sequence). Norms, embeddings lookups and softmax are left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mixstack.dsl.base import LayerConfig
from mixstack.dsl.errors import MixstackError

if TYPE_CHECKING:
    from mixstack.archs.models import MixStackModel


@dataclass(frozen=True)
class LayerRow:
    """One pattern position."""

    index: int
    symbol: str
    type: str  # "attention", or "sequential[attention+mlp]" for composites
    settings: str  # key settings, "n_heads=32 n_kv_heads=8 ..."
    params: int
    state_bytes: int
    flops_per_token: float
    state_bounded: bool = False


@dataclass(frozen=True)
class TypeRow:
    """All positions of one layer type, aggregated."""

    type: str
    count: int
    params: int
    state_bytes: int
    flops_per_token: float


@dataclass(frozen=True)
class Report:
    """Per-layer rows plus the parts outside the layers and the totals."""

    seq_len: int
    dtype: torch.dtype
    rows: list[LayerRow]
    embedding_params: int
    head_params: int  # 0 when the head is tied to the embedding
    final_norm_params: int
    head_flops_per_token: float
    total_params: int
    state_bounded: bool = False
    total_state_bytes: int = field(init=False)
    total_flops_per_token: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "total_state_bytes", sum(r.state_bytes for r in self.rows))
        flops = sum(r.flops_per_token for r in self.rows) + self.head_flops_per_token
        object.__setattr__(self, "total_flops_per_token", flops)

    def rows_by_type(self) -> list[TypeRow]:
        """Rows aggregated per layer type, in order of first appearance."""
        groups: dict[str, list[LayerRow]] = {}
        for row in self.rows:
            groups.setdefault(row.type, []).append(row)
        return [
            TypeRow(
                type=name,
                count=len(rows),
                params=sum(r.params for r in rows),
                state_bytes=sum(r.state_bytes for r in rows),
                flops_per_token=sum(r.flops_per_token for r in rows),
            )
            for name, rows in groups.items()
        ]

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON types) for model cards and run metadata."""
        return {
            "seq_len": self.seq_len,
            "dtype": str(self.dtype).removeprefix("torch."),
            "total_params": self.total_params,
            "embedding_params": self.embedding_params,
            "head_params": self.head_params,
            "final_norm_params": self.final_norm_params,
            "total_state_bytes": self.total_state_bytes,
            "state_bounded": self.state_bounded,
            "total_flops_per_token": self.total_flops_per_token,
            "head_flops_per_token": self.head_flops_per_token,
            "layers": [vars(r) for r in self.rows],
            "by_type": [vars(r) for r in self.rows_by_type()],
        }


def _flatten(prefix: str, value: Any) -> list[str]:
    if isinstance(value, dict):
        return [item for k, v in value.items() for item in _flatten(f"{prefix}{k}.", v)]
    return [f"{prefix.rstrip('.')}={value}"]


def layer_settings(cfg: LayerConfig) -> str:
    """Fields set away from their defaults, ``k=v`` (composites: per child, ``;``-joined)."""
    if cfg.children():
        own = _flatten("", cfg.model_dump(exclude_defaults=True, exclude={"type", "layers"}))
        parts = [f"{c.type}({layer_settings(c)})" for c in cfg.children()]
        return "; ".join(parts + own)
    return " ".join(
        _flatten("", cfg.model_dump(mode="json", exclude_defaults=True, exclude={"type"}))
    )


def layer_label(cfg: LayerConfig) -> str:
    """``attention``; ``parallel[attention+mamba2]`` for composites."""
    if cfg.children():
        return f"{cfg.type}[{'+'.join(layer_label(c) for c in cfg.children())}]"
    return cfg.type


def _count(module: nn.Module, seen: set[int]) -> int:
    """Parameters of ``module`` not already counted (by Parameter identity)."""
    total = 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def build_report(model: MixStackModel, seq_len: int, dtype: torch.dtype) -> Report:
    """The :class:`Report` of ``model`` at ``seq_len`` tokens and decode-state ``dtype``."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise MixstackError(f"seq_len must be a positive int, got {seq_len!r}")
    spec = model.spec
    seen: set[int] = set()
    embedding_params = _count(model.embedding, seen)  # first: a tied head is counted here
    rows = []
    configs = spec.layer_configs()
    for i, (symbol, block) in enumerate(
        zip(spec.layers.symbols_in_order, model.layers, strict=True)
    ):
        decode = model.layer_capabilities[i].decode
        rows.append(
            LayerRow(
                index=i,
                symbol=symbol,
                type=layer_label(configs[i]),
                settings=layer_settings(configs[i]),
                params=_count(block, seen),
                state_bytes=int(block.state_nbytes(seq_len, dtype)) if decode else 0,
                flops_per_token=float(block.flops_per_token(seq_len)),
                state_bounded=decode and not model.layer_unbounded_reasons(i),
            )
        )
    final_norm = _count(model.norm_f, seen)
    head = model.lm_head if model.lm_head is not None else model.classifier
    head_params = _count(head, seen)
    if model.lm_head is not None:
        head_flops = 2.0 * spec.d_model * spec.total_vocab
    else:
        head_flops = 2.0 * spec.d_model * spec.classifier.n_classes / seq_len
    return Report(
        seq_len=seq_len,
        dtype=dtype,
        rows=rows,
        embedding_params=embedding_params,
        head_params=head_params,
        final_norm_params=final_norm,
        head_flops_per_token=head_flops,
        total_params=_count(model, set()),
        state_bounded=model.embedding.positions is None and all(r.state_bounded for r in rows),
    )
