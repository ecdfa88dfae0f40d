"""Byte-level BPE training and token shards: the round trip (acceptance of issue 16),
dtype choice, multi-file shards, and each bad input as a clear error with nothing written.

References are independent of :class:`mixstack.data.shards.TokenShards`: shard files are
read here with ``int.from_bytes`` on their raw bytes, and documents are decoded with the
``tokenizers`` library's own ``Tokenizer``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mixstack.cli.main import app
from mixstack.data.bpe import train_bpe
from mixstack.data.shards import ShardError, TokenShards, dtype_for, prepare_shards
from mixstack.dsl.errors import MixstackError

runner = CliRunner()

# ASCII, Latin accents, Greek, CJK, emoji (4-byte UTF-8), a combining mark, NUL, CR LF, tab
ALPHABET = list("abcdefgh ijk  the cat") + list("éüßñ") + list("αβγ") + list("日本語")
ALPHABET += ["🎉", "👩‍💻", "e\u0301", "\x00", "\r\n", "\t", "\n"]

SPEC = """\
model:
  arch: causal_lm
  vocab_size: 256
  special_tokens: [eos]
  max_seq_len: 64
  d_model: 16
  layers: {{pattern: "A", symbols: {{A: {{type: attention, n_heads: 2}}}}}}
train:
  task: {{type: text, seq_len: 16, files: {files}, documents: file}}
  max_steps: 1
"""


def make_corpus(folder: Path, n: int = 12, seed: int = 0) -> list[Path]:
    """``n`` files of random Unicode text; files 0 and 5 are empty documents."""
    rng = random.Random(seed)
    paths = []
    for i in range(n):
        text = "" if i in (0, 5) else "".join(rng.choices(ALPHABET, k=rng.randint(1, 400)))
        path = folder / f"doc{i:02d}.txt"
        path.write_bytes(text.encode("utf-8"))  # bytes: no newline translation
        paths.append(path)
    return paths


def raw_stream(folder: Path) -> list[int]:
    """The token stream from the shard files' bytes alone (little-endian, manifest dtype)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    width = {"uint16": 2, "uint32": 4}[manifest["dtype"]]
    out = []
    for shard in manifest["shards"]:
        data = (folder / shard["file"]).read_bytes()
        out += [int.from_bytes(data[i : i + width], "little") for i in range(0, len(data), width)]
    return out


def test_bpe_shards_round_trip_byte_for_byte(tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    files = make_corpus(tmp_path)
    result = runner.invoke(
        app,
        [
            "tokenizer",
            "train",
            *map(str, files),
            "--vocab-size",
            "300",
            "--out",
            str(tmp_path / "tok"),
        ],
    )
    assert result.exit_code == 0, result.output
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.format(files=json.dumps([str(p) for p in files])))
    out = tmp_path / "shards"
    result = runner.invoke(
        app, ["data", "prepare", str(spec), "--out", str(out), "--tokenizer", str(tmp_path / "tok")]
    )
    assert result.exit_code == 0, result.output

    reference = Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    eos = reference.token_to_id("<eos>")
    assert (eos, reference.token_to_id("<pad>"), reference.token_to_id("<bos>")) == (2, 0, 1)
    stream = raw_stream(out)
    # the stream is the documents, each ended by eos: split it at eos and decode
    pieces, current = [], []
    for token in stream:
        if token == eos:
            pieces.append(current)
            current = []
        else:
            current.append(token)
    assert current == []
    # empty files are dropped (as the text task's own file reader drops them)
    everything = [p.read_bytes() for p in files]
    kept = [i for i, data in enumerate(everything) if data]
    sources = [everything[i] for i in kept]
    assert len(kept) == len(files) - 2
    assert len(pieces) == len(sources)
    for ids, source in zip(pieces, sources, strict=True):
        assert reference.decode(ids, skip_special_tokens=True).encode("utf-8") == source
    # BPE merged something: fewer tokens than bytes
    assert len(stream) - len(sources) < sum(map(len, sources))

    shards = TokenShards(out)
    assert shards.manifest["dtype"] == "uint16"
    assert shards.tokenizer["eos_id"] == eos
    assert [int(t) for t in shards.tokens(0, len(shards))] == stream
    for d, source in enumerate(sources):
        ids = [int(t) for t in shards.document(d)]
        assert ids == [*pieces[d], eos]
        assert int(shards.table[d, 2]) == len(source)  # bytes per document
        assert int(shards.table[d, 3]) == kept[d]  # source file
    assert [s["documents"] for s in shards.manifest["sources"]] == [
        int(bool(x)) for x in everything
    ]
    manifest = shards.manifest
    import hashlib

    want = hashlib.sha256((tmp_path / "tok" / "tokenizer.json").read_bytes()).hexdigest()
    assert manifest["tokenizer"]["sha256"] == want
    assert [s["sha256"] for s in manifest["sources"]] == [
        hashlib.sha256(s).hexdigest() for s in everything
    ]


