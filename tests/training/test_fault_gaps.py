"""Fast tests for faults the slower suites caught late or not at all: padding labels and
the gradient of an accumulated step."""

from __future__ import annotations

from pathlib import Path

import torch

import mixstack
from mixstack.tasks import make_task
from mixstack.tasks.base import IGNORE_INDEX
from mixstack.training.losses import compute_loss, next_token_labels


def _reference_labels(ids: torch.Tensor, seq_idx: torch.Tensor) -> torch.Tensor:
    """By a loop: position t predicts ids[t+1] iff t+1 is in the same real document."""
    out = torch.full_like(ids, IGNORE_INDEX)
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            same = int(seq_idx[b, t + 1]) == int(seq_idx[b, t])
            if same and int(seq_idx[b, t + 1]) >= 0:
                out[b, t] = ids[b, t + 1]
    return out


def test_no_label_on_padding_followed_by_padding() -> None:
    ids = torch.arange(1, 17).reshape(2, 8)
    seq_idx = torch.tensor(
        [
            [0, 0, 0, -1, -1, -1, 1, 1],  # pad run inside a row, then a document
            [-1, -1, 0, 0, 1, -1, -1, -1],  # leading and trailing pad runs
        ]
    )
    labels = next_token_labels(ids, seq_idx)
    assert torch.equal(labels, _reference_labels(ids, seq_idx))
    pad_pad = (seq_idx[:, :-1] < 0) & (seq_idx[:, 1:] < 0)
    assert pad_pad.sum() == 5 and (labels[:, :-1][pad_pad] == IGNORE_INDEX).all()
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        seq = torch.randint(-1, 2, (3, 9), generator=generator)
        tokens = torch.randint(0, 50, (3, 9), generator=generator)
        assert torch.equal(next_token_labels(tokens, seq), _reference_labels(tokens, seq))


def test_an_accumulated_step_applies_the_gradient_of_the_global_batch_mean(
    tiny_spec, fit_quietly, tmp_path: Path
) -> None:
    """One step of plain SGD over 2 micro-batches moves every weight by -lr times the
    gradient of the mean loss over the whole global batch (computed here in one pass), not
    by half of it (the loss divided by accumulate_grad_batches twice) nor twice it."""
    lr = 0.5
    spec = tiny_spec(
        "model.dropout=0",
        "train.max_steps=1",
        "train.grad_clip=null",
        f"train.optimizer={{type: sgd, lr: {lr}, momentum: 0.0}}",
        "train.schedule={type: constant, warmup_steps: 0}",
    )
    assert spec.train.accumulate_grad_batches == 2
    result = fit_quietly(spec, tmp_path / "run")
    trained = mixstack.from_pretrained(result.model_dir)
    model = mixstack.build(spec, seed=spec.train.seed)
    task = make_task(spec.train, spec.model)
    batch = [task.sample("train", 0, i) for i in range(spec.train.batch_size)]
    ids = torch.stack([b["input_ids"] for b in batch])
    labels = torch.stack([b["labels"] for b in batch])
    compute_loss("next_token", model(ids), labels).backward()
    moved = 0
    for name, p in model.named_parameters():
        expected = p.detach() - lr * p.grad
        got = trained.get_parameter(name)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=name)
        half = p.detach() - 0.5 * lr * p.grad
        moved += int(not torch.allclose(got, half, rtol=1e-5, atol=1e-6))
    assert moved > 0  # the check tells the right step from half of it
