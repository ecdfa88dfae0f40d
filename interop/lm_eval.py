"""A mixstack model directory as an lm-evaluation-harness model (the ``lm-eval`` library).

:func:`lm_class` returns ``MixstackLM``, an ``lm_eval.api.model.LM`` registered under the
name ``"mixstack"`` (``simple_evaluate(model="mixstack", model_args="pretrained=DIR")``
once this module's :func:`lm_class` has run; ``mixstack lm-eval`` does that). lm_eval is
imported there, not when this module is.

Scoring, as lm-eval defines it (``lm_eval.api.model.LM``):

- ``loglikelihood(context, continuation)``: ``Σ log p(continuation token | all before)``
  and whether greedy decoding would produce the continuation (every token the argmax).
  Trailing whitespace of the context moves to the continuation, the whole text is
  encoded and split after the context's tokens; an empty context is the prefix token
  (``eos``, else ``bos``).
- ``loglikelihood_rolling(text)``: the log-likelihood of the whole text after the prefix
  token, in disjoint windows when it is longer than ``max_seq_len``.

Windows: a target token at position ``t`` of a token sequence is scored from the inputs
``seq[s:t]``; the targets are cut into chunks of at most ``W = max_length`` tokens, and
the chunk ending at ``b`` reads the ``W`` tokens before ``b`` (fewer at the start), so
every target is scored once and each chunk has as much context as fits. Rolling
likelihoods chunk from the start (lm-eval's ``get_rolling_token_windows`` with
``context_len=1`` then ``make_disjoint_window``); a continuation chunks from its end, so
the last tokens see a full window. Windows of one call are batched (right-padded: the
model is causal, so padding after a window cannot change its outputs).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mixstack.dsl.errors import MixstackError

MODEL_NAME = "mixstack"
DEFAULT_MAX_GEN_TOKS = 256
_GEN_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p", "seed"}


@dataclass(frozen=True)
class Window:
    """Targets ``seq[a:b]`` of request ``owner``, scored from the inputs ``seq[s:b-1]``."""

    owner: int
    seq: tuple[int, ...]
    a: int
    b: int
    s: int


def chunks(n: int, start: int, width: int, *, from_end: bool) -> list[tuple[int, int]]:
    """Split target positions ``start..n-1`` (``start >= 1``) into ``(a, b)`` chunks of at
    most ``width``, from the end (the last chunk full) or from the start."""
    out: list[tuple[int, int]] = []
    if from_end:
        b = n
        while b > start:
            out.append((max(start, b - width), b))
            b = out[-1][0]
        return out[::-1]
    a = start
    while a < n:
        out.append((a, min(n, a + width)))
        a = out[-1][1]
    return out


def windows_for(
    owner: int, seq: Sequence[int], start: int, width: int, from_end: bool
) -> list[Window]:
    """The windows scoring ``seq[start:]`` (see the module docstring)."""
    seq = tuple(seq)
    return [
        Window(owner, seq, a, b, max(0, b - 1 - width))
        for a, b in chunks(len(seq), start, width, from_end=from_end)
    ]


@torch.no_grad()
def score_windows(
    model: Any, windows: Sequence[Window], batch_size: int
) -> list[tuple[float, bool]]:
    """``(Σ log p(target), all targets greedy)`` of each window, in order. Windows are
    batched longest first and right-padded with id 0 (causal: padding is never read)."""
    device = next(model.parameters()).device
    order = sorted(range(len(windows)), key=lambda i: -(windows[i].b - 1 - windows[i].s))
    out: list[tuple[float, bool]] = [(0.0, True)] * len(windows)
    for k in range(0, len(order), batch_size):
        group = [windows[i] for i in order[k : k + batch_size]]
        width = max(w.b - 1 - w.s for w in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        for r, w in enumerate(group):
            ids[r, : w.b - 1 - w.s] = torch.tensor(w.seq[w.s : w.b - 1])
        logp = torch.log_softmax(model(ids.to(device)).float(), dim=-1)  # (B, width, V)
        for r, w in enumerate(group):
            pos = torch.arange(w.a - 1 - w.s, w.b - 1 - w.s, device=device)  # outputs scored
            target = torch.tensor(w.seq[w.a : w.b], device=device)
            rows = logp[r, pos]  # (T, V)
            total = float(rows.gather(-1, target[:, None]).sum())
            greedy = bool((rows.argmax(dim=-1) == target).all())
            out[order[k + r]] = (total, greedy)
    return out


def combine(
    n: int, windows: Sequence[Window], scores: Sequence[tuple[float, bool]]
) -> list[tuple[float, bool]]:
    """Per request: the windows' log-likelihoods summed, greedy when every window is."""
    out = [(0.0, True)] * n
    for w, (total, greedy) in zip(windows, scores, strict=True):
        prev, was_greedy = out[w.owner]
        out[w.owner] = (prev + total, was_greedy and greedy)
    return out


