"""`mixstack generate`: streamed text equals generate(), --verbose reports state memory,
errors are one red line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mixstack.archs.builder import build
from mixstack.cli.main import app
from mixstack.dsl.spec import ModelSpec
from mixstack.generation.decoding import generate
from mixstack.generation.tokenizers import ByteTokenizer
from mixstack.hub.modeldir import save_model_dir

runner = CliRunner()


def spec(vocab_size: int = 256, max_seq_len: int = 16) -> ModelSpec:
    return ModelSpec.model_validate(
        {
            "vocab_size": vocab_size,
            "max_seq_len": max_seq_len,
            "d_model": 16,
            "layers": {
                "pattern": "M*-",
                "symbols": {
                    "M": {"type": "mamba2", "d_state": 8, "headdim": 8, "chunk_size": 8},
                    "*": {"type": "attention", "n_heads": 2, "window": 4},
                    "-": {"type": "mlp", "hidden": 32},
                },
            },
        }
    )


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return save_model_dir(build(spec(), seed=0), tmp_path / "model")


def test_generate_streams_what_generate_returns(model_dir: Path) -> None:
    args = ["--prompt", "héllo", "--max-new-tokens", "40", "--temperature", "0.9"]
    result = runner.invoke(app, ["generate", str(model_dir), *args, "--seed", "3", "--top-k", "50"])
    assert result.exit_code == 0, result.output
    model = build(spec(), seed=0).eval()
    tok = ByteTokenizer.for_spec(model.spec)
    want = generate(
        model,
        torch.tensor([tok.encode("héllo")]),
        max_new_tokens=40,  # 46 tokens: past max_seq_len 16, every state is bounded
        temperature=0.9,
        top_k=50,
        seed=3,
        tokenizer=tok,
    )
    assert result.stdout == want.texts[0] + "\n"


def test_verbose_reports_the_state_memory(model_dir: Path) -> None:
    args = ["generate", str(model_dir), "--prompt", "ab", "--max-new-tokens", "5", "--verbose"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    model = build(spec(), seed=0)
    nbytes = model.init_state(1, 6).nbytes()
    assert f"decode state: {nbytes / 1024:.1f} KiB (bounded: constant in context length)" in (
        result.stderr
    )
    assert "prompt 2 tokens, generated 5 (stop: length)" in result.stderr
    assert "ms/token" in result.stderr
    assert "attention x1:" in result.stderr


def test_errors_are_one_line(tmp_path: Path, model_dir: Path) -> None:
    result = runner.invoke(app, ["generate", str(model_dir), "--prompt", ""])
    assert result.exit_code == 1
    assert "error: the prompt is empty" in result.stderr
    ids_only = save_model_dir(build(spec(vocab_size=40), seed=0), tmp_path / "ids")
    result = runner.invoke(app, ["generate", str(ids_only), "--prompt", "x"])
    assert result.exit_code == 1
    assert "has no tokenizer.json and its vocabulary (40 ids) is not the 256 bytes" in (
        result.stderr
    )
    result = runner.invoke(app, ["generate", str(tmp_path / "nope"), "--prompt", "x"])
    assert result.exit_code == 1 and "error" in result.stderr.lower()
    full = spec().model_dump()
    full["layers"]["symbols"]["*"]["window"] = None
    folder = save_model_dir(build(ModelSpec.model_validate(full), seed=0), tmp_path / "full")
    result = runner.invoke(app, ["generate", str(folder), "--prompt", "x" * 10])
    assert result.exit_code == 1
    assert "exceeds max_seq_len 16" in result.stderr
    assert "layer 1 (symbol '*', type 'attention')" in result.stderr
