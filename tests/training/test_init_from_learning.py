"""A learning test: ``train.init_from`` loads weights that help a fine-tune.

The shipped example's Mamba-2 classifier (examples/self_pretraining/scratch.yaml: ListOps
of depth <= 3, <= 3 arguments, 32 tokens; 150 steps of batch 32) is trained twice per
seed at equal steps: from a random initialisation, and with ``init_from`` a phase 1 of
the same model trained on the labels of shallower, shorter ListOps (depth <= 2, 16
tokens; phase1_supervised.yaml). The embedding, layers and final norm transfer, the
classifier head starts new. Validation loss at step 150 (256 fixed expressions, one
thread), scratch / init_from: seed 0 2.237 / 2.090, seed 1 2.281 / 2.169 (accuracy
0.199 / 0.246 and 0.176 / 0.223); phase 1 reached 2.099 and 2.209. Time: 40 s of CPU
for both seeds (the whole pytest process), 77 s wall at load average ~6.

Phase 1 is supervised on purpose. Self-pretraining proper (``objective: lm`` or ``mlm``
on the expressions alone) LOSES to scratch at this size: the values of ListOps are
uniform, so a language model learns to treat them alike and the fine-tune must undo it
(docs/self-pretraining.md has the table and the evidence). This test shows that
init_from loads what phase 1 learned and that it is used, not that self-pretraining
helps. Not a timing test: the budget is in optimizer steps.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mixstack

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "self_pretraining"
STEPS = 150


@pytest.mark.slow(budget_s=90)
@pytest.mark.parametrize("seed", [0, 1])
def test_init_from_a_related_task_beats_scratch_on_listops(
    fit_quietly, tmp_path: Path, seed: int
) -> None:
    once = [f"train.seed={seed}", f"train.val_every={STEPS}"]
    phase1 = mixstack.load_spec(EXAMPLES / "phase1_supervised.yaml", once)
    scratch = mixstack.load_spec(EXAMPLES / "scratch.yaml", once)
    init = mixstack.load_spec(
        EXAMPLES / "scratch.yaml", [*once, f"train.init_from={tmp_path / 'phase1'}"]
    )
    # the comparison is fair: one model, one task, one budget; only the start differs
    assert scratch.model == init.model == phase1.model
    assert scratch.train.model_copy(update={"init_from": None}) == scratch.train
    assert init.train.model_copy(update={"init_from": None}) == scratch.train
    task = scratch.train.task
    assert (task.type, task.max_depth, task.seq_len, scratch.train.max_steps) == (
        "listops",
        3,
        32,
        STEPS,
    )
    assert (phase1.train.task.max_depth, phase1.train.task.seq_len) == (2, 16)
    threads = torch.get_num_threads()
    # One thread: the tensors are small (32 x 32 x 32), so a second one gains little.
    torch.set_num_threads(1)
    try:
        first = fit_quietly(phase1, tmp_path / "phase1")
        assert first.status == "finished"
        base = fit_quietly(scratch, tmp_path / "scratch")
        tuned = fit_quietly(init, tmp_path / "init")
    finally:
        torch.set_num_threads(threads)
    assert base.step == tuned.step == STEPS
    # every tensor but the classifier head came from phase 1
    assert tuned.init_from is not None and base.init_from is None
    assert sorted(tuned.init_from["new_keys"]) == ["classifier.bias", "classifier.weight"]
    assert tuned.init_from["loaded"] > 0 and tuned.init_from["refused"] == 0
    loss = {"scratch": base.metrics["val/loss"], "init_from": tuned.metrics["val/loss"]}
    assert loss["init_from"] < loss["scratch"] - 0.05, loss
