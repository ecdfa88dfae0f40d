"""ListOps (Nangia & Bowman 2018, as used by Long Range Arena, Tay et al. 2021): nested
``MAX`` / ``MIN`` / ``MED`` / ``SUM_MOD`` expressions over the values ``0..C-1``, each
labelled with its exact value.

Token ids (``C = n_classes``, 10 in LRA):

======================  ======================================================
``0..C-1``              the values (operands and answers)
``C, C+1, C+2, C+3``    ``[MAX``, ``[MIN``, ``[MED``, ``[SM`` (an operator opens a list)
``C+4``                 ``]`` (closes it)
``C+5``                 padding
``C+6``                 ``=`` (``causal_lm`` only: the output here must be the value)
======================  ======================================================

An expression is left-padded to ``seq_len`` so that it ends at the last position: a
causal classifier pooling the ``last`` position, and a ``causal_lm`` reading ``=``, have
seen the whole expression.

``objective`` picks what is scored. ``label`` (the task proper): the value, as the class
of a ``classifier`` or the token after ``=`` of a ``causal_lm``. ``lm`` and ``mlm`` use
the expressions alone, without their values, for self-pretraining (phase 1 of
``train.init_from``, see docs/self-pretraining.md): ``lm`` trains a ``causal_lm`` on
next-token prediction over the expression (padding not scored), ``mlm`` an ``encoder``
on masked tokens (``train.mlm``; no ``=`` is written, so its id ``C+6`` can serve as
``train.mlm.mask_id`` and the vocabulary stays that of the classifier).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from mixstack.dsl.errors import MixstackError
from mixstack.dsl.registry import register_task
from mixstack.dsl.spec import ModelSpec, Problem
from mixstack.tasks.base import GeneratedTask, GeneratedTaskConfig, Sample, Split, ignored

OPERATORS = ("MAX", "MIN", "MED", "SM")  # SM: the sum modulo C


def op_id(n_classes: int, op: str) -> int:
    return n_classes + OPERATORS.index(op)


def close_id(n_classes: int) -> int:
    return n_classes + 4


def pad_id(n_classes: int) -> int:
    return n_classes + 5


def query_id(n_classes: int) -> int:
    return n_classes + 6


class ListOpsTask(GeneratedTaskConfig):
    """ListOps: nested MAX/MIN/MED/SUM_MOD lists; the label is the expression's value."""

    archs: ClassVar[tuple[str, ...]] = ("classifier", "causal_lm", "encoder")
    type: Literal["listops"] = "listops"
    objective: Literal["label", "lm", "mlm"] = Field(
        "label",
        description="label: the value (classifier class, or the token after '=' of a "
        "causal_lm); lm: next-token over the expression (causal_lm); mlm: masked tokens of "
        "the expression (encoder). lm / mlm use no labels: self-pretraining",
    )
    n_classes: int = Field(
        10, ge=2, description="values 0..C-1 (operands and labels; SM is the sum mod C); LRA: 10"
    )
    max_depth: int = Field(3, ge=1, description="most operators nested inside each other")
    max_args: int = Field(5, ge=2, description="most arguments of one operator (at least 2)")
    min_length: int = Field(
        1, ge=1, description="fewest tokens of an expression (the most: seq_len, less '=')"
    )
    leaf_p: float = Field(
        0.25, ge=0, lt=1, description="probability that an argument is a value, not a list"
    )

    @model_validator(mode="after")
    def _lengths(self) -> ListOpsTask:
        if self.min_length > self.seq_len:
            raise ValueError(
                f"min_length {self.min_length} exceeds seq_len {self.seq_len}; "
                f"expected min_length <= seq_len"
            )
        return self

    @classmethod
    def examples(cls) -> list[ListOpsTask]:
        return [
            cls(seq_len=32, max_depth=3, max_args=4, min_length=12, val_size=8),
            cls(seq_len=64, n_classes=5, max_depth=5, max_args=3, leaf_p=0.5, val_size=8),
        ]

    def max_tokens(self, model: ModelSpec) -> int:
        """The longest expression a sample holds (one position less for ``=`` in an LM)."""
        return self.seq_len - self.writes_query(model)

    def writes_query(self, model: ModelSpec) -> bool:
        """Whether samples end with ``=`` (the label objective of a ``causal_lm``)."""
        return model.arch == "causal_lm" and self.objective == "label"

    def check(self, model: ModelSpec) -> list[Problem]:
        out = super().check(model)
        archs = {"label": ("classifier", "causal_lm"), "lm": ("causal_lm",), "mlm": ("encoder",)}
        if model.arch not in archs[self.objective]:
            fits = [o for o, a in archs.items() if model.arch in a]
            return [
                (
                    ("objective",),
                    f"objective {self.objective} trains arch {' or '.join(archs[self.objective])}"
                    f", the model is arch {model.arch}",
                    f"objective {' or '.join(fits)} for arch {model.arch}",
                )
            ]
        need = self.n_classes + (7 if self.writes_query(model) else 6)
        if model.vocab_size < need:
            out.append(
                (
                    ("n_classes",),
                    f"{self.n_classes} values, 4 operators, ']', padding"
                    f"{' and =' if self.writes_query(model) else ''} need vocab_size >= "
                    f"{need}, the model's is {model.vocab_size}",
                    f"<= {model.vocab_size - need + self.n_classes}",
                )
            )
        head = model.classifier.n_classes if model.classifier is not None else None
        if model.arch == "classifier" and head != self.n_classes:
            out.append(
                (
                    ("n_classes",),
                    f"the task has {self.n_classes} classes, the model's classifier {head}",
                    f"{head} (model.classifier.n_classes)",
                )
            )
        longest = max_expression_length(self.max_depth, self.max_args)
        room = self.max_tokens(model)
        if self.min_length > min(longest, room) or (self.min_length > 1 and room < 4):
            out.append(
                (
                    ("min_length",),
                    f"min_length {self.min_length} exceeds the longest expression: "
                    f"{longest} tokens at max_depth {self.max_depth} and max_args "
                    f"{self.max_args}, {room} positions in seq_len {self.seq_len}",
                    f"<= {min(longest, room)}",
                )
            )
        return out


