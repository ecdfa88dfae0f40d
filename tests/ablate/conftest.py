"""Tiny grids for the ablate tests: a base spec that trains in a second or two."""

from __future__ import annotations

from pathlib import Path

import pytest

BASE = """\
model:
  vocab_size: 16
  max_seq_len: 32
  d_model: 16
  layers:
    pattern: "*-"
    symbols:
      "*": {type: attention, n_heads: 2}
      M: {type: mamba2, d_state: 4, headdim: 8, chunk_size: 16}
      "-": {type: mlp, hidden: 32}
train:
  task: {type: mqar, n_pairs: 2, seq_len: 16, val_size: 16}
  optimizer: {type: adamw, lr: 0.01}
  max_steps: 4
  batch_size: 4
  val_every: 2
  log_every: 1
"""


@pytest.fixture
def write_grid(tmp_path: Path):
    """``write_grid(text) -> path``: the grid YAML next to base.yaml in a fresh folder."""
    (tmp_path / "base.yaml").write_text(BASE)

    def write(text: str, name: str = "grid.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write
