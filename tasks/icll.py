"""In-context language learning (ICLL; Akyürek et al. 2024, "In-Context Language Learning:
Architectures and Algorithms", the RegBench task; reference data code berlino/seq_icl
``src/dataloaders/dfa.py``): config, automata, generator and the paper's metrics.

Each sample is a handful of strings drawn from one random probabilistic finite automaton,
separated by a delimiter; the model must infer the language in context and predict a
next symbol the automaton allows. Automata: ``n`` states (uniform in
``min_states..max_states``), an alphabet of ``a`` distinct symbols (``a = n`` by default,
as in the reference), and each state gets ``1..min(max_out_edges, a)`` outgoing symbols
(uniform count, distinct symbols, uniform target states). Every string starts in state 0
and follows a uniformly chosen outgoing edge at each step; its length is uniform in
``1..max_string_len``. (The reference draws ``2..max_num_nodes-1`` states, ``1..max-1``
edges and lengths ``0..max-1``: exclusive upper bounds and possibly empty strings; the
bounds here are inclusive and strings are never empty.) Training samples draw their
automaton from a finite pool of ``n_train_automata`` (automaton ``m`` of the pool is a
pure function of ``(seed, m)``); the validation set uses automata that are not in that
pool.

Ids: symbols ``0..n_symbols-1``, the delimiter ``n_symbols``; the task's vocabulary is
``n_symbols + 1``. Every next token is a target (the LM loss trains delimiters too).
Besides ``input_ids`` and ``labels`` a sample carries ``icll_next_probs (L, V)``: row ``t``
is the automaton's next-symbol distribution after position ``t`` when the string
continues there (the label is a symbol), and zeros otherwise (the label is the
delimiter). The metrics below score exactly the rows that are not zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from mixstack.dsl.errors import MixstackError
from mixstack.dsl.registry import MetricDef, register_task
from mixstack.dsl.spec import ModelSpec, Problem
from mixstack.tasks.base import (
    GeneratedTask,
    GeneratedTaskConfig,
    Sample,
    Split,
    generator_for,
)

NEXT_PROBS = "icll_next_probs"


class ICLLTask(GeneratedTaskConfig):
    """Strings of random probabilistic finite automata; predict an allowed next symbol."""

    type: Literal["icll"] = "icll"
    n_symbols: int = Field(
        16, ge=2, description="symbol ids 0..n_symbols-1; the delimiter is id n_symbols"
    )
    min_states: int = Field(2, ge=1, description="fewest automaton states")
    max_states: int = Field(8, ge=1, description="most automaton states")
    alphabet_size: int | None = Field(
        None,
        ge=1,
        description="symbols per automaton, drawn without replacement from the n_symbols; "
        "null: the automaton's number of states (the reference's choice)",
    )
    max_out_edges: int = Field(
        4, ge=1, description="each state gets 1..min(max_out_edges, alphabet) outgoing symbols"
    )
    max_string_len: int = Field(12, ge=1, description="string lengths are uniform in 1..this")
    n_train_automata: int = Field(
        5000, ge=1, le=1_000_000, description="size of the finite pool of training automata"
    )

    @property
    def vocab_size(self) -> int:
        """Ids used: the symbols and the delimiter."""
        return self.n_symbols + 1

    @classmethod
    def examples(cls) -> list[ICLLTask]:
        return [
            cls(seq_len=40, n_symbols=8, max_states=5, n_train_automata=20, val_size=8),
            cls(
                seq_len=33,
                n_symbols=6,
                min_states=3,
                max_states=3,
                alphabet_size=6,
                max_out_edges=2,
                max_string_len=4,
                n_train_automata=3,
                val_size=8,
            ),
        ]

    def check(self, model: ModelSpec) -> list[Problem]:
        out = super().check(model)
        if self.min_states > self.max_states:
            out.append(
                (
                    ("min_states",),
                    f"min_states ({self.min_states}) exceeds max_states ({self.max_states})",
                    f"<= {self.max_states}",
                )
            )
        widest = self.alphabet_size or self.max_states
        if widest > self.n_symbols:
            field = "alphabet_size" if self.alphabet_size else "max_states"
            out.append(
                (
                    (field,),
                    f"automata need alphabets of up to {widest} distinct symbols "
                    f"({field}{'' if self.alphabet_size else ', the default alphabet size'}) "
                    f"but there are only n_symbols = {self.n_symbols}",
                    f"n_symbols >= {widest}",
                )
            )
        return out


@dataclass(frozen=True)
class Automaton:
    """A probabilistic finite automaton with uniform edge probabilities.

    alphabet: its symbol ids (column order of ``transitions``). transitions: per state, per
    alphabet symbol, the next state or -1 (no edge). State 0 is the start state.
    """

    alphabet: tuple[int, ...]
    transitions: tuple[tuple[int, ...], ...]

    @property
    def n_states(self) -> int:
        return len(self.transitions)

    def edges(self, state: int) -> list[tuple[int, int]]:
        """``[(symbol, next state), ...]`` leaving ``state``."""
        row = self.transitions[state]
        return [(self.alphabet[c], nxt) for c, nxt in enumerate(row) if nxt >= 0]

    def allows(self, word: list[int]) -> bool:
        """Whether the automaton can emit ``word`` from its start state."""
        state = 0
        for symbol in word:
            nxt = dict(self.edges(state)).get(symbol)
            if nxt is None:
                return False
            state = nxt
        return True


def random_automaton(cfg: ICLLTask, generator: torch.Generator) -> Automaton:
    """An automaton drawn as the module docstring describes, from ``generator``."""
    n = int(torch.randint(cfg.min_states, cfg.max_states + 1, (1,), generator=generator))
    a = cfg.alphabet_size or n
    alphabet = torch.randperm(cfg.n_symbols, generator=generator)[:a]  # (a,)
    degree = torch.randint(1, min(cfg.max_out_edges, a) + 1, (n,), generator=generator)  # (n,)
    # rank of each symbol in a random order per state: the first `degree` get an edge
    rank = torch.rand(n, a, generator=generator).argsort(dim=1).argsort(dim=1)  # (n, a)
    targets = torch.randint(n, (n, a), generator=generator)  # (n, a)
    transitions = torch.where(rank < degree[:, None], targets, -1)
    return Automaton(
        alphabet=tuple(alphabet.tolist()),
        transitions=tuple(tuple(row) for row in transitions.tolist()),
    )


def icll_sample(
    automaton: Automaton, *, seq_len: int, n_symbols: int, max_string_len: int, generator: Any
) -> Sample:
    """``seq_len + 1`` tokens of delimiter-separated strings of ``automaton`` (the last
    string cut off), as inputs, next-token labels and the next-symbol distributions.
    Example (alphabet {2, 5}, delimiter 8)::

        tokens   2 5 5 8 2 2 8 5 ...
        labels   5 5 8 2 2 8 5 ...       next_probs rows: the state's edges, 0 before an 8
    """
    total = seq_len + 1
    delimiter = n_symbols
    # All randomness in two draws (uniforms for edge choices, string lengths), then a plain
    # Python walk: a sample costs no per-token tensor calls.
    choices = torch.rand(total, generator=generator).tolist()
    lengths = torch.randint(1, max_string_len + 1, (total,), generator=generator).tolist()
    edges = [automaton.edges(s) for s in range(automaton.n_states)]
    tokens: list[int] = []
    states: list[int] = []  # state after each token (0 after a delimiter)
    string = 0
    while len(tokens) < total:
        if string:
            tokens.append(delimiter)
            states.append(0)
        state = 0
        for _ in range(lengths[string]):
            if len(tokens) >= total:
                break
            out = edges[state]
            symbol, state = out[min(int(choices[len(tokens)] * len(out)), len(out) - 1)]
            tokens.append(symbol)
            states.append(state)
        string += 1
    ids = torch.tensor(tokens, dtype=torch.long)
    rows: list[int] = []
    cols: list[int] = []
    values: list[float] = []
    for t in range(seq_len):
        if tokens[t + 1] != delimiter:  # the string continues after t
            out = edges[states[t]]
            rows.extend([t] * len(out))
            cols.extend(symbol for symbol, _ in out)
            values.extend([1.0 / len(out)] * len(out))
    probs = torch.zeros(seq_len, n_symbols + 1)
    probs[torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)] = (
        torch.tensor(values)
    )
    return {"input_ids": ids[:-1], "labels": ids[1:].clone(), NEXT_PROBS: probs}


# -- metrics: per scored position (a non-zero next_probs row), averaged over positions ------


def _widen(next_probs: Tensor, width: int) -> Tensor:
    """next_probs (B, L, V_task) -> (B, L, width): zero for ids the task never emits."""
    pad = width - next_probs.shape[-1]
    return torch.nn.functional.pad(next_probs.float(), (0, pad)) if pad > 0 else next_probs.float()


def _mean_over_scored(values: Tensor, next_probs: Tensor) -> tuple[Tensor, Tensor]:
    """(mean of ``values (B, L)`` over scored positions, their count) for MeanMetric."""
    scored = next_probs.sum(dim=-1) > 0  # (B, L)
    count = scored.sum()
    total = torch.where(scored, values.float(), 0.0).sum()
    return total / count.clamp(min=1), count


def _continuation_logits(logits: Tensor, next_probs: Tensor) -> Tensor:
    """Logits with the delimiter removed: the model's next symbol given that the string
    continues (the delimiter is the task's last id)."""
    masked = logits.float().clone()
    masked[..., next_probs.shape[-1] - 1] = float("-inf")
    return masked


def allowed_accuracy(logits: Tensor, labels: Tensor, next_probs: Tensor) -> tuple[Tensor, Tensor]:
    """The paper's accuracy: the most likely next symbol (delimiter excluded) is one the
    automaton allows in the current state."""
    table = _widen(next_probs, logits.shape[-1])
    pred = _continuation_logits(logits, next_probs).argmax(dim=-1)  # (B, L)
    ok = table.gather(-1, pred[..., None])[..., 0] > 0
    return _mean_over_scored(ok, next_probs)


def greedy_accuracy(logits: Tensor, labels: Tensor, next_probs: Tensor) -> tuple[Tensor, Tensor]:
    """A greedy decoder's choice (argmax over every output, delimiter included) is an
    allowed symbol: also wrong when the model would end the string there."""
    table = _widen(next_probs, logits.shape[-1])
    ok = table.gather(-1, logits.argmax(dim=-1)[..., None])[..., 0] > 0
    return _mean_over_scored(ok, next_probs)


def total_variation(logits: Tensor, labels: Tensor, next_probs: Tensor) -> tuple[Tensor, Tensor]:
    """½ Σ_v |q(v) − p(v)| between the model's next-symbol distribution q (softmax with the
    delimiter removed) and the automaton's p (uniform over the allowed symbols)."""
    q = torch.softmax(_continuation_logits(logits, next_probs), dim=-1)
    p = _widen(next_probs, logits.shape[-1])
    return _mean_over_scored(0.5 * (q - p).abs().sum(dim=-1), next_probs)


def _mean(n_out: int) -> Any:
    from torchmetrics import MeanMetric

    return MeanMetric()


ICLL_ACCURACY = MetricDef(
    name="icll_accuracy",
    higher_is_better=True,
    description="ICLL (paper): most likely next symbol is allowed by the automaton",
    factory=_mean,
    prepare=allowed_accuracy,
    sample_keys=(NEXT_PROBS,),
)
ICLL_TVD = MetricDef(
    name="icll_tvd",
    higher_is_better=False,
    description="ICLL: total variation distance to the automaton's next-symbol distribution",
    factory=_mean,
    prepare=total_variation,
    sample_keys=(NEXT_PROBS,),
)
ICLL_GREEDY = MetricDef(
    name="icll_greedy_accuracy",
    higher_is_better=True,
    description="ICLL: greedy argmax (delimiter included) is an allowed symbol",
    factory=_mean,
    prepare=greedy_accuracy,
    sample_keys=(NEXT_PROBS,),
)


@register_task(ICLLTask, metrics=[ICLL_ACCURACY, ICLL_TVD, ICLL_GREEDY])
class ICLL(GeneratedTask):
    cfg: ICLLTask

    def __init__(self, cfg: ICLLTask, seed: int, model: ModelSpec) -> None:
        super().__init__(cfg, seed, model)
        self._train: dict[int, Automaton] = {}  # pool index -> automaton, drawn on first use
        self._val: dict[int, Automaton] = {}
        self._pool: frozenset[Automaton] | None = None

    def train_automaton(self, m: int) -> Automaton:
        """Automaton ``m`` of the training pool: a pure function of (seed, m)."""
        if m not in self._train:
            g = generator_for(self.seed, "icll-automaton", m)
            self._train[m] = random_automaton(self.cfg, g)
        return self._train[m]

    def val_automaton(self, index: int) -> Automaton:
        """Automaton of validation sample ``index``: redrawn until it is not in the
        training pool (small state counts make collisions possible)."""
        if index in self._val:
            return self._val[index]
        if self._pool is None:
            self._pool = frozenset(map(self.train_automaton, range(self.cfg.n_train_automata)))
        for attempt in range(1000):
            g = generator_for(self.seed, "icll-val-automaton", index, attempt)
            automaton = random_automaton(self.cfg, g)
            if automaton not in self._pool:
                self._val[index] = automaton
                return automaton
        raise MixstackError(
            f"icll: 1000 automata drawn for validation sample {index} were all in the "
            "training pool; raise max_states or alphabet_size, or lower n_train_automata"
        )

    def sample(self, split: Split, step: int, index: int) -> Sample:
        g = self.generator(split, step, index)
        if split == "val":
            automaton = self.val_automaton(index)
        else:
            automaton = self.train_automaton(
                int(torch.randint(self.cfg.n_train_automata, (1,), generator=g))
            )
        return icll_sample(
            automaton,
            seq_len=self.cfg.seq_len,
            n_symbols=self.cfg.n_symbols,
            max_string_len=self.cfg.max_string_len,
            generator=g,
        )