def test_shard_files_split_anywhere_give_the_same_stream(tmp_path: Path) -> None:
    files = make_corpus(tmp_path, n=5, seed=1)
    one = prepare_shards(files, tmp_path / "one", special_ids={"eos": 256})
    many = prepare_shards(files, tmp_path / "many", special_ids={"eos": 256}, shard_tokens=7)
    # byte-level: the stream is each file's bytes then 256
    want = [t for p in files if p.read_bytes() for t in [*p.read_bytes(), 256]]
    assert raw_stream(one) == want
    assert raw_stream(many) == want
    manifest = json.loads((many / "manifest.json").read_text())
    assert [s["tokens"] for s in manifest["shards"]][:-1] == [7] * (len(manifest["shards"]) - 1)
    shards = TokenShards(many)
    assert [int(t) for t in shards.tokens(3, 30)] == want[3:30]  # crosses shard files


def test_dtype_is_uint32_from_65536_ids(tmp_path: Path) -> None:
    assert (dtype_for(65_535), dtype_for(65_536)) == ("uint16", "uint32")
    (tmp_path / "a.txt").write_text("hi")
    # a byte-level spec with vocab_size 65_536 numbers eos 65_536: ids need 32 bits
    out = prepare_shards([tmp_path / "a.txt"], tmp_path / "s", special_ids={"eos": 65_536})
    assert json.loads((out / "manifest.json").read_text())["dtype"] == "uint32"
    assert raw_stream(out) == [104, 105, 65_536]
    assert (out / "shard-00000.bin").stat().st_size == 12


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_missing_file_and_empty_corpus_write_nothing(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(MixstackError, match=r"train.task.files\[1\]: '.*nope.txt' is not a file"):
        prepare_shards([tmp_path / "empty.txt", tmp_path / "nope.txt"], tmp_path / "out")
    with pytest.raises(ShardError, match="has no documents"):
        prepare_shards([tmp_path / "empty.txt"], tmp_path / "out")
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    with pytest.raises(ShardError, match="has no documents"):
        prepare_shards([tmp_path / "blank.txt"], tmp_path / "out", documents="paragraph")
    assert not (tmp_path / "out").exists()
    assert _leftovers(tmp_path) == []


def test_truncated_shard_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello world")
    out = prepare_shards([tmp_path / "a.txt"], tmp_path / "s", shard_tokens=4)
    assert len(TokenShards(out)) == 11
    shard = out / "shard-00001.bin"
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(
        ShardError,
        match=r"shard-00001.bin: has 7 bytes but the manifest says 4 tokens = 8 bytes.*truncated",
    ):
        TokenShards(out)
    shard.unlink()
    with pytest.raises(ShardError, match=r"shard-00001.bin: is missing"):
        TokenShards(out)


def test_existing_folders_are_kept_unless_overwrite(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("one")
    (tmp_path / "b.txt").write_text("two!")
    out = prepare_shards([tmp_path / "a.txt"], tmp_path / "s")
    with pytest.raises(ShardError, match="already holds shards; pass --overwrite"):
        prepare_shards([tmp_path / "b.txt"], out)
    assert raw_stream(out) == list(b"one")
    prepare_shards([tmp_path / "b.txt"], out, overwrite=True)
    assert raw_stream(out) == list(b"two!")
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ShardError, match="holds no shards; refusing"):
        prepare_shards([tmp_path / "a.txt"], other, overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"
    assert _leftovers(tmp_path) == []


def test_tokenizer_train_errors(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("abc")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    with pytest.raises(MixstackError, match="--vocab-size 258 is below 259"):
        train_bpe([tmp_path / "a.txt"], 258, tmp_path / "tok")
    with pytest.raises(MixstackError, match=r"files\[1\]: '.*latin1.txt' is not UTF-8 text"):
        train_bpe([tmp_path / "a.txt", tmp_path / "latin1.txt"], 300, tmp_path / "tok")
    result = runner.invoke(
        app,
        [
            "tokenizer",
            "train",
            str(tmp_path / "no.txt"),
            "--vocab-size",
            "300",
            "--out",
            str(tmp_path / "tok"),
        ],
    )
    assert result.exit_code == 1
    assert "no.txt' is not a file" in result.output
    assert not (tmp_path / "tok").exists()


def test_prepare_cli_refuses_a_non_text_task(tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "prepare", "zoo:mqar-tiny", "--out", str(tmp_path / "s")])
    assert result.exit_code == 1
    assert "data prepare reads a text task, got type 'mqar'" in result.output
    assert not (tmp_path / "s").exists()