class Scorer:
    """A model and its tokenizer, scoring text the way lm-eval asks (no lm_eval needed)."""

    def __init__(
        self, model: Any, tokenizer: Any, *, max_length: int | None = None, batch_size: int = 1
    ) -> None:
        spec = model.spec
        if spec.arch != "causal_lm":
            raise MixstackError(
                f"lm-eval scores causal language models; this model's arch is {spec.arch!r}"
            )
        if tokenizer is None:
            raise MixstackError(
                "lm-eval needs the model's tokenizer: the model directory has no tokenizer.json "
                f"and its vocabulary ({spec.vocab_size} ids) is not the 256 bytes"
            )
        if max_length is not None and not 1 <= max_length <= spec.max_seq_len:
            raise MixstackError(
                f"max_length {max_length} must be in 1..{spec.max_seq_len} (model.max_seq_len)"
            )
        if batch_size < 1:
            raise MixstackError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_length = max_length or spec.max_seq_len
        self.batch_size = batch_size
        eos = spec.special_ids.get("eos", getattr(tokenizer, "eos_token_id", None))
        self.eos_id: int | None = eos
        self.prefix_id: int | None = eos if eos is not None else spec.special_ids.get("bos")

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without added special tokens."""
        raw = getattr(self.tokenizer, "_tokenizer", None)  # HFTokenizer: the library object
        if raw is not None:
            return list(raw.encode(text, add_special_tokens=False).ids)
        return list(self.tokenizer.encode(text))

    def _prefix(self) -> int:
        if self.prefix_id is None:
            raise MixstackError(
                "an empty context (and a rolling likelihood) is conditioned on the eos or bos "
                "token, but this model has neither (model.special_tokens / the tokenizer's eos)"
            )
        return self.prefix_id

    def pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """``(context ids, continuation ids)`` as lm-eval splits them; a context with no
        tokens (empty, or only whitespace, which moves to the continuation) is the prefix
        token, so the first continuation token is predicted from something."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        ctx = self.encode(context) if context else []
        if not ctx:
            return [self._prefix()], self.encode(continuation)
        whole = self.encode(context + continuation)
        return ctx, whole[len(ctx) :]

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        windows: list[Window] = []
        for i, (context, continuation) in enumerate(pairs):
            ctx, cont = self.pair(context, continuation)
            windows += windows_for(i, ctx + cont, len(ctx), self.max_length, from_end=True)
        return combine(len(pairs), windows, score_windows(self.model, windows, self.batch_size))

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        windows: list[Window] = []
        for i, text in enumerate(texts):
            windows += windows_for(
                i, [self._prefix(), *self.encode(text)], 1, self.max_length, from_end=False
            )
        scores = score_windows(self.model, windows, self.batch_size)
        return [total for total, _ in combine(len(texts), windows, scores)]

    def generate_until(self, context: str, gen_kwargs: dict[str, Any]) -> str:
        """Greedy (or sampled, with ``do_sample``) continuation of ``context``, cut before
        the first of ``until``; at most ``max_gen_toks`` tokens."""
        from mixstack.generation.decoding import generate

        unknown = sorted(set(gen_kwargs) - _GEN_KEYS)
        if unknown:
            raise MixstackError(
                f"generate_until: unsupported generation arguments {unknown}; "
                f"supported: {sorted(_GEN_KEYS)}"
            )
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = min(
            int(gen_kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)), self.max_length - 1
        )
        if max_new < 1:  # nothing may be generated (max_gen_toks 0, or a 1-token window)
            return ""
        ids = self.encode(context) or [self._prefix()]
        ids = ids[-(self.max_length - max_new) :]  # keep the prompt and new tokens in one window
        sample = bool(gen_kwargs.get("do_sample", False))
        options: dict[str, Any] = {}
        if sample:
            options = {
                "temperature": float(gen_kwargs.get("temperature", 1.0)),
                "top_k": gen_kwargs.get("top_k"),
                "top_p": gen_kwargs.get("top_p"),
                "seed": gen_kwargs.get("seed", 0),
            }
        device = next(self.model.parameters()).device
        out = generate(
            self.model,
            torch.tensor([ids], device=device),
            max_new_tokens=max_new,
            eos_token_id=[] if self.eos_id is None else self.eos_id,
            stop_strings=until or None,
            tokenizer=self.tokenizer if until else None,
            **options,
        )
        new = out.sequences[0, out.prompt_length : out.prompt_length + int(out.lengths[0])]
        return cut_at_stops(self.tokenizer.decode(new.tolist()), until)


