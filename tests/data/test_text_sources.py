"""`train.task.sources`: text, JSON lines and Parquet files mixed by weight, with a
validation split carved by document hash or given as `val_sources`. Rows are checked
against a reference stream and sampler written here (documents read with json /
pandas, the carve from hashlib, the source drawn from the task's (seed, step, index)
generator), from memory and from `data prepare` shards alike; bad input is refused
with nothing written."""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import Any

import pytest
import torch

import mixstack
from mixstack.data.corpus import prepare_corpus
from mixstack.dsl.errors import MixstackError, SpecError
from mixstack.tasks import make_task
from mixstack.tasks.base import IGNORE_INDEX
from tests.support.text_corpus import tiny_mlp_lm

WORDS = ["the", "cat", "sat", "café", "日本", "🎉", "on", "mat", "\r\n", " ", "\n"]
EOS = 256
SEQ = 12


def _text(rng: random.Random, k: int) -> str:
    return " ".join(rng.choices(WORDS, k=k))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import pandas as pd

    root = tmp_path_factory.mktemp("sources")
    rng = random.Random(5)
    # a text file read by paragraphs, a JSON lines file (with an empty row and a row
    # without the field), a Parquet file; a second JSON lines file for validation
    paragraphs = [_text(rng, rng.randint(5, 30)) for _ in range(30)]
    (root / "a.txt").write_bytes("\n\n".join(paragraphs).encode("utf-8"))
    rows = [{"text": _text(rng, rng.randint(5, 30)), "id": i} for i in range(40)]
    rows[3]["text"] = ""
    del rows[7]["text"]
    (root / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    table = [_text(rng, rng.randint(5, 30)) for _ in range(30)]
    pd.DataFrame({"body": table, "n": range(30)}).to_parquet(root / "c.parquet")
    val = [{"text": _text(rng, 20)} for _ in range(6)]
    (root / "v.jsonl").write_text("\n".join(json.dumps(r) for r in val) + "\n", encoding="utf-8")
    docs = {
        # paragraphs: blank-line separated (a line of spaces or \r counts as blank)
        0: [p.strip() for p in re.split(r"\n[ \t\r]*\n", "\n\n".join(paragraphs)) if p.strip()],
        1: [r["text"] for r in rows if r.get("text")],
        2: table,
        "val": [r["text"] for r in val],
    }
    return {"root": root, "docs": docs}


def _sources(root: Path, weights: list[float | None]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        {"path": str(root / "a.txt")},
        {"path": str(root / "b.jsonl")},
        {"path": str(root / "c.parquet"), "text_field": "body"},
    ]
    for source, weight in zip(out, weights, strict=True):
        if weight is not None:
            source["weight"] = weight
    return out


def _spec(task: dict[str, Any]) -> Any:
    model = {
        "vocab_size": 256,
        "special_tokens": ["eos"],
        "max_seq_len": 32,
        "d_model": 16,
        "layers": {"pattern": "-", "symbols": {"-": {"type": "mlp", "hidden": 16}}},
    }
    base = {"type": "text", "seq_len": SEQ, "documents": "paragraph", "val_size": 3}
    return mixstack.load_spec({"model": model, "train": {"task": {**base, **task}, "max_steps": 1}})


def _carved(text: str, fraction: float) -> bool:
    return int(hashlib.sha256(text.encode()).hexdigest()[:16], 16) < fraction * 2**64


def _reference(docs: dict[Any, list[str]], fraction: float | None) -> tuple[list[int], list, list]:
    """(stream, per-token document ids, [(lo, hi)] train parts then the val part)."""
    train, val = [], []
    for s in (0, 1, 2):
        keep = [d for d in docs[s] if fraction is None or not _carved(d, fraction)]
        val += [d for d in docs[s] if fraction is not None and _carved(d, fraction)]
        train.append(keep)
    if fraction is None:
        val = docs["val"]
    stream: list[int] = []
    ids: list[int] = []
    parts = []
    n = 0
    for group in [*train, val]:
        lo = len(stream)
        for d in group:
            body = [*d.encode("utf-8"), EOS]
            stream += body
            ids += [n] * len(body)
            n += 1
        parts.append((lo, len(stream)))
    return stream, ids, parts


def _row(stream: list[int], ids: list[int], start: int) -> dict[str, torch.Tensor]:
    toks = torch.tensor(stream[start : start + SEQ + 1])
    doc = torch.tensor(ids[start : start + SEQ + 1])
    labels = toks[1:].clone()
    labels[doc[1:] != doc[:-1]] = IGNORE_INDEX
    return {"input_ids": toks[:-1], "labels": labels, "seq_idx": doc[:-1] - doc[0]}


def _expected(task: Any, ref: tuple, weights: list[float], step: int, index: int) -> dict:
    stream, ids, parts = ref
    g = task.generator("train", step, index)
    u = float(torch.rand((), generator=g))
    k, total = 0, 0.0
    for k, w in enumerate(weights):  # noqa: B007  (k is the chosen source)
        total += w
        if u < total:
            break
    lo, hi = parts[k]
    start = lo + int(torch.randint(hi - lo - SEQ, (1,), generator=g))
    return _row(stream, ids, start)


def _same(a: dict, b: dict) -> None:
    for key in ("input_ids", "labels", "seq_idx"):
        assert torch.equal(a[key], b[key]), key


def test_mixed_sources_carved_by_hash_match_the_reference(
    corpus: dict[str, Any], tmp_path: Path
) -> None:
    weights = [0.5, 0.3, 0.2]
    task_cfg = {"sources": _sources(corpus["root"], weights), "val_fraction": 0.2}
    spec = _spec(task_cfg)
    memory = make_task(spec.train, spec.model)
    ref = _reference(corpus["docs"], 0.2)
    folder = prepare_corpus(
        spec.train.task, tmp_path / "sh", tokenizer="byte", special_ids=spec.model.special_ids
    )
    shard_spec = _spec({**task_cfg, "shards": str(folder)})
    sharded = make_task(shard_spec.train, shard_spec.model)
    chosen = []
    for step in range(40):
        for index in range(2):
            want = _expected(memory, ref, weights, step, index)
            _same(memory.sample("train", step, index), want)
            _same(sharded.sample("train", step, index), want)
            chosen.append(int(want["input_ids"][0]))
    stream, ids, parts = ref
    val_lo = parts[-1][0]
    for index in range(memory.val_size):
        want = _row(stream, ids, val_lo + index * SEQ)
        _same(memory.sample("val", 0, index), want)
        _same(sharded.sample("val", 0, index), want)
    # the manifest: parts, the carve, per-source counts (an empty and a fieldless row dropped)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert [(p["start"], p["stop"]) for p in manifest["parts"]] == parts
    assert manifest["val_split"] == {"carved_by_hash": 0.2}
    b = manifest["sources"][1]
    assert (b["rows"], b["empty_dropped"]) == (39, 1)  # the fieldless row is no row
    assert b["sha256"] == hashlib.sha256((corpus["root"] / "b.jsonl").read_bytes()).hexdigest()
    # different weights reuse the same shards (weights are not part of them)
    other = _spec({**task_cfg, "sources": _sources(corpus["root"], [0.1, 0.1, 0.8])})
    assert make_task(other.train, other.model).sample("train", 0, 0) is not None


def test_val_sources_and_equal_shares(corpus: dict[str, Any]) -> None:
    spec = _spec(
        {
            "sources": _sources(corpus["root"], [None, None, None]),
            "val_sources": [{"path": str(corpus["root"] / "v.jsonl")}],
        }
    )
    task = make_task(spec.train, spec.model)
    ref = _reference(corpus["docs"], None)
    for step in range(10):
        _same(task.sample("train", step, 0), _expected(task, ref, [1 / 3] * 3, step, 0))
    stream, ids, parts = ref
    assert task.val_size == min(3, (parts[-1][1] - parts[-1][0] - 1) // SEQ)
    _same(task.sample("val", 0, 1), _row(stream, ids, parts[-1][0] + SEQ))


def test_bad_sources_are_clear_errors_and_write_nothing(
    corpus: dict[str, Any], tmp_path: Path
) -> None:
    root = corpus["root"]
    bad_weights = [
        ([0.5, 0.3, 0.3], r"train\.task\.sources[\s\S]*sum to 1\.1, not 1"),
        (
            [0.5, None, 0.5],
            r"train\.task\.sources\[1\]\.weight: weights are set on some sources but not on \[1\]",
        ),
        ([0.5, -0.2, 0.7], r"train\.task\.sources\[1\]\.weight"),
    ]
    for weights, pattern in bad_weights:
        with pytest.raises(SpecError, match=pattern):
            _spec({"sources": _sources(root, weights)})
    with pytest.raises(SpecError, match=r"give files or sources, not both"):
        _spec({"sources": _sources(root, [None] * 3), "files": [str(root / "a.txt")]})
    with pytest.raises(SpecError, match=r"exactly one of `path`"):
        _spec({"sources": [{"path": "x.txt", "dataset": "me/x"}]})
    (root / "empty.jsonl").write_text('{"text": ""}\n{"text": ""}\n', encoding="utf-8")
    cases = [
        (
            {"path": str(root / "b.jsonl"), "text_field": "content"},
            r"sources\[0\]: no column 'content' \(text_field\).*its columns: text, id",
        ),
        ({"path": str(root / "missing.txt")}, r"sources\[0\]\.path: .*missing\.txt' is not a file"),
        ({"path": str(root / "empty.jsonl")}, r"holds no documents \(2 row\(s\), all empty\)"),
    ]
    for source, pattern in cases:
        spec = _spec({"sources": [source], "val_fraction": 0.5})
        with pytest.raises(MixstackError, match=pattern):
            make_task(spec.train, spec.model)
        out = tmp_path / "never"
        with pytest.raises(MixstackError, match=pattern):
            prepare_corpus(spec.train.task, out, tokenizer="byte", special_ids={"eos": 256})
        assert not out.exists() and not list(tmp_path.glob(".never*"))


def test_shards_from_other_sources_or_files_are_refused(
    corpus: dict[str, Any], tmp_path: Path
) -> None:
    from mixstack.data.shards import prepare_shards

    root = corpus["root"]
    spec = _spec({"sources": _sources(root, [None] * 3)})
    folder = prepare_corpus(
        spec.train.task, tmp_path / "sh", tokenizer="byte", special_ids={"eos": EOS}
    )
    fewer = _spec({"sources": _sources(root, [None] * 3)[:2], "shards": str(folder)})
    with pytest.raises(MixstackError, match="prepared from other sources"):
        make_task(fewer.train, fewer.model)
    recarved = _spec(
        {"sources": _sources(root, [None] * 3), "val_fraction": 0.3, "shards": str(folder)}
    )
    with pytest.raises(MixstackError, match=r"validation split \{'carved_by_hash': 0\.1\}"):
        make_task(recarved.train, recarved.model)
    plain = prepare_shards([root / "a.txt"], tmp_path / "plain", special_ids={"eos": EOS})
    mixed = _spec({"sources": _sources(root, [None] * 3), "shards": str(plain)})
    with pytest.raises(MixstackError, match=r"prepared from train\.task\.files"):
        make_task(mixed.train, mixed.model)
    files = _spec({"files": [str(root / "a.txt")], "shards": str(folder)})
    with pytest.raises(MixstackError, match="but the task sets none"):
        make_task(files.train, files.model)


def test_a_hub_dataset_source_goes_through_load_dataset(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """No network in tests: `datasets.load_dataset` is replaced by a recorder returning
    an in-memory table, so what the source asks for (id, config, split, revision) and how
    its column becomes documents are checked."""
    import datasets

    calls = []
    texts = ["first document é", "", "second 日本 document", "third one"] * 5

    def fake(path: str, name: Any = None, **kw: Any) -> Any:
        calls.append((path, name, kw))
        return datasets.Dataset.from_dict({"content": texts, "n": list(range(len(texts)))})

    monkeypatch.setattr(datasets, "load_dataset", fake)
    source = {"dataset": "me/corpus", "name": "en", "split": "train[:50%]", "revision": "v1"}
    spec = _spec({"sources": [{**source, "text_field": "content"}], "val_fraction": 0.5})
    task = make_task(spec.train, spec.model)
    assert calls[0] == ("me/corpus", "en", {"split": "train[:50%]", "revision": "v1"})
    kept = [t for t in texts if t]
    train = [t for t in kept if not _carved(t, 0.5)]
    want = [b for t in train for b in [*t.encode("utf-8"), EOS]]
    assert task._tokens[: len(want)].tolist() == want
    with pytest.raises(SpecError, match="`format` applies to a local `path`"):
        _spec({"sources": [{"dataset": "me/corpus", "format": "jsonl"}]})


def test_prepare_cli_round_trips_sources_with_a_bpe(corpus: dict[str, Any], tmp_path: Path) -> None:
    """`mixstack data prepare` on a spec with sources and a byte-level BPE from
    `mixstack tokenizer train`: every document decodes back to its source text byte for
    byte (Unicode, \\r\\n kept), in the documented order, empty rows dropped."""
    import yaml
    from tokenizers import Tokenizer
    from typer.testing import CliRunner

    from mixstack.cli.main import app
    from mixstack.data.shards import TokenShards

    root = corpus["root"]
    runner = CliRunner()
    tok = tmp_path / "tok"
    result = runner.invoke(
        app, ["tokenizer", "train", str(root / "a.txt"), "--vocab-size", "300", "--out", str(tok)]
    )
    assert result.exit_code == 0, result.output
    size = Tokenizer.from_file(str(tok / "tokenizer.json")).get_vocab_size()
    task = {
        "type": "text",
        "seq_len": SEQ,
        "documents": "paragraph",
        "tokenizer": str(tok),
        "sources": _sources(root, [None] * 3),
        "val_sources": [{"path": str(root / "v.jsonl")}],
        "shards": str(tmp_path / "sh"),
    }
    model = tiny_mlp_lm(size, 32)
    spec_file = tmp_path / "lm.yaml"
    spec_file.write_text(yaml.safe_dump({"model": model, "train": {"task": task, "max_steps": 1}}))
    result = runner.invoke(app, ["data", "prepare", str(spec_file)])
    assert result.exit_code == 0, result.output
    shards = TokenShards(tmp_path / "sh")
    reference = Tokenizer.from_file(str(tok / "tokenizer.json"))
    eos = reference.token_to_id("<eos>")
    docs = corpus["docs"]
    want = [*docs[0], *docs[1], *docs[2], *docs["val"]]
    assert shards.num_documents == len(want)
    for d, text in enumerate(want):
        ids = [int(t) for t in shards.document(d)]
        assert ids[-1] == eos and eos not in ids[:-1]
        assert reference.decode(ids[:-1], skip_special_tokens=True).encode() == text.encode()
        assert int(shards.table[d, 2]) == len(text.encode("utf-8"))
    assert [p["split"] for p in shards.parts or []] == ["train"] * 3 + ["val"]
    # and the task reads them: rows over the shards equal rows tokenised in memory
    loaded = mixstack.load_spec(spec_file)
    memory = mixstack.load_spec(spec_file, ["train.task.shards=null"])
    a, b = make_task(loaded.train, loaded.model), make_task(memory.train, memory.model)
    for step in range(5):
        _same(a.sample("train", step, 1), b.sample("train", step, 1))
    _same(a.sample("val", 0, 0), b.sample("val", 0, 0))
