"""Bits per byte: how many bytes of text each target token stands for, and the metric.

Bits per byte compares language models across tokenizers: the summed next-token
negative log-likelihood (nats) divided by ``ln 2`` times the UTF-8 bytes of the text
those targets spell (special tokens spell none)::

    bits_per_byte = Σ_t NLL_t / (ln 2 · Σ_t bytes(target_t))

Both sums run over the scored targets of every validation batch (accumulated, not a
mean of per-batch ratios), so the value is exact for the whole validation text; ``eos``
targets count in the numerator (coding a text includes coding where its documents end)
and spell 0 bytes. Token-level perplexity is the general ``ppl`` metric over the same
targets, so ``bits_per_byte · ln 2 · bytes = ln(ppl) · targets``.

A token's bytes: the byte tokenizer's ids 0..255 are one byte each. A byte-level BPE
(GPT-2's scheme, what ``mixstack tokenizer train`` writes) spells every byte as one
printable character, so each vocabulary entry maps back to a definite byte string and
the bytes of a token sequence add up to the UTF-8 length of the text it decodes to.
For other tokenizers (SentencePiece-style ``▁`` words, WordPiece ``##``) the entry's
text with ``▁`` read as a space is used: exact when decoding only concatenates pieces,
approximate where the decoder drops a leading space.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import torch
from torch import Tensor

from mixstack.dsl.registry import MetricDef
from mixstack.tasks.base import IGNORE_INDEX

#: The sample key holding the bytes of each position's target (0 where none is scored).
TARGET_BYTES = "target_bytes"
_BYTE_FALLBACK = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable character -> the byte it spells.

    Bytes that print as themselves (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) keep their
    code point; the others (controls, space, ...) take code points 256, 257, ... in
    byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    kept = set(keep)
    out = {chr(b): b for b in keep}
    extra = 0
    for b in range(256):
        if b not in kept:
            out[chr(256 + extra)] = b
            extra += 1
    return out


def byte_table(size: int) -> Tensor:
    """``(size,)`` int64 for the byte tokenizer: ids 0..255 are one byte, specials none."""
    table = torch.zeros(size, dtype=torch.long)
    table[: min(size, 256)] = 1
    return table


def tokenizer_table(tokenizer: Any, size: int) -> Tensor:
    """``(size,)`` int64: the UTF-8 bytes each id of a ``tokenizers`` tokenizer spells
    (``tokenizer``: a ``tokenizers.Tokenizer``, or mixstack's wrapper holding one);
    special tokens and ids beyond the vocabulary spell 0."""
    raw = getattr(tokenizer, "_tokenizer", tokenizer)  # HFTokenizer wraps the library's object
    data = json.loads(raw.to_str())
    model = data.get("model") or {}
    vocab: dict[str, int] = model.get("vocab") or {}
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...] in id order
        vocab = {piece: i for i, (piece, _) in enumerate(vocab)}
    byte_level = _is_byte_level(data)
    alphabet = byte_level_alphabet()
    table = torch.zeros(size, dtype=torch.long)
    for token, i in vocab.items():
        if 0 <= i < size:
            table[i] = _entry_bytes(token, byte_level, alphabet)
    for added in data.get("added_tokens") or []:
        i = int(added["id"])
        if 0 <= i < size:
            table[i] = 0 if added.get("special") else len(added["content"].encode("utf-8"))
    return table


def _is_byte_level(data: dict[str, Any]) -> bool:
    decoder = data.get("decoder") or {}
    kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders") or []]
    return "ByteLevel" in kinds


def _entry_bytes(token: str, byte_level: bool, alphabet: dict[str, int]) -> int:
    if byte_level and all(c in alphabet for c in token):
        return len(token)  # one printable character per byte
    if _BYTE_FALLBACK.match(token):
        return 1
    return len(token.replace("▁", " ").removeprefix("##").encode("utf-8"))


def target_bytes(labels: Tensor, table: Tensor) -> Tensor:
    """``labels (L,)`` -> ``(L,)`` int64: bytes of each scored target, 0 where ignored."""
    scored = labels != IGNORE_INDEX
    return torch.where(scored, table[labels.clamp(min=0)], torch.zeros_like(labels))


def nll_and_bytes(logits: Tensor, labels: Tensor, nbytes: Tensor) -> tuple[Tensor, Tensor]:
    """``logits (B, L, V)``, ``labels (B, L)``, ``nbytes (B, L)`` -> the batch's summed NLL in
    nats over scored targets and the bytes those targets spell (both scalars, fp64)."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    nll = torch.nn.functional.cross_entropy(
        flat, labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return nll.double(), nbytes.sum().double()


def _ratio_metric(n_out: int) -> Any:
    """A torchmetrics metric summing (NLL, bytes) over batches (and processes, under DDP)."""
    from torchmetrics import Metric

    class BitsPerByte(Metric):
        full_state_update = False

        def __init__(self) -> None:
            super().__init__()
            self.add_state("nll", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state("nbytes", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

        def update(self, nll: Tensor, nbytes: Tensor) -> None:
            self.nll += nll.to(self.nll)
            self.nbytes += nbytes.to(self.nbytes)

        def compute(self) -> Tensor:
            return self.nll / (math.log(2) * self.nbytes)

    return BitsPerByte()


BITS_PER_BYTE = MetricDef(
    name="bits_per_byte",
    higher_is_better=False,
    description="Σ NLL (nats) / (ln 2 · UTF-8 bytes of the scored targets, specials excluded)",
    factory=_ratio_metric,
    prepare=nll_and_bytes,
    archs=("causal_lm",),
    sample_keys=(TARGET_BYTES,),
)