def cut_at_stops(text: str, until: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in until if s) if i >= 0), default=len(text))
    return text[:cut]


def _batch_size(value: Any) -> int:
    if value is None:
        return 1
    text = str(value)
    if not text.isdigit():
        raise MixstackError(
            f"batch_size must be a positive integer, got {value!r} ('auto' is not supported)"
        )
    return int(text)


def load_scorer(
    pretrained: str | Path,
    *,
    device: str | None = None,
    dtype: str | None = None,
    max_length: int | None = None,
    batch_size: int = 1,
) -> Scorer:
    """A :class:`Scorer` for a model directory (its tokenizer: ``tokenizer.json``, or bytes)."""
    from mixstack.hub.modeldir import load_model_dir, load_tokenizer

    folder = Path(pretrained)
    if not folder.is_dir():
        raise MixstackError(f"lm-eval: {str(pretrained)!r} is not a model directory")
    model = load_model_dir(folder, device=device, dtype=dtype)
    return Scorer(model, load_tokenizer(folder), max_length=max_length, batch_size=batch_size)


@functools.cache
def lm_class() -> type:
    """``MixstackLM`` (an ``lm_eval.api.model.LM``), registered with lm_eval as
    ``"mixstack"``; model args: ``pretrained`` (model directory), ``device``, ``dtype``,
    ``max_length``, ``batch_size``."""
    try:
        from lm_eval.api.model import LM
        from lm_eval.api.registry import register_model
    except ImportError as exc:  # an optional extra
        raise MixstackError(
            "lm-eval evaluation needs the `lm_eval` package: pip install 'mixstack[eval]'"
        ) from exc

    class MixstackLM(LM):
        """A mixstack model directory for lm-eval (see :mod:`mixstack.interop.lm_eval`)."""

        def __init__(
            self,
            pretrained: str | None = None,
            scorer: Scorer | None = None,
            device: str | None = None,
            dtype: str | None = None,
            max_length: int | str | None = None,
            batch_size: int | str | None = 1,
            max_batch_size: int | None = None,
        ) -> None:
            super().__init__()
            if scorer is None:
                if pretrained is None:
                    raise MixstackError("MixstackLM needs pretrained=MODEL_DIR (or a scorer)")
                scorer = load_scorer(
                    pretrained,
                    device=device,
                    dtype=dtype,
                    max_length=None if max_length is None else int(max_length),
                    batch_size=_batch_size(batch_size),
                )
            self.scorer = scorer

        def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
            pairs = [tuple(r.args) for r in requests]
            out = self.scorer.loglikelihood(pairs)
            for args, result in zip(pairs, out, strict=True):
                self.cache_hook.add_partial("loglikelihood", args, result)
            return out

        def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
            texts = [r.args[0] for r in requests]
            out = self.scorer.loglikelihood_rolling(texts)
            for text, result in zip(texts, out, strict=True):
                self.cache_hook.add_partial("loglikelihood_rolling", (text,), result)
            return out

        def generate_until(self, requests: list[Any]) -> list[str]:
            out = []
            for r in requests:
                context, gen_kwargs = r.args
                text = self.scorer.generate_until(context, dict(gen_kwargs))
                self.cache_hook.add_partial("generate_until", r.args, text)
                out.append(text)
            return out

        @property
        def tokenizer_name(self) -> str:
            return "mixstack"

    register_model(MODEL_NAME)(MixstackLM)
    return MixstackLM
