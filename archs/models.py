"""Whole models: causal LM, bidirectional encoder (MLM) and sequence classifier.

One class serves the three archs (they differ only in the head and in what the layers
were configured to see); the builder (``archs/builder.py``) constructs the layers and
hands them over already built::

    input_ids (B, L)
      └─ embedding ─> layers[0] ─> ... ─> layers[n-1] ─> norm_f ─┬─ lm_head ─> (B, L, V)
                                                                 │    causal_lm, encoder
                                                                 └─ pool ─> classifier ─> (B, C)

Fixed state-dict keys: ``embedding.weight``, ``layers.{i}.norm.weight``,
``layers.{i}.mixer.*`` (``layers.{i}.blocks.{j}.*`` for sequential composites),
``norm_f.weight``, ``lm_head.weight`` (the same Parameter as ``embedding.weight`` when
tied) or ``classifier.weight`` / ``classifier.bias``.

Logits cover ``total_vocab`` ids (ordinary + special tokens): the padding rows of the
embedding (``padded_vocab - total_vocab``) are never read or predicted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixstack.blocks.embedding import TokenEmbedding
from mixstack.blocks.norms import build_norm
from mixstack.blocks.residual import ResidualBlock
from mixstack.dsl.base import Capabilities
from mixstack.dsl.errors import CapabilityError, MixstackError
from mixstack.dsl.spec import ModelSpec, RunSpec
from mixstack.kernels.backends import BackendPolicy
from mixstack.mixers.base import Mixer, ParamHint, State, init_linear


def _select(value: Any, index: Tensor) -> Any:
    """Batch-reorder a decode state that may be a State, a tensor or a list of them."""
    if isinstance(value, State):
        return value.index_select(index)
    if isinstance(value, Tensor) and value.dim() > 0:
        return value.index_select(0, index)
    if isinstance(value, list):
        return [_select(v, index) for v in value]
    return value


def _tensors(value: Any) -> list[Tensor]:
    if isinstance(value, State):
        return value.tensors()
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, list):
        return [t for v in value for t in _tensors(v)]
    return []


@dataclass
class ModelState(State):
    """Decode state of a whole model.

    layers: one entry per pattern position: the mixer's State, or for composites a
        list of child states.
    batch, max_len: the sizes the caches were allocated for.
    offset: tokens consumed so far (the absolute position of the next token).
    """

    layers: list[Any]
    batch: int
    max_len: int
    offset: int = 0

    def index_select(self, index: Tensor) -> ModelState:
        """Reorder the batch (beam search); ``index (B',)`` may repeat rows."""
        return dataclasses.replace(
            self, layers=[_select(s, index) for s in self.layers], batch=int(index.numel())
        )

    def tensors(self) -> list[Tensor]:
        return _tensors(self.layers)


def _err(message: str) -> MixstackError:
    return MixstackError(message)


class MixStackModel(nn.Module):
    """A model compiled from a spec (see the module docstring for the wiring).

    Construct through :func:`mixstack.build`; ``layers`` are the built blocks, one per
    pattern position (a :class:`ResidualBlock`, or a composite block).

    Attributes:
        spec: the validated architecture (``ModelSpec``) this model was built from.
        run: the run section used at build (backend request, compile, precision).
        backends: the :class:`BackendPolicy` shared by every mixer.
        seed: the seed the weights were drawn with (drawn at random when not given).
    """

    def __init__(self, spec: ModelSpec, layers: list[nn.Module], run: RunSpec | None = None):
        super().__init__()
        self.spec = spec
        self.run = run or RunSpec()
        self.seed: int | None = None
        d = spec.d_model
        self.embedding = TokenEmbedding(
            spec.padded_vocab, d, spec.embedding, spec.max_seq_len, spec.init.std
        )
        self.layers = nn.ModuleList(layers)
        self.norm_f = build_norm(spec.norm, d)
        self.lm_head: nn.Linear | None = None
        self.classifier: nn.Linear | None = None
        if spec.arch == "classifier":
            if spec.classifier is None:
                raise _err("arch 'classifier' needs a `model.classifier` section (n_classes)")
            self.classifier = nn.Linear(d, spec.classifier.n_classes)
        else:
            self.lm_head = nn.Linear(d, spec.padded_vocab, bias=False)
        self.tie_weights()
        configs = spec.layer_configs()
        self.layer_capabilities: list[Capabilities] = [
            cfg.capabilities(spec.context(i)) for i, cfg in enumerate(configs)
        ]
        self.backends: BackendPolicy
        self.set_backend(self.run.backend)

    # -- weights ---------------------------------------------------------------------------
    @property
    def tied(self) -> bool:
        return self.lm_head is not None and self.spec.tie_embeddings

    def tie_weights(self) -> None:
        """Make ``lm_head.weight`` the very Parameter ``embedding.weight`` when tied."""
        if self.tied:
            self.lm_head.weight = self.embedding.weight

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> MixStackModel:
        # Module._apply replaces Parameters whose storage type changes (meta -> to_empty,
        # some device moves), which would silently untie the head; re-tie afterwards.
        super()._apply(fn, recurse)
        self.tie_weights()
        return self

    def init_parts(self) -> Iterator[tuple[nn.Module, Callable[[torch.Generator], None]]]:
        """Every sub-module with its init, in a fixed order (the builder draws in it).

        The tied head is left out: it is the embedding's Parameter.
        """
        std = self.spec.init.std
        yield self.embedding, self.embedding.reset_parameters
        for block in self.layers:
            yield block, block.reset_parameters
        yield self.norm_f, self.norm_f.reset_parameters
        for head in (self.lm_head, self.classifier):
            if head is not None and not (head is self.lm_head and self.tied):
                yield head, lambda g, head=head: init_linear(head, std, g)

    def param_hints(self) -> dict[str, ParamHint]:
        """Hints of every mixer parameter, by full parameter name."""
        hints: dict[str, ParamHint] = {}
        for prefix, module in self.named_modules():
            if isinstance(module, Mixer):
                for name, hint in module.param_hints().items():
                    hints[f"{prefix}.{name}"] = hint
        return hints

    def n_residual_branches(self) -> int:
        """Residual sub-layers (a sequential composite counts each of its sub-blocks)."""
        return sum(isinstance(m, ResidualBlock) for m in self.modules())

    def set_backend(self, request: str | dict[str, str]) -> None:
        """Replace the kernel-backend policy of every mixer and norm (every module that
        holds one) by one new shared policy."""
        self.backends = BackendPolicy(request)
        for module in self.modules():
            if isinstance(module, Mixer) or isinstance(
                getattr(module, "backends", None), BackendPolicy
            ):
                module.backends = self.backends

    # -- checks on input -------------------------------------------------------------------
    def _check_ids(self, ids: Any, rank: int, what: str) -> None:
        shape = "(B, L)" if rank == 2 else "(B,)"
        if not isinstance(ids, Tensor):
            raise _err(
                f"{what} must be a torch.Tensor of token ids {shape}, got {type(ids).__name__}"
            )
        if ids.dtype not in (torch.int64, torch.int32):
            # The embedding lookup takes int64 / int32 only; uint8, int16, bool or floats
            # would fail deep inside torch (or index wrongly).
            raise _err(
                f"{what} must hold integer token ids, got dtype {ids.dtype}; allowed: "
                "torch.int64 or torch.int32 (convert with .long())"
            )
        if ids.dim() != rank:
            raise _err(f"{what} must have shape {shape}, got {tuple(ids.shape)}")
        if ids.numel() == 0:
            raise _err(f"{what} is empty (shape {tuple(ids.shape)})")
        device = self.embedding.weight.device
        if ids.device != device:
            raise _err(f"{what} is on {ids.device} but the model is on {device}")
        if device.type == "meta":
            return
        low, high = (int(v) for v in torch.stack(torch.aminmax(ids)).tolist())  # one sync
        vocab = self.spec.total_vocab
        if low < 0 or high >= vocab:
            bad = low if low < 0 else high
            raise _err(
                f"{what} holds id {bad}; allowed ids are 0..{vocab - 1} "
                f"(vocab_size {self.spec.vocab_size} + {len(self.spec.special_tokens)} special)"
            )

    def _check_forward(self, ids: Tensor, seq_idx: Tensor | None, state: Any) -> None:
        self._check_ids(ids, 2, "input_ids")
        length = ids.shape[1]
        if length > self.spec.max_seq_len:
            raise _err(
                f"input_ids has length {length}, above the spec's max_seq_len "
                f"{self.spec.max_seq_len}"
            )
        if seq_idx is not None:
            if not isinstance(seq_idx, Tensor) or seq_idx.is_floating_point():
                raise _err("seq_idx must be an integer tensor (B, L): document id, -1 for padding")
            if seq_idx.shape != ids.shape:
                raise _err(
                    f"seq_idx has shape {tuple(seq_idx.shape)}; it must match input_ids "
                    f"{tuple(ids.shape)}"
                )
        if state is not None:
            self._check_prefill_state(state, ids)

    # -- forward ---------------------------------------------------------------------------
    def _layer_ids(self, i: int, ids: Tensor) -> Tensor | None:
        return ids if self.layer_capabilities[i].needs_input_ids else None

    def forward(
        self,
        input_ids: Tensor,
        *,
        seq_idx: Tensor | None = None,
        state: ModelState | None = None,
    ) -> Tensor:
        """``input_ids (B, L)`` -> logits ``(B, L, V)`` (LM, encoder) or ``(B, C)`` (classifier).

        ``seq_idx (B, L)``: document id per position for packed sequences, -1 for
        padding. ``state``: a fresh :meth:`init_state`; the call is then a prefill.
        """
        self._check_forward(input_ids, seq_idx, state)
        h = self.embedding(input_ids)  # (B, L, D)
        for i, block in enumerate(self.layers):
            layer_state = None if state is None else state.layers[i]
            h = block(
                h, input_ids=self._layer_ids(i, input_ids), seq_idx=seq_idx, state=layer_state
            )
        h = self.norm_f(h)
        if state is not None:
            state.offset = input_ids.shape[1]
        if self.classifier is not None:
            return self.classifier(pool(h, seq_idx, self.spec.classifier.pooling))  # (B, C)
        return self._lm_logits(h)

    def _lm_logits(self, h: Tensor) -> Tensor:
        """``h (..., D) -> (..., total_vocab)``: padding rows of the head never computed."""
        return F.linear(h, self.lm_head.weight[: self.spec.total_vocab])  # (..., V)

    # -- decoding ----------------------------------------------------------------------------
    def _require_decode(self) -> None:
        if self.spec.arch != "causal_lm":
            raise CapabilityError(
                f"decoding needs arch 'causal_lm'; this model is {self.spec.arch!r}"
            )
        symbols = self.spec.layers.symbols_in_order
        configs = self.spec.layer_configs()
        for i, caps in enumerate(self.layer_capabilities):
            if not caps.decode:
                raise CapabilityError(
                    f"layer {i} (symbol {symbols[i]!r}, type {configs[i].type!r}) cannot "
                    "decode (capability `decode`); every layer must support it for "
                    "init_state/step"
                )

    def init_state(
        self,
        batch: int,
        max_len: int | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> ModelState:
        """Empty decode state for ``batch`` sequences of up to ``max_len`` tokens.

        Defaults: ``max_len = spec.max_seq_len``, the model's device, and the dtype of
        the embedding weights. ``max_len`` may exceed ``max_seq_len`` only when every
        layer's state is bounded (:meth:`unbounded_state_reasons` is empty).
        """
        self._require_decode()
        max_len = self.spec.max_seq_len if max_len is None else max_len
        if max_len < 1:
            raise _err(f"max_len must be >= 1, got {max_len}")
        if max_len > self.spec.max_seq_len:
            self._require_bounded_state(max_len)
        if batch < 1:
            raise _err(f"batch must be >= 1, got {batch}")
        device = self.embedding.weight.device if device is None else device
        dtype = self.embedding.weight.dtype if dtype is None else dtype
        layers = [
            block.init_state(batch, max_len, device=device, dtype=dtype) for block in self.layers
        ]
        return ModelState(layers=layers, batch=batch, max_len=max_len)

    def unbounded_state_reasons(self) -> list[str]:
        """Why decoding cannot continue past ``max_seq_len``: one line per layer whose
        decode state grows with the context (``Mixer.bounded_state`` False), and the
        learned position table if there is one. Empty: every state is bounded."""
        out = []
        if self.embedding.positions is not None:
            out.append(
                f"the learned position embedding has {self.spec.max_seq_len} rows "
                "(model.embedding.positional 'learned')"
            )
        for i in range(len(self.layers)):
            out.extend(self.layer_unbounded_reasons(i))
        return out

    def layer_unbounded_reasons(self, i: int) -> list[str]:
        """For pattern position ``i``: one line per mixer in it (composites: each child)
        whose decode state grows with the context; empty when all are bounded."""
        symbol = self.spec.layers.symbols_in_order[i]
        out = []
        for name, module in self.layers[i].named_modules():
            if isinstance(module, Mixer) and not module.bounded_state:
                why = module.unbounded_reason() or "its decode state grows with the context"
                where = f", {name}" if name not in ("", "mixer") else ""
                out.append(f"layer {i} (symbol {symbol!r}, type {module.cfg.type!r}{where}): {why}")
        return out

    def _require_bounded_state(self, max_len: int) -> None:
        reasons = self.unbounded_state_reasons()
        if reasons:
            raise CapabilityError(
                f"a decode state for {max_len} tokens exceeds max_seq_len "
                f"{self.spec.max_seq_len}; decoding past max_seq_len needs every layer's state "
                "to be bounded, but: " + "; ".join(reasons)
            )

    def prefill(
        self, input_ids: Tensor, state: ModelState, *, seq_idx: Tensor | None = None
    ) -> Tensor:
        """``forward(input_ids, seq_idx=seq_idx, state=state)`` returning only the last
        position's logits ``(B, V)``: the head never runs on the other ``L - 1``
        positions (``(B, L, V)`` logits of a long prompt can outweigh the model)."""
        if self.spec.arch != "causal_lm":
            raise CapabilityError(
                f"prefill needs arch 'causal_lm'; this model is {self.spec.arch!r}"
            )
        self._check_forward(input_ids, seq_idx, state)
        h = self.embedding(input_ids)  # (B, L, D)
        for i, block in enumerate(self.layers):
            ids = self._layer_ids(i, input_ids)
            h = block(h, input_ids=ids, seq_idx=seq_idx, state=state.layers[i])
        state.offset = input_ids.shape[1]
        return self._lm_logits(self.norm_f(h[:, -1]))  # (B, V)

    def generate(self, input_ids: Tensor, **kwargs: Any) -> Any:
        """:func:`mixstack.generation.generate` on this model (same arguments)."""
        from mixstack.generation.decoding import generate

        return generate(self, input_ids, **kwargs)

    def _check_prefill_state(self, state: Any, ids: Tensor) -> None:
        if not isinstance(state, ModelState):
            raise CapabilityError(
                f"state must come from model.init_state(...), got {type(state).__name__}"
            )
        self._require_decode()
        if state.offset != 0:
            raise _err(
                f"prefill needs a fresh state (this one has consumed {state.offset} tokens); "
                "continue with model.step"
            )
        if ids.shape[0] != state.batch or ids.shape[1] > state.max_len:
            raise _err(
                f"input_ids {tuple(ids.shape)} does not fit the state (batch {state.batch}, "
                f"max_len {state.max_len})"
            )

    def step(self, token_t: Tensor, state: ModelState) -> Tensor:
        """One decoding step: ``token_t (B,)`` -> next-token logits ``(B, V)``."""
        if not isinstance(state, ModelState):
            raise CapabilityError(
                f"state must come from model.init_state(...), got {type(state).__name__}"
            )
        self._require_decode()
        self._check_ids(token_t, 1, "token_t")
        if token_t.shape[0] != state.batch:
            raise _err(f"token_t has batch {token_t.shape[0]}, the state {state.batch}")
        if state.offset >= state.max_len:
            raise _err(f"the state is full ({state.max_len} tokens); allocate a longer one")
        h = self.embedding(token_t[:, None], offset=state.offset)[:, 0]  # (B, D)
        for i, block in enumerate(self.layers):
            token = token_t if self.layer_capabilities[i].needs_input_ids else None
            h = block.step(h, state.layers[i], token_t=token)
        state.offset += 1
        return self._lm_logits(self.norm_f(h))  # (B, V)

    # -- reporting ---------------------------------------------------------------------------
    def report(self, seq_len: int | None = None, dtype: torch.dtype = torch.bfloat16) -> Any:
        """Parameters, decode state and FLOPs per layer (:class:`mixstack.archs.report.Report`)."""
        from mixstack.archs.report import build_report

        return build_report(self, self.spec.max_seq_len if seq_len is None else seq_len, dtype)


def pool(h: Tensor, seq_idx: Tensor | None, how: str) -> Tensor:
    """``h (B, L, D)`` -> ``(B, D)`` over the valid (``seq_idx >= 0``) positions of each row.

    ``mean`` averages them, ``first`` / ``last`` take the first / last valid position.
    Each row must hold one document (packing several per row would mix their classes).
    """
    B, L, _ = h.shape
    if seq_idx is None:
        valid = torch.ones(B, L, dtype=torch.bool, device=h.device)
    else:
        valid = seq_idx >= 0  # (B, L)
        _check_one_document(seq_idx, valid)
    if how == "mean":
        weights = valid.to(h.dtype)[..., None]  # (B, L, 1)
        return (h * weights).sum(dim=1) / weights.sum(dim=1)
    positions = torch.arange(L, device=h.device).expand(B, L)
    if how == "first":
        index = torch.where(valid, positions, L).min(dim=1).values  # (B,)
    else:
        index = torch.where(valid, positions, -1).max(dim=1).values  # (B,)
    return h[torch.arange(B, device=h.device), index]


def _check_one_document(seq_idx: Tensor, valid: Tensor) -> None:
    if not bool(valid.any(dim=1).all()):
        row = int((~valid.any(dim=1)).nonzero()[0])
        raise _err(f"classifier input row {row} is all padding (seq_idx == -1 everywhere)")
    big = torch.iinfo(seq_idx.dtype).max
    high = seq_idx.masked_fill(~valid, -1).max(dim=1).values
    low = seq_idx.masked_fill(~valid, big).min(dim=1).values
    if bool((high != low).any()):
        row = int((high != low).nonzero()[0])
        raise _err(
            f"classifier input row {row} packs several documents (seq_idx "
            f"{int(low[row])}..{int(high[row])}); the classifier pools one document per row"
        )
