"""`train.task.tokenizer: hf://ORG/NAME`: a tokenizer.json fetched from a (local) Hub
server into the huggingface_hub cache, then used offline from the cache; the rows equal
those of the same tokenizer.json given as a local path."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

import mixstack
from mixstack.data.bpe import train_bpe
from mixstack.dsl.errors import MixstackError, SpecError
from mixstack.dsl.hubref import HubOptions, default_options, set_default_options
from mixstack.tasks import make_task
from tests.support.text_corpus import WORDS, tiny_mlp_lm, write_word_files


def _spec(tokenizer: str, files: list[Path], vocab_size: int) -> Any:
    model = tiny_mlp_lm(vocab_size, 64)
    task = {"type": "text", "seq_len": 16, "tokenizer": tokenizer, "files": [str(f) for f in files]}
    return mixstack.load_spec({"model": model, "train": {"task": task, "max_steps": 1}})


@pytest.fixture
def endpoint(hub: Any) -> Any:
    before = default_options()
    set_default_options(HubOptions(endpoint=hub.endpoint, token=hub.token))
    yield hub
    set_default_options(before)


def test_hub_tokenizer_is_fetched_once_then_read_from_the_cache(
    endpoint: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import HfApi
    from tokenizers import Tokenizer

    hub = endpoint
    files = write_word_files(tmp_path, n=4, seed=0, words_per_file=150)
    path = train_bpe(files, 290, tmp_path / "tok")
    size = Tokenizer.from_file(str(path)).get_vocab_size()
    HfApi(endpoint=hub.endpoint, token=hub.token).create_repo("me/tok")
    hub.state.put_files(
        "me/tok",
        {
            "tokenizer.json": path.read_bytes(),
            "tokenizer_config.json": (path.parent / "tokenizer_config.json").read_bytes(),
        },
    )
    # not cached yet: the spec loads (no download at load), the vocabulary is checked
    # when the task is built, before step 0, after the download
    spec = _spec("hf://me/tok", files, size + 8)
    with pytest.raises(MixstackError, match=f"has {size} ids but model.vocab_size is {size + 8}"):
        make_task(spec.train, spec.model)
    cached = list(Path(hub.cache).glob("models--me--tok/snapshots/*/tokenizer.json"))
    assert len(cached) == 1 and cached[0].read_bytes() == path.read_bytes()
    assert (cached[0].parent / "tokenizer_config.json").is_file()
    # cached now: the same mismatch is a located error when the spec loads
    with pytest.raises(SpecError, match=r"train\.task\.tokenizer[\s\S]*model\.vocab_size: "):
        _spec("me/tok", files, size + 8)
    # offline from the cache: the same rows as the local file, eos from the config
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub_task = make_task(*_parts(_spec("me/tok", files, size)))
    local_task = make_task(*_parts(_spec(str(path), files, size)))
    eos = json.loads(path.read_text())["added_tokens"][2]
    assert eos["content"] == "<eos>"
    assert int((hub_task.train_tokens == eos["id"]).sum()) >= 3
    for step in range(3):
        a, b = hub_task.sample("train", step, 0), local_task.sample("train", step, 0)
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["labels"], b["labels"])


def _size(path: Path) -> int:
    from tokenizers import Tokenizer

    return int(Tokenizer.from_file(str(path)).get_vocab_size())


def _parts(spec: Any) -> tuple[Any, Any]:
    return spec.train, spec.model


def test_unknown_hub_tokenizer_and_missing_path_are_clear(endpoint: Any, tmp_path: Path) -> None:
    files = [tmp_path / "a.txt"]
    files[0].write_text("some text " * 20, encoding="utf-8")
    spec = _spec("hf://me/absent", files, 300)  # not cached: loads, fails before step 0
    with pytest.raises(MixstackError, match=r"tokenizer 'hf://me/absent'.*not found"):
        make_task(spec.train, spec.model)
    # a file not made yet loads (as `files` do) and is refused when the task is built
    missing = _spec(str(tmp_path / "none" / "tokenizer.json"), files, 300)
    with pytest.raises(MixstackError, match=r"tokenizer '.*none/tokenizer\.json': no such file"):
        make_task(missing.train, missing.model)


def test_push_and_pull_carry_the_tokenizer(hub: Any, tmp_path: Path) -> None:
    from mixstack.archs.builder import build
    from mixstack.hub.modeldir import load_tokenizer, save_model_dir

    text = tmp_path / "a.txt"
    text.write_text(" ".join(random.Random(2).choices(WORDS, k=200)), encoding="utf-8")
    tok = train_bpe([text], 280, tmp_path / "tok")
    spec = _spec(str(tok), [text], _size(tok))
    folder = save_model_dir(build(spec.model, seed=0), tmp_path / "model", tokenizer=tok)
    kw = {"token": hub.token, "endpoint": hub.endpoint, "cache_dir": tmp_path / "cache"}
    mixstack.push(folder, "me/withtok", token=hub.token, endpoint=hub.endpoint)
    pulled = mixstack.pull("me/withtok", out=tmp_path / "pulled", **kw)
    out = Path(pulled.path)
    assert (out / "tokenizer.json").read_bytes() == tok.read_bytes()
    assert (out / "tokenizer_config.json").is_file()
    loaded = load_tokenizer(out)
    assert loaded.decode(loaded.encode("日本 café")) == "日本 café" and loaded.eos_token_id == 2
