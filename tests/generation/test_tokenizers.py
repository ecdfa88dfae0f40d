"""Tokenizers at inference: byte-level decoding with partial UTF-8 while streaming, and a
model directory's tokenizer.json (built here with the tokenizers library)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mixstack.archs.builder import build
from mixstack.dsl.errors import CheckpointError
from mixstack.dsl.spec import ModelSpec
from mixstack.generation.decoding import TextStreamer, generate
from mixstack.generation.tokenizers import ByteTokenizer, HFTokenizer, tokenizer_for
from mixstack.hub.modeldir import load_tokenizer, save_model_dir

TEXT = "aé€😀 b\u0301!"  # 1-, 2-, 3- and 4-byte characters and a combining accent


def spec(vocab_size: int = 256) -> ModelSpec:
    return ModelSpec.model_validate(
        {
            "vocab_size": vocab_size,
            "max_seq_len": 64,
            "d_model": 16,
            "layers": {
                "pattern": "M-",
                "symbols": {
                    "M": {"type": "mamba2", "d_state": 8, "headdim": 8, "chunk_size": 8},
                    "-": {"type": "mlp", "hidden": 32},
                },
            },
        }
    )


def test_byte_stream_holds_back_partial_characters() -> None:
    tok = ByteTokenizer.for_spec(spec())
    ids = tok.encode(TEXT)
    assert ids == list(TEXT.encode("utf-8"))
    stream = tok.stream()
    pieces = [stream.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    # a piece appears exactly when a character's last byte arrives
    ends = [i for i, p in enumerate(pieces) if p]
    bounds, total = [], 0
    for ch in TEXT:
        total += len(ch.encode("utf-8"))
        bounds.append(total - 1)
    assert ends == bounds
    assert "".join(pieces) + stream.flush() == TEXT


def test_byte_decoding_skips_specials_and_replaces_broken_bytes() -> None:
    tok = ByteTokenizer.for_spec(spec())
    eos = spec().special_ids["eos"]
    assert tok.eos_token_id == eos == 258
    assert tok.decode([*tok.encode("hé"), eos]) == "hé"
    stream = tok.stream()
    assert stream.push(0xE2) == "" and stream.push(0x82) == ""
    assert stream.push(eos) == ""
    assert stream.flush() == "\ufffd"  # an incomplete character at the end
    assert tok.decode([0xFF, 0x41]) == "\ufffdA"


def train_bpe(folder: Path, eos: str | None = "<eos>") -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=290,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<eos>"],
        show_progress=False,
    )
    tok.train_from_iterator(["hello world", "hello there", "the world is wide"] * 20, trainer)
    path = folder / "tokenizer.json"
    tok.save(str(path))
    if eos is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos}))
    return path


def test_tokenizer_json_streams_whole_characters(tmp_path: Path) -> None:
    tok = HFTokenizer.from_file(train_bpe(tmp_path))
    text = f"hello world {TEXT} the"
    ids = tok.encode(text)
    assert len(ids) < len(text.encode("utf-8"))  # merges happened
    assert tok.decode(ids) == text
    stream = tok.stream()
    pieces = [stream.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + stream.flush() == text
    assert tok.eos_token_id == 0  # the first special token, named by tokenizer_config.json


def test_model_directory_tokenizer(tmp_path: Path) -> None:
    model = build(spec(300), seed=0)
    folder = save_model_dir(model, tmp_path / "model")
    assert load_tokenizer(folder) is None  # 300 ids are not bytes, and no tokenizer.json
    train_bpe(folder)
    tok = load_tokenizer(folder)
    assert isinstance(tok, HFTokenizer)
    byte_dir = save_model_dir(build(spec(), seed=0), tmp_path / "bytes")
    assert isinstance(load_tokenizer(byte_dir), ByteTokenizer)


def test_tokenizer_that_does_not_fit_the_model_is_refused(tmp_path: Path) -> None:
    path = train_bpe(tmp_path)
    size = HFTokenizer.from_file(path).vocab_size
    assert 256 < size <= 290
    with pytest.raises(
        CheckpointError, match=rf"has {size} tokens but the model reads ids 0\.\.259"
    ):
        tokenizer_for(spec(), path)
    path.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"not a valid tokenizer\.json"):
        tokenizer_for(spec(300), path)


def test_streamer_and_stop_strings_with_a_tokenizer() -> None:
    model = build(spec(), seed=0, dtype=torch.float64).eval()
    tok = ByteTokenizer.for_spec(spec())
    ids = torch.tensor([tok.encode("hello")])
    kwargs = {"max_new_tokens": 24, "temperature": 1.0, "seed": 2, "eos_token_id": []}
    free = generate(model, ids, tokenizer=tok, **kwargs)
    text = free.texts[0]
    assert text == tok.decode(free.new_tokens[0].tolist())
    # a streamer sees every token and writes the same text, whole characters only
    seen, written = [], []

    class Recorder:
        def put(self, token_id: int) -> None:
            seen.append(token_id)

        def end(self) -> None:
            seen.append("end")

    generate(model, ids, streamer=Recorder(), **kwargs)
    assert seen == [*free.new_tokens[0].tolist(), "end"]
    generate(model, ids, streamer=TextStreamer(tok, written.append), **kwargs)
    assert "".join(written) == text
    # a stop string ends the row at the token that completes it
    raw = free.new_tokens[0].tolist()
    # an ASCII stop string: bytes.decode of a prefix shows it exactly when streaming does
    at = next(i for i in range(3, len(raw)) if raw[i] < 128)
    stop = chr(raw[at])
    first = min(i for i in range(len(raw)) if stop in tok.decode(raw[: i + 1]))
    out = generate(model, ids, tokenizer=tok, stop_strings=[stop], **kwargs)
    assert out.stop_reasons == ["stop_string"]
    assert out.lengths.tolist() == [first + 1]
    assert out.new_tokens[0, : first + 1].tolist() == raw[: first + 1]
    assert out.texts[0].endswith(stop)
