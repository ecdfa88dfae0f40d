"""``generate()``: one parallel prefill of the prompt, then one ``step`` per new token.

::

    input_ids (B, L) [+ attention_mask, left padding]
      └─ repeat rows × num_return_sequences ─> (N, L)
      └─ model(ids, seq_idx, state=init_state(N, L + max_new_tokens - 1))   prefill
      └─ loop: scores = process(logits) ─> choose ─> stop? ─> model.step(token, state)

Padding is given to the model as ``seq_idx = -1`` (it contributes nothing and every
layer's positions count from the row's first real token), so a left-padded row
generates what it would alone. A row stops at an EOS id, at a stop string (needs a
tokenizer) or after ``max_new_tokens``; stopped rows are filled with ``pad_token_id``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from mixstack.dsl.errors import CapabilityError, MixstackError
from mixstack.generation.processors import Sampling, choose, process

if TYPE_CHECKING:
    from mixstack.archs.models import MixStackModel
    from mixstack.dsl.spec import ModelSpec
    from mixstack.generation.tokenizers import StreamDecoder, Tokenizer


class Streamer(Protocol):
    """Receives each generated token of a single sequence as soon as it is chosen."""

    def put(self, token_id: int) -> None: ...

    def end(self) -> None: ...


class TextStreamer:
    """A :class:`Streamer` that decodes tokens with ``tokenizer`` and calls ``write`` with
    each piece of text as soon as it is complete (partial UTF-8 characters held back)."""

    def __init__(self, tokenizer: Tokenizer, write: Callable[[str], object]) -> None:
        self._decoder = tokenizer.stream()
        self._write = write

    def put(self, token_id: int) -> None:
        piece = self._decoder.push(token_id)
        if piece:
            self._write(piece)

    def end(self) -> None:
        rest = self._decoder.flush()
        if rest:
            self._write(rest)


@dataclass
class GenerationOutput:
    """What :func:`generate` returns (N = batch × num_return_sequences rows).

    sequences: (N, L + T) the prompt as given (padding included) then the new tokens;
        T <= max_new_tokens is the longest row's count; a stopped row is filled with
        ``pad_token_id``.
    lengths: (N,) new tokens per row (the EOS or the token completing a stop string
        included).
    stop_reasons: per row, "eos", "stop_string" or "length".
    scores: (T, N, V) the processed scores each token was chosen from (fp32 at least;
        -inf where filtered), when ``output_scores``.
    texts: per row, the new tokens decoded, when a tokenizer was given.
    seed: the sampling generator's initial seed (None for greedy).
    state_nbytes: bytes of the decode state of all N rows.
    """

    sequences: Tensor
    lengths: Tensor
    stop_reasons: list[str]
    prompt_length: int
    scores: Tensor | None = None
    texts: list[str] | None = None
    seed: int | None = None
    state_nbytes: int = 0
    new_tokens: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.new_tokens = self.sequences[:, self.prompt_length :]  # (N, T)


def _check_model(model: MixStackModel) -> None:
    from mixstack.archs.models import MixStackModel

    if not isinstance(model, MixStackModel):
        raise MixstackError(
            f"generate needs a MixStackModel (mixstack.build / from_pretrained), got "
            f"{type(model).__name__}"
        )
    spec = model.spec
    if spec.arch != "causal_lm":
        raise CapabilityError(f"generation needs arch 'causal_lm'; this model is {spec.arch!r}")
    symbols, configs = spec.layers.symbols_in_order, spec.layer_configs()
    for i, caps in enumerate(model.layer_capabilities):
        what = f"layer {i} (symbol {symbols[i]!r}, type {configs[i].type!r})"
        if not caps.causal:
            raise CapabilityError(
                f"{what} is not causal (capability `causal`): its outputs read later tokens, "
                "so it cannot generate"
            )
        if not caps.decode:
            raise CapabilityError(
                f"{what} cannot decode (capability `decode`): generation needs init_state and "
                "step in every layer"
            )


def _as_batch(input_ids: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    if not isinstance(input_ids, Tensor):
        raise MixstackError(
            f"input_ids must be a torch.Tensor (B, L) or (L,), got {type(input_ids).__name__}"
        )
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
        if isinstance(attention_mask, Tensor) and attention_mask.dim() == 1:
            attention_mask = attention_mask[None]
    return input_ids, attention_mask


def _seq_idx_from_mask(mask: Tensor | None, ids: Tensor) -> tuple[Tensor | None, Tensor]:
    """``attention_mask (B, L)`` 0/1 -> (``seq_idx`` with -1 at padding or None when there
    is none, valid (B, L) bool); refuses right padding and empty rows."""
    if mask is None:
        return None, torch.ones_like(ids, dtype=torch.bool)
    if not isinstance(mask, Tensor) or mask.shape != ids.shape:
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise MixstackError(
            f"attention_mask must be a tensor of input_ids' shape {tuple(ids.shape)}, got {got}"
        )
    if mask.is_floating_point() or mask.is_complex() or ((mask != 0) & (mask != 1)).any():
        raise MixstackError("attention_mask must hold 0 (padding) and 1 (token) integers")
    valid = mask.to(device=ids.device, dtype=torch.bool)
    if not bool(valid[:, -1].all()) or bool((valid[:, :-1] & ~valid[:, 1:]).any()):
        bad = (valid[:, :-1] & ~valid[:, 1:]).any(dim=1) | ~valid[:, -1]
        row = int(bad.nonzero()[0])
        raise MixstackError(
            f"attention_mask row {row} has padding after a token (right padding, or a row "
            "with no token); generation continues every row at its end, so pad on the left"
        )
    if bool(valid.all()):
        return None, valid
    return torch.where(valid, 0, -1), valid


def _ids_list(value: int | Sequence[int] | None, name: str) -> list[int]:
    if value is None:
        return []
    items = [value] if isinstance(value, int) else list(value)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        raise MixstackError(f"{name} must be an int or a list of ints, got {value!r}")
    return items


def _check_counts(max_new_tokens: int, min_new_tokens: int, num_return_sequences: int) -> None:
    for name, value, low in (
        ("max_new_tokens", max_new_tokens, 1),
        ("min_new_tokens", min_new_tokens, 0),
        ("num_return_sequences", num_return_sequences, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise MixstackError(f"{name} must be an int >= {low}, got {value!r}")
    if min_new_tokens > max_new_tokens:
        raise MixstackError(
            f"min_new_tokens ({min_new_tokens}) exceeds max_new_tokens ({max_new_tokens})"
        )


def _generator(
    sampling: Sampling, generator: torch.Generator | None, seed: int | None, device: torch.device
) -> tuple[torch.Generator | None, int | None]:
    if generator is not None and seed is not None:
        raise MixstackError("give generator or seed, not both")
    if sampling.greedy:
        return None, None
    if generator is None:
        generator = torch.Generator(device=device)
        if seed is None:
            generator.seed()  # a fresh nondeterministic seed, reported in the output
        else:
            generator.manual_seed(seed)
    elif generator.device.type != device.type:
        raise MixstackError(f"generator is on {generator.device}, the model on {device}")
    return generator, generator.initial_seed()


def _check_stops(stop_strings: Sequence[str] | None, tokenizer: Tokenizer | None) -> list[str]:
    stops = list(stop_strings or [])
    if stops and tokenizer is None:
        raise MixstackError("stop_strings need a tokenizer to decode the generated text")
    if any(not isinstance(s, str) or not s for s in stops):
        raise MixstackError(f"stop_strings must be non-empty strings, got {stops!r}")
    return stops


def _eos_ids(spec: ModelSpec, eos_token_id: int | Sequence[int] | None) -> list[int]:
    """The EOS ids (None -> the spec's ``eos`` special id, if any), checked."""
    eos = _ids_list(
        spec.special_ids.get("eos") if eos_token_id is None else eos_token_id, "eos_token_id"
    )
    for token in eos:
        if not 0 <= token < spec.total_vocab:
            raise MixstackError(
                f"eos_token_id {token} is outside the vocabulary 0..{spec.total_vocab - 1}"
            )
    return eos


def _prompts(
    spec: ModelSpec, input_ids: Tensor, attention_mask: Tensor | None, copies: int
) -> tuple[Tensor, Tensor | None, Tensor]:
    """(ids (N, L), seq_idx (N, L) or None, valid (N, L)) with each row repeated
    ``copies`` times in place; left padding checked."""
    ids, attention_mask = _as_batch(input_ids, attention_mask)
    seq_idx, valid = _seq_idx_from_mask(attention_mask, ids)
    if seq_idx is not None and spec.embedding.positional != "none":
        raise CapabilityError(
            f"left padding with absolute position embeddings (model.embedding.positional "
            f"{spec.embedding.positional!r}) would shift every padded row's positions; "
            "generate the rows one at a time, or batch prompts of equal length"
        )
    if copies > 1:
        ids, valid = ids.repeat_interleave(copies, dim=0), valid.repeat_interleave(copies, dim=0)
        seq_idx = None if seq_idx is None else seq_idx.repeat_interleave(copies, dim=0)
    return ids, seq_idx, valid


@dataclass
class _Rows:
    """Per-row bookkeeping of the loop."""

    n: int
    eos: list[int]
    stops: list[str]
    decoders: list[StreamDecoder] | None
    texts: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    done: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.texts = [""] * self.n
        self.reasons = ["length"] * self.n
        self.done = [False] * self.n

    def update(self, tokens: list[int]) -> None:
        """Record one token per live row; mark rows that stop with it."""
        for r, token in enumerate(tokens):
            if self.done[r]:
                continue
            if self.decoders is not None:
                before = len(self.texts[r])
                self.texts[r] += self.decoders[r].push(token)
                fresh = self.texts[r]
                if any(s in fresh[max(0, before - len(s) + 1) :] for s in self.stops):
                    self.done[r], self.reasons[r] = True, "stop_string"
            if token in self.eos:
                self.done[r], self.reasons[r] = True, "eos"

    def finish(self) -> None:
        if self.decoders is not None:
            for r, decoder in enumerate(self.decoders):
                self.texts[r] += decoder.flush()


@torch.no_grad()
def generate(
    model: MixStackModel,
    input_ids: Tensor,
    *,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    stop_strings: Sequence[str] | None = None,
    tokenizer: Tokenizer | None = None,
    num_return_sequences: int = 1,
    attention_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    streamer: Streamer | None = None,
    output_scores: bool = False,
) -> GenerationOutput:
    """Continue ``input_ids (B, L)`` (or ``(L,)``) by up to ``max_new_tokens`` tokens.

    Greedy when ``temperature == 0``; otherwise sampled after the processors
    (repetition penalty -> temperature -> top-k -> top-p) from one ``torch.Generator``
    (``generator``, or one seeded with ``seed``). ``eos_token_id``: None -> the spec's
    ``eos`` special id if it has one (``[]`` disables). ``attention_mask (B, L)``: 1 for
    tokens, 0 for left padding. ``stop_strings`` need ``tokenizer``; a ``streamer``
    (single sequence only) gets each token as it is chosen. Generation may run past
    ``max_seq_len`` when every layer's decode state is bounded; otherwise that is a
    :class:`CapabilityError` naming the layer. Run the model in eval mode (dropout).
    """
    _check_model(model)
    sampling = Sampling(temperature, top_k, top_p, repetition_penalty)
    sampling.check()
    _check_counts(max_new_tokens, min_new_tokens, num_return_sequences)
    if num_return_sequences > 1 and sampling.greedy:
        raise MixstackError(
            "num_return_sequences > 1 needs sampling (temperature > 0): greedy rows would "
            "all be the same"
        )
    stops = _check_stops(stop_strings, tokenizer)
    eos = _eos_ids(model.spec, eos_token_id)
    if pad_token_id is None:
        pad_token_id = model.spec.special_ids.get("pad", eos[0] if eos else 0)
    ids, seq_idx, valid = _prompts(model.spec, input_ids, attention_mask, num_return_sequences)
    n, prompt_len = ids.shape
    if streamer is not None and n != 1:
        raise MixstackError(f"a streamer follows one sequence; this call generates {n}")
    device = ids.device
    rng, used_seed = _generator(sampling, generator, seed, device)

    state = model.init_state(n, prompt_len + max_new_tokens - 1)
    logits = model.prefill(ids, state, seq_idx=seq_idx)  # (N, V)
    # prompt and new tokens, for the repetition penalty; False at padding and after a stop
    history = torch.empty(n, prompt_len + max_new_tokens, dtype=ids.dtype, device=device)
    history_valid = torch.zeros(n, prompt_len + max_new_tokens, dtype=torch.bool, device=device)
    history[:, :prompt_len], history_valid[:, :prompt_len] = ids, valid
    rows = _Rows(
        n, eos, stops, None if tokenizer is None else [tokenizer.stream() for _ in range(n)]
    )
    chosen: list[Tensor] = []
    all_scores: list[Tensor] = []
    finished = torch.zeros(n, dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        banned = eos if t < min_new_tokens else None
        seen = prompt_len + t
        scores = process(
            logits,
            sampling,
            history=history[:, :seen],
            history_valid=history_valid[:, :seen],
            banned=banned,
        )
        token = choose(scores, sampling, rng)  # (N,)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        chosen.append(token)
        if output_scores:
            all_scores.append(scores)
        listed = token.tolist()
        if streamer is not None:
            streamer.put(listed[0])
        rows.update(listed)
        history[:, seen], history_valid[:, seen] = token, ~finished
        finished = torch.tensor(rows.done, device=device)
        if bool(finished.all()) or t == max_new_tokens - 1:
            break
        logits = model.step(token, state)
    rows.finish()
    if streamer is not None:
        streamer.end()
    new = torch.stack(chosen, dim=1)  # (N, T)
    lengths = history_valid[:, prompt_len:].sum(dim=1)  # (N,)
    return GenerationOutput(
        sequences=torch.cat((ids, new), dim=1),
        lengths=lengths,
        stop_reasons=rows.reasons,
        prompt_length=prompt_len,
        scores=torch.stack(all_scores) if output_scores else None,
        texts=rows.texts if tokenizer is not None else None,
        seed=used_seed,
        state_nbytes=state.nbytes(),
    )