def max_expression_length(max_depth: int, max_args: int) -> int:
    """Tokens of the fullest tree: ``L(0) = 1``, ``L(d) = 2 + max_args·L(d-1)``."""
    n = 1
    for _ in range(max_depth):
        n = 2 + max_args * n
    return n


# A tree is a value (int) or [operator, [children]] (lists, so the growing step can edit).
Tree = Any


def _size(tree: Tree) -> int:
    return 1 if isinstance(tree, int) else 2 + sum(_size(c) for c in tree[1])


def _randint(low: int, high: int, g: torch.Generator) -> int:
    """Uniform in ``low..high`` inclusive."""
    return low + int(torch.randint(high - low + 1, (1,), generator=g))


def _grow_random(
    depth: int,
    budget: int,
    n_classes: int,
    max_args: int,
    leaf_p: float,
    g: torch.Generator,
    root: bool = False,
) -> Tree:
    """A random tree of at most ``budget`` tokens and ``depth`` nested operators (the root
    is an operator whenever it fits, as in LRA)."""
    is_leaf = float(torch.rand((), generator=g)) < leaf_p and not root
    if depth == 0 or budget < 4 or is_leaf:  # an operator needs [OP, 2 args, ]
        return int(torch.randint(n_classes, (1,), generator=g))
    n_args = _randint(2, min(max_args, budget - 2), g)
    left = budget - 2
    children = []
    for i in range(n_args):
        reserve = n_args - i - 1  # one token for each later argument
        child = _grow_random(depth - 1, left - reserve, n_classes, max_args, leaf_p, g)
        left -= _size(child)
        children.append(child)
    return [OPERATORS[int(torch.randint(4, (1,), generator=g))], children]


def _sites(
    node: Tree, level: int, depth: int, max_args: int, may_nest: bool, out: list[Any]
) -> None:
    """Where ``node`` (a list at nesting ``level``) can grow: itself when it has fewer than
    ``max_args`` arguments, each value child when a list may replace it."""
    if len(node[1]) < max_args:
        out.append((node, -1))
    for k, child in enumerate(node[1]):
        if not isinstance(child, int):
            _sites(child, level + 1, depth, max_args, may_nest, out)
        elif may_nest and level + 1 < depth:
            out.append((node, k))


def _lengthen(
    tree: Tree,
    target: int,
    room: int,
    depth: int,
    n_classes: int,
    max_args: int,
    g: torch.Generator,
) -> Tree | None:
    """Grow ``tree`` to ``target..room`` tokens: a random site at a time, either one more
    value in a list that has room (+1 token) or a value turned into ``[OP v v]`` (+3).
    None when every site left would overshoot ``room`` (rare; the caller starts over)."""
    if isinstance(tree, int):
        tree = [OPERATORS[0], [tree, int(torch.randint(n_classes, (1,), generator=g))]]
    size = _size(tree)
    while size < target:
        sites: list[tuple[Any, int]] = []  # (list node, -1) to append, or (node, child index)
        _sites(tree, 0, depth, max_args, size + 3 <= room, sites)
        if not sites:
            return None
        node, k = sites[int(torch.randint(len(sites), (1,), generator=g))]
        value = int(torch.randint(n_classes, (1,), generator=g))
        if k < 0:
            node[1].append(value)
            size += 1
        else:
            op = OPERATORS[int(torch.randint(4, (1,), generator=g))]
            node[1][k] = [op, [node[1][k], value]]
            size += 3
    return tree


