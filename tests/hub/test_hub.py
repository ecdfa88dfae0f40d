"""Push and pull against the local Hub server (tests/hub/hubserver.py, fixture ``hub``):
bit-identical round trips, revisions, hf:// spec sources, the authored spec.yaml, and
the bad cases (each a clear CheckpointError / SpecError that changes nothing locally)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import save_file

import mixstack
from mixstack.dsl import annotations
from mixstack.dsl.errors import CheckpointError, SpecError
from mixstack.dsl.hubref import HubOptions
from mixstack.hub.modeldir import save_model_dir

# huggingface_hub's basic LFS upload passes bytes as data= (httpx deprecates that)
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>'")

CAUSAL = {
    "model": {
        "vocab_size": 16,
        "max_seq_len": 16,
        "d_model": 16,
        "tie_embeddings": True,
        "layers": {
            "pattern": "*-M-",
            "symbols": {
                "*": {"type": "attention", "n_heads": 2},
                "-": {"type": "mlp", "hidden": 32},
                "M": {"type": "mamba2", "d_state": 8, "headdim": 8, "chunk_size": 8},
            },
        },
    }
}
ENCODER = {
    "model": {
        "arch": "encoder",
        "vocab_size": 16,
        "max_seq_len": 16,
        "d_model": 16,
        "layers": {
            "pattern": "*-",
            "symbols": {"*": {"type": "attention", "n_heads": 2}, "-": {"type": "mlp"}},
        },
    }
}


def _kw(hub: Any, tmp_path: Path) -> dict[str, Any]:
    return {"token": hub.token, "endpoint": hub.endpoint, "cache_dir": tmp_path / "cache"}


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name


def _tree(folder: Path) -> dict[str, str]:
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("spec", [CAUSAL, ENCODER], ids=["causal-tied", "encoder"])
def test_push_then_pull_is_bit_identical(hub, tmp_path: Path, spec: dict) -> None:
    model = mixstack.build(spec, seed=3)
    result = mixstack.push(model, "me/round", token=hub.token, endpoint=hub.endpoint)
    assert len(result.commit) == 40 and result.revision == "main"
    loaded = mixstack.from_pretrained("hf://me/round", **_kw(hub, tmp_path))
    _assert_same_weights(model, loaded)
    assert loaded.spec.spec_hash == model.spec.spec_hash
    if spec is CAUSAL:
        assert loaded.lm_head.weight is loaded.embedding.weight  # tied after loading
    ids = torch.randint(0, 16, (2, 8))
    assert torch.equal(loaded(ids), model.eval()(ids))
    # the resolved commit is remembered with the loaded spec
    (source,) = annotations.hub_sources(loaded.spec)
    assert source["commit"] == result.commit and source["repo_id"] == "me/round"
    # uploads took the plain LFS path (Xet switched off by the fixture)
    assert any(p.endswith("/info/lfs/objects/batch") for _, p in hub.state.requests)
    # one commit with the four files of a model directory (+ the repo's .gitattributes)
    info = hub.state.repos["me/round"]
    files = info.commits[info.branches["main"]]
    assert sorted(files) == [
        ".gitattributes",
        "README.md",
        "config.json",
        "model.safetensors",
        "spec.yaml",
    ]


def test_pull_out_and_revisions(hub, tmp_path: Path) -> None:
    first = mixstack.build(CAUSAL, seed=1)
    second = mixstack.build(CAUSAL, seed=2)
    a = mixstack.push(first, "me/rev", token=hub.token, endpoint=hub.endpoint).commit
    b = mixstack.push(second, "me/rev", token=hub.token, endpoint=hub.endpoint).commit
    assert a != b
    kw = _kw(hub, tmp_path)
    _assert_same_weights(first, mixstack.from_pretrained(f"hf://me/rev@{a}", **kw))
    _assert_same_weights(second, mixstack.from_pretrained("hf://me/rev", **kw))
    _assert_same_weights(first, mixstack.from_pretrained("hf://me/rev", revision=a, **kw))
    out = tmp_path / "pulled"
    pulled = mixstack.pull("me/rev", revision=a, out=out, **kw)
    assert pulled.commit == a and pulled.path == out
    assert not any(p.is_symlink() for p in out.iterdir())  # real files, not cache links
    _assert_same_weights(first, mixstack.from_pretrained(out))
    # a branch: pushed to, then resolved to its commit
    c = mixstack.push(first, "me/rev", revision="v1", token=hub.token, endpoint=hub.endpoint)
    assert mixstack.pull("me/rev", revision="v1", **kw).commit == c.commit
    with pytest.raises(CheckpointError, match="names revision 'main' but revision='v1'"):
        mixstack.from_pretrained("hf://me/rev@main", revision="v1", **kw)


def test_sharded_model_goes_through_bit_identical(hub, tmp_path: Path) -> None:
    """A model directory sharded by ``save_model_dir(max_shard_size=...)`` (transformers'
    index layout, a digest per shard) is pushed and pulled file for file and loads to
    the same tensors and spec hash."""
    model = mixstack.build(CAUSAL, seed=4)
    folder = save_model_dir(model, tmp_path / "model", max_shard_size=4096)
    shards = sorted(p.name for p in folder.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").is_file()
    mixstack.push(folder, "me/sharded", token=hub.token, endpoint=hub.endpoint)
    pulled = mixstack.pull("me/sharded", **_kw(hub, tmp_path))
    for name in [*shards, "model.safetensors.index.json", "config.json", "spec.yaml"]:
        assert (pulled.path / name).read_bytes() == (folder / name).read_bytes(), name
    loaded = mixstack.from_pretrained("hf://me/sharded", **_kw(hub, tmp_path))
    _assert_same_weights(model, loaded)
    assert loaded.spec.spec_hash == model.spec.spec_hash
    assert loaded.lm_head.weight is loaded.embedding.weight


def test_bad_repositories_give_clear_errors(hub, tmp_path: Path) -> None:
    kw = _kw(hub, tmp_path)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="repository me/nothing not found"):
        mixstack.pull("me/nothing", out=out, **kw)
    model = mixstack.build(CAUSAL, seed=0)
    mixstack.push(model, "me/bad", token=hub.token, endpoint=hub.endpoint)
    with pytest.raises(CheckpointError, match="revision 'nope' does not exist in me/bad"):
        mixstack.pull("me/bad", revision="nope", out=out, **kw)
    # pickle only: refused before anything is downloaded
    mixstack.push(model, "me/pickle", token=hub.token, endpoint=hub.endpoint)
    repo = hub.state.repos["me/pickle"]
    table = repo.commits[repo.branches["main"]]
    table = {k: v for k, v in table.items() if k in (".gitattributes", "config.json")}
    repo.branches["main"] = hub.state.new_commit(repo, table)
    hub.state.put_files("me/pickle", {"pytorch_model.bin": b"\x80\x04not really a pickle"})
    with pytest.raises(CheckpointError, match=r"only pickle checkpoints \(pytorch_model.bin\)"):
        mixstack.from_pretrained("hf://me/pickle", **kw)
    assert not any("pytorch_model.bin" in p for _, p in hub.state.requests)
    # a spec that does not match the weights: a wider model's tensors under this config
    wide = mixstack.build({"model": {**CAUSAL["model"], "d_model": 32}}, seed=0)
    save_file(
        {k: v.contiguous() for k, v in wide.state_dict().items() if "lm_head" not in k},
        str(tmp_path / "wide.safetensors"),
    )
    hub.state.put_files(
        "me/bad", {"model.safetensors": (tmp_path / "wide.safetensors").read_bytes()}
    )
    with pytest.raises(CheckpointError, match="not a loadable mixstack model") as info:
        mixstack.pull("me/bad", out=out, **kw)
    assert "mis-shaped" in str(info.value)
    assert not out.exists()
    assert not list(tmp_path.glob(".out.*"))  # no temporary folder left behind


def test_private_repo_needs_the_token(hub, tmp_path: Path) -> None:
    model = mixstack.build(CAUSAL, seed=0)
    mixstack.push(model, "me/secret", private=True, token=hub.token, endpoint=hub.endpoint)
    cache = tmp_path / "cache"
    for token in (None, hub.other_token):
        with pytest.raises(CheckpointError, match=r"not found .*private and no valid token") as e:
            mixstack.from_pretrained(
                "hf://me/secret", token=token, endpoint=hub.endpoint, cache_dir=cache
            )
        assert hub.other_token not in str(e.value)
    _assert_same_weights(model, mixstack.from_pretrained("hf://me/secret", **_kw(hub, tmp_path)))


def test_corrupted_download_is_removed_and_retried(hub, tmp_path: Path) -> None:
    model = mixstack.build(CAUSAL, seed=6)
    mixstack.push(model, "me/corrupt", token=hub.token, endpoint=hub.endpoint)
    kw = _kw(hub, tmp_path)
    out = tmp_path / "out"
    hub.state.corrupt.add("model.safetensors")
    with pytest.raises(CheckpointError, match=r"corrupted \(digest mismatch\)") as info:
        mixstack.pull("me/corrupt", out=out, **kw)
    assert "model.safetensors" in str(info.value) and not out.exists()
    hub.state.corrupt.clear()
    pulled = mixstack.pull("me/corrupt", out=out, **kw)  # downloads the file again
    _assert_same_weights(model, mixstack.from_pretrained(pulled.path))


def test_server_going_away_mid_download(hub, tmp_path: Path) -> None:
    model = mixstack.build(CAUSAL, seed=7)
    mixstack.push(model, "me/flaky", token=hub.token, endpoint=hub.endpoint)
    kw = _kw(hub, tmp_path)
    out = tmp_path / "out"
    before = _tree(out)
    hub.state.cut_after["model.safetensors"] = 1000
    with pytest.raises(CheckpointError, match="cannot download hf://me/flaky") as info:
        mixstack.pull("me/flaky", out=out, **kw)
    assert "again" in str(info.value)
    assert _tree(out) == before  # nothing written to --out
    # whatever reached the cache is not a loadable model
    for snapshot in (tmp_path / "cache").glob("models--me--flaky/snapshots/*"):
        with pytest.raises(CheckpointError):
            mixstack.from_pretrained(snapshot)
    hub.state.cut_after.clear()
    hub.state.down = False
    pulled = mixstack.pull("me/flaky", out=out, **kw)
    _assert_same_weights(model, mixstack.from_pretrained(pulled.path))


# -- hf:// spec sources and the authored spec.yaml ------------------------------------------


AUTHORED = {
    "model": {
        "vocab_size": 16,
        "max_seq_len": 32,
        "d_model": 32,
        "layers": {
            "pattern": "*-",
            "symbols": {"*": {"type": "attention", "n_heads": 4}, "-": {"type": "mlp"}},
        },
    }
}


def _canonical_layer(spec: Any, symbol: str) -> dict[str, Any]:
    return spec.model.canonical()["layers"]["symbols"][symbol]


def test_spec_yaml_keeps_the_authored_spec(tmp_path: Path) -> None:
    spec = mixstack.load_spec(AUTHORED)
    folder = save_model_dir(mixstack.build(spec, seed=0), tmp_path / "m")
    saved = yaml.safe_load((folder / "spec.yaml").read_text())
    assert saved["model"] == AUTHORED["model"]  # as written: no derived head_dim / hidden
    config = json.loads((folder / "config.json").read_text())
    assert config["model"] == spec.model.canonical()
    assert "hidden" in json.dumps(config["model"]["layers"]["symbols"]["-"])
    assert mixstack.from_pretrained(folder).spec == spec.model
    # spec.yaml that no longer resolves to config.json is refused
    saved["model"]["d_model"] = 64
    (folder / "spec.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(CheckpointError, match="describe different models"):
        mixstack.from_pretrained(folder)


def test_hf_sources_in_load_spec_and_base(hub, tmp_path: Path) -> None:
    model = mixstack.build(mixstack.load_spec(AUTHORED), seed=0)
    commit = mixstack.push(model, "me/arch", token=hub.token, endpoint=hub.endpoint).commit
    options = HubOptions(endpoint=hub.endpoint, token=hub.token, cache_dir=tmp_path / "c")
    direct = mixstack.load_spec("hf://me/arch", hub=options)
    assert direct.model == model.spec
    (source,) = annotations.hub_sources(direct)
    assert source["commit"] == commit and source["revision"] == "main"
    assert hub.token not in json.dumps(source)

    # base: hf://... + an override re-derives what the author left to defaults
    child = tmp_path / "child.yaml"
    child.write_text("base: hf://me/arch\nmodel:\n  d_model: 64\n")
    derived = mixstack.load_spec(child, hub=options)
    local = mixstack.load_spec(AUTHORED, overrides=["model.d_model=64"])
    assert derived.model == local.model
    assert _canonical_layer(derived, "-") != _canonical_layer(direct, "-")  # MLP width followed
    assert annotations.hub_sources(derived)[0]["commit"] == commit

    # a bad value inherited from the Hub base names the repository and its commit
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: hf://me/arch\nmodel:\n  d_model: 30\n")
    with pytest.raises(SpecError) as info:
        mixstack.load_spec(bad, hub=options)
    assert f"hf://me/arch@{commit}/spec.yaml" in str(info.value)

    with pytest.raises(SpecError, match="repository me/missing not found"):
        mixstack.load_spec("hf://me/missing", hub=options)
    with pytest.raises(SpecError, match="not a Hub reference"):
        mixstack.load_spec("hf://just-a-name", hub=options)
