"""Contracts 4 and 5: packed equals separate, padding is inert, odd shapes and batches.

Documents concatenated with ``seq_idx`` give the outputs each gets alone; positions
marked -1 may hold anything without changing real tokens. Batched rows are computed
independently, and a causal mixer's prefix outputs do not depend on the total length
(which catches padding to chunk sizes that leaks).
"""

from __future__ import annotations

import pytest
import torch


def alone(case, module, x, ids):
    with torch.no_grad():
        return case.run(module, x, ids)


def piece(t, rows: int | slice, start: int, stop: int):
    """Rows (an int keeps the batch axis) and positions [start, stop) of t, or None."""
    if t is None:
        return None
    rows = slice(rows, rows + 1) if isinstance(rows, int) else rows
    return t[rows, start:stop]


# Per row: (document id, length) runs; -1 is padding. Lengths are odd / non powers of 2.
LAYOUTS = {
    "two-docs": [[(0, 5), (1, 8)]],
    "batch-mixed": [[(0, 7), (1, 3), (2, 3)], [(5, 1), (6, 9), (7, 3)]],
    "padding": [[(-1, 3), (0, 6), (1, 4)], [(2, 7), (3, 2), (-1, 4)]],
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_packed_equals_separate(case, layout: str, near) -> None:
    rows = LAYOUTS[layout]
    length = sum(n for _, n in rows[0])
    module = case.build()
    x, ids = case.inputs(len(rows), length, seed=11)
    seq_idx = torch.tensor([[sid for sid, n in row for _ in range(n)] for row in rows])
    # padding holds garbage: large values that would show if they leaked
    x = torch.where((seq_idx < 0)[..., None], 1e3 * torch.ones_like(x), x)
    with torch.no_grad():
        packed = case.run(module, x, ids, seq_idx=seq_idx)
    for b, row in enumerate(rows):
        start = 0
        for sid, n in row:
            if sid >= 0:
                want = alone(
                    case, module, piece(x, b, start, start + n), piece(ids, b, start, start + n)
                )
                near(packed[b : b + 1, start : start + n], want, 1e-9, f"row {b} doc {sid}")
            start += n


@pytest.mark.parametrize("length", [1, 7, 33])
def test_batch_rows_are_independent(case, length: int, near) -> None:
    module = case.build()
    x, ids = case.inputs(3, length, seed=length)
    with torch.no_grad():
        batched = case.run(module, x, ids)
    for b in range(3):
        near(
            batched[b : b + 1],
            alone(case, module, x[b : b + 1], piece(ids, b, 0, length)),
            1e-9,
            f"row {b}",
        )


@pytest.mark.parametrize("prefix", [1, 6, 17])
def test_causal_prefix_does_not_depend_on_total_length(causal_case, prefix: int, near) -> None:
    case = causal_case
    module = case.build()
    x, ids = case.inputs(2, 33, seed=prefix)
    with torch.no_grad():
        full = case.run(module, x, ids)
        part = case.run(module, x[:, :prefix], piece(ids, slice(None), 0, prefix))
    near(part, full[:, :prefix], 1e-9, f"first {prefix} of 33")