def _value(tree: Tree, n_classes: int) -> int:
    if isinstance(tree, int):
        return tree
    op, children = tree
    vals = sorted(_value(c, n_classes) for c in children)
    if op == "MAX":
        return vals[-1]
    if op == "MIN":
        return vals[0]
    if op == "MED":  # LRA: int(np.median): the mean of the two middle values, rounded down
        mid = len(vals) // 2
        return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) // 2
    return sum(vals) % n_classes


def _tokens(tree: Tree, n_classes: int, out: list[int]) -> list[int]:
    if isinstance(tree, int):
        out.append(tree)
    else:
        out.append(op_id(n_classes, tree[0]))
        for child in tree[1]:
            _tokens(child, n_classes, out)
        out.append(close_id(n_classes))
    return out


_TRIES = 100  # fresh trees drawn when growing one to min_length gets stuck


def listops_sample(
    *,
    seq_len: int,
    n_classes: int,
    max_depth: int,
    max_args: int,
    min_length: int,
    leaf_p: float,
    lm: bool,
    generator: torch.Generator,
) -> Sample:
    """A random expression of at most ``seq_len`` tokens (``seq_len - 1`` with ``lm``) and
    ``max_depth`` nested operators, grown to ``min_length`` tokens when shorter, left-padded.
    Classification (``lm`` False): ``labels`` is the value, a scalar. Language model: the
    expression is followed by ``=``, the only scored position, whose target is the value.
    Example, C=10 (``[MAX`` 10, ``[SM`` 13, ``]`` 14, pad 15, ``=`` 16), L=9, lm::

        [MAX 2 [SM 4 9 ] ] =           value max(2, (4 + 9) mod 10) = 3
        inputs  15 10 2 13 4 9 14 14 16       labels  - - - - - - - - 3
    """
    room = seq_len - int(lm)
    g = generator
    for _ in range(_TRIES):
        tree = _grow_random(max_depth, room, n_classes, max_args, leaf_p, g, root=True)
        if _size(tree) < min_length:
            tree = _lengthen(tree, min_length, room, max_depth, n_classes, max_args, g)
        if tree is not None:
            break
    else:
        raise MixstackError(
            f"listops: no expression of {min_length}..{room} tokens at max_depth {max_depth} "
            f"and max_args {max_args} in {_TRIES} tries; lower train.task.min_length"
        )
    tokens = _tokens(tree, n_classes, [])
    if lm:
        tokens.append(query_id(n_classes))
    inputs = torch.full((seq_len,), pad_id(n_classes), dtype=torch.long)
    inputs[seq_len - len(tokens) :] = torch.tensor(tokens, dtype=torch.long)
    value = _value(tree, n_classes)
    if not lm:
        return {"input_ids": inputs, "labels": torch.tensor(value, dtype=torch.long)}
    labels = ignored(seq_len)
    labels[-1] = value
    return {"input_ids": inputs, "labels": labels}


@register_task(ListOpsTask)
class ListOps(GeneratedTask):
    cfg: ListOpsTask

    def __init__(self, cfg: Any, seed: int, model: ModelSpec) -> None:
        super().__init__(cfg, seed, model)
        self.lm = cfg.writes_query(model)
        # one class per sample for a classifier; scored token positions otherwise
        self.kind = "classification" if model.arch == "classifier" else "lm"

    def sample(self, split: Split, step: int, index: int) -> Sample:
        cfg = self.cfg
        sample = listops_sample(
            seq_len=cfg.seq_len,
            n_classes=cfg.n_classes,
            max_depth=cfg.max_depth,
            max_args=cfg.max_args,
            min_length=cfg.min_length,
            leaf_p=cfg.leaf_p,
            lm=self.lm,
            generator=self.generator(split, step, index),
        )
        if cfg.objective == "label":
            return sample
        ids = sample["input_ids"]
        labels = ignored(cfg.seq_len)
        if cfg.objective == "lm":  # (L,): labels[t] = ids[t+1] inside the expression
            inside = ids[:-1] != pad_id(cfg.n_classes)
            labels[:-1] = torch.where(inside, ids[1:], labels[:-1])
        # mlm: the masked-LM corruption of training.data sets the labels
        return {"input_ids": ids, "labels": labels}
