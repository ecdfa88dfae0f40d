"""Losses and masked-LM corruption against explicit formulas (fp64, values and gradients)."""

from __future__ import annotations

import pytest
import torch

from mixstack.tasks.base import IGNORE_INDEX
from mixstack.training.losses import compute_loss, mask_tokens, next_token_labels, objective_for


def _reference_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean of -log softmax(logits)[label] over non-ignored targets, by an explicit loop."""
    flat, targets = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    terms = []
    for row, y in zip(flat, targets, strict=True):
        if int(y) != IGNORE_INDEX:
            terms.append(torch.log(torch.exp(row).sum()) - row[int(y)])
    return torch.stack(terms).mean()


@pytest.mark.parametrize(
    ("objective", "shape"),
    [("next_token", (3, 7, 11)), ("masked_lm", (2, 5, 9)), ("classification", (6, 4))],
)
def test_loss_and_gradient_match_the_formula(objective: str, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(shape, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.randint(shape[-1], shape[:-1], generator=g)
    labels.view(-1)[::3] = IGNORE_INDEX
    ours = compute_loss(objective, logits, labels)
    (grad_ours,) = torch.autograd.grad(ours, logits)
    ref = _reference_ce(logits, labels)
    (grad_ref,) = torch.autograd.grad(ref, logits)
    assert torch.allclose(ours.double(), ref, atol=1e-6, rtol=1e-6)
    assert torch.allclose(grad_ours, grad_ref, atol=1e-7)
    assert torch.all(grad_ours.reshape(-1, shape[-1])[::3] == 0)  # ignored rows get no gradient


def test_wrong_shapes_are_refused_with_the_shapes() -> None:
    with pytest.raises(
        ValueError, match=r"classification loss needs logits of rank 2.*\(2, 3, 4\)"
    ):
        compute_loss("classification", torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long))


def test_objective_per_arch() -> None:
    assert [objective_for(a) for a in ("causal_lm", "encoder", "classifier")] == [
        "next_token",
        "masked_lm",
        "classification",
    ]


def test_next_token_labels_shift_and_stop_at_document_boundaries() -> None:
    ids = torch.tensor([[5, 6, 7, 8, 9, 1]])
    seq_idx = torch.tensor([[0, 0, 1, 1, 1, -1]])
    labels = next_token_labels(ids, seq_idx)
    expected = []
    for t in range(6):
        ok = t + 1 < 6 and seq_idx[0, t + 1] == seq_idx[0, t] and seq_idx[0, t + 1] >= 0
        expected.append(int(ids[0, t + 1]) if ok else IGNORE_INDEX)
    assert labels[0].tolist() == expected == [6, -100, 8, 9, -100, -100]
    assert next_token_labels(ids)[0].tolist() == [6, 7, 8, 9, 1, -100]


def test_mask_tokens_rate_labels_and_reproducibility() -> None:
    ids = torch.randint(10, (64, 50), generator=torch.Generator().manual_seed(1))
    maskable = torch.ones_like(ids, dtype=torch.bool)
    maskable[:, :5] = False
    out, labels = mask_tokens(
        ids,
        mask_rate=0.25,
        mask_id=99,
        generator=torch.Generator().manual_seed(2),
        maskable=maskable,
    )
    chosen = out == 99
    assert torch.equal(chosen, labels != IGNORE_INDEX)
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(out[~chosen], ids[~chosen])
    assert not chosen[:, :5].any()
    rate = chosen[:, 5:].float().mean().item()
    assert abs(rate - 0.25) < 0.03
    again, _ = mask_tokens(
        ids,
        mask_rate=0.25,
        mask_id=99,
        generator=torch.Generator().manual_seed(2),
        maskable=maskable,
    )
    assert torch.equal(out, again)


def test_mask_tokens_scores_at_least_one_position_per_row() -> None:
    ids = torch.arange(12).reshape(3, 4)
    out, labels = mask_tokens(
        ids, mask_rate=1e-6, mask_id=50, generator=torch.Generator().manual_seed(0)
    )
    assert ((labels != IGNORE_INDEX).sum(dim=1) == 1).all()
    assert ((out == 50).sum(dim=1) == 1).all()


def test_loss_with_nothing_scored_and_a_second_backward() -> None:
    """No scored target: loss 0 with a zero gradient; the loss's backward consumes its
    buffer, so a second backward (retain_graph) is refused by name, not miscomputed."""
    logits = torch.randn(2, 3, 5, requires_grad=True)
    labels = torch.full((2, 3), IGNORE_INDEX)
    loss = compute_loss("next_token", logits, labels)
    (grad,) = torch.autograd.grad(loss, logits)
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))
    labels[0, 0] = 4
    loss = compute_loss("next_token", logits, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="differentiated twice"):
        loss.backward()


def test_fp32_loss_and_gradient_match_torch_cross_entropy_at_a_wide_vocabulary() -> None:
    g = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(2, 33, 4096, generator=g)).requires_grad_()
    labels = torch.randint(4096, (2, 33), generator=g)
    labels[:, -1] = IGNORE_INDEX
    ours = compute_loss("next_token", logits, labels)
    (g_ours,) = torch.autograd.grad(ours, logits)
    ref = torch.nn.functional.cross_entropy(
        logits.reshape(-1, 4096), labels.reshape(-1), ignore_index=IGNORE_INDEX
    )
    (g_ref,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-9)
