"""Weights integrity: data digests, mandatory provenance, header checks before any
allocation, non-float and non-finite weights, tied heads, sharded directories."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import mixstack
from mixstack.dsl.errors import CheckpointError
from mixstack.hub import integrity
from mixstack.hub.modeldir import config_of, save_model_dir, spec_yaml_text

SPEC = yaml.safe_load("""
model:
  vocab_size: 16
  max_seq_len: 16
  d_model: 16
  layers:
    pattern: "*-M"
    symbols:
      "*": {type: attention, n_heads: 2}
      "-": {type: mlp, hidden: 32}
      M: {type: mamba2, d_state: 8, headdim: 8, chunk_size: 8}
""")
FIXTURE_V1 = Path(__file__).resolve().parent.parent / "fixtures" / "modeldir_v1"


@pytest.fixture
def exported(tmp_path: Path) -> tuple[Path, mixstack.archs.models.MixStackModel]:
    model = mixstack.build(SPEC, seed=5).eval()
    return save_model_dir(model, tmp_path / "model"), model


def _fingerprint(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _refused(folder: Path, *fragments: str, **kwargs) -> str:
    before = _fingerprint(folder)
    with pytest.raises(CheckpointError) as info:
        mixstack.from_pretrained(folder, **kwargs)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
    assert _fingerprint(folder) == before  # loading never writes
    return str(info.value)


def _header_by_hand(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return 8 + n, json.loads(raw[8 : 8 + n])


def _resave(folder: Path, edit, *, metadata: dict | None = None, digest: bool = False) -> None:
    """Rewrite model.safetensors with ``edit`` applied to its tensors; ``metadata`` as
    given (default: none), and with a correct new digest if ``digest``."""
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    if digest:
        integrity.write_safetensors(tensors, path, metadata or {}, folder / "config.json")
    else:
        save_file(tensors, path, metadata=metadata)


def test_digest_is_the_sha256_of_the_data_region(exported) -> None:
    folder, _ = exported
    start, header = _header_by_hand(folder / "model.safetensors")
    data = (folder / "model.safetensors").read_bytes()[start:]
    meta = header["__metadata__"]
    assert meta["mixstack.data_sha256"] == hashlib.sha256(data).hexdigest()
    assert (
        meta["mixstack.spec_hash"] == json.loads((folder / "config.json").read_text())["spec_hash"]
    )
    report = mixstack.hub.modeldir.verify_model_dir(folder)
    assert report["files"] == {"model.safetensors": hashlib.sha256(data).hexdigest()}


def test_a_flipped_byte_in_the_data_is_refused(exported) -> None:
    folder, _ = exported
    path = folder / "model.safetensors"
    start, _ = _header_by_hand(path)
    raw = bytearray(path.read_bytes())
    raw[start + 100] ^= 0x10  # one bit of one weight: still finite, still the right shape
    path.write_bytes(bytes(raw))
    _refused(folder, "does not match its recorded digest", "damaged or was modified")
    _refused(folder, "does not match its recorded digest", allow_unverified=True)


def test_tensors_resaved_as_int32_are_refused(exported) -> None:
    folder, _ = exported
    meta = {"mixstack.spec_hash": mixstack.from_pretrained(folder).spec.spec_hash}

    def to_int(tensors):
        for name in tensors:
            tensors[name] = tensors[name].to(torch.int32)

    _resave(folder, to_int, metadata=meta, digest=True)  # a "valid" digest of int data
    text = _refused(folder, "wrong dtype (", "norm_f.weight (file I32, model expects floating")
    assert "embedding.weight" in text


def test_non_finite_weights_are_refused_unless_allowed(exported) -> None:
    folder, model = exported
    meta = {"mixstack.spec_hash": model.spec.spec_hash}
    _resave(
        folder,
        lambda t: t["norm_f.weight"].__setitem__(3, float("nan")),
        metadata=meta,
        digest=True,
    )
    _refused(folder, "NaN or inf", "norm_f.weight (1 of 16)")
    with pytest.warns(UserWarning, match="NaN or inf"):
        loaded = mixstack.from_pretrained(folder, allow_unverified=True)
    assert torch.isnan(loaded.norm_f.weight[3])


def test_consistent_spec_edit_with_stripped_metadata_is_refused(exported) -> None:
    """config.json + spec.yaml edited consistently (a different model of the same shapes)
    and the weights' metadata stripped: nothing ties the weights to the spec any more."""
    folder, _ = exported
    data = json.loads(json.dumps(SPEC))
    data["model"]["norm"] = {"type": "rmsnorm", "eps": 0.5}
    other = mixstack.load_spec(data).model
    (folder / "config.json").write_text(json.dumps(config_of(other), indent=2))
    (folder / "spec.yaml").write_text(spec_yaml_text(other))
    _resave(folder, lambda t: None, metadata=None)
    _refused(
        folder,
        "unverified weights",
        "no mixstack.spec_hash / mixstack.data_sha256",
        "allow_unverified=True",
    )
    with pytest.warns(UserWarning, match="loading unverified weights"):
        loaded = mixstack.from_pretrained(folder, allow_unverified=True)
    assert loaded.spec == other


def test_a_current_directory_without_digest_is_refused(exported) -> None:
    folder, model = exported
    _resave(folder, lambda t: None, metadata={"mixstack.spec_hash": model.spec.spec_hash})
    _refused(folder, "model.safetensors has no mixstack.data_sha256", "undamaged")


def test_v1_directory_without_digest_loads_with_a_warning(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match=r"no mixstack.data_sha256.*schema_version 1"):
        mixstack.from_pretrained(FIXTURE_V1)
    folder = Path(shutil.copytree(FIXTURE_V1, tmp_path / "v1"))
    _resave(folder, lambda t: None, metadata=None)  # the v1 spec hash stripped too
    _refused(folder, "no mixstack.spec_hash", "belong to config.json")


def test_a_tied_head_stored_in_the_file_is_a_clear_error(exported) -> None:
    folder, model = exported
    meta = {"mixstack.spec_hash": model.spec.spec_hash}
    _resave(
        folder,
        lambda t: t.__setitem__("lm_head.weight", t["embedding.weight"].clone() + 1),
        metadata=meta,
        digest=True,
    )
    _refused(folder, "lm_head.weight is stored, but the model ties it to embedding.weight")


HUGE_CHILD = textwrap.dedent(
    """
    import resource, sys
    limit = 2 * 2**30
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import mixstack
    try:
        mixstack.from_pretrained(sys.argv[1])
    except mixstack.CheckpointError as exc:
        print("REFUSED", exc)
        sys.exit(0)
    print("LOADED")
    sys.exit(3)
    """
)


def test_a_small_config_asking_for_a_huge_model_is_refused_before_allocating(
    exported, tmp_path: Path
) -> None:
    """config.json + spec.yaml rewritten (hashes consistent) for a ~17 GB fp32 model: the
    header check against the meta-device model refuses it under a 2 GiB address space."""
    folder, _ = exported
    data = json.loads(json.dumps(SPEC))
    data["model"].update(d_model=4096, vocab_size=250_000)
    data["model"]["layers"]["pattern"] = "(*-)24"
    data["model"]["layers"]["symbols"]["*"]["n_heads"] = 32
    data["model"]["layers"]["symbols"]["-"]["hidden"] = 11008
    huge = mixstack.load_spec(data).model
    assert mixstack.build(huge, device="meta").report().total_params * 4 > 8 * 2**30
    (folder / "config.json").write_text(json.dumps(config_of(huge), indent=2))
    (folder / "spec.yaml").write_text(spec_yaml_text(huge))
    _resave(folder, lambda t: None, metadata={"mixstack.spec_hash": huge.spec_hash}, digest=True)
    script = tmp_path / "child.py"
    script.write_text(HUGE_CHILD)
    done = subprocess.run(
        [sys.executable, str(script), str(folder)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "REFUSED" in done.stdout and "mis-shaped" in done.stdout
    assert "embedding.weight (file [24, 16], model [250008, 4096])" in done.stdout


# -- sharded directories ---------------------------------------------------------------------
def test_sharded_export_round_trips_with_a_transformers_style_index(tmp_path: Path) -> None:
    model = mixstack.build(SPEC, seed=9).eval()
    folder = save_model_dir(model, tmp_path / "sharded", max_shard_size="4KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    n = len(shards)
    assert n > 2 and shards == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert not (folder / "model.safetensors").exists()
    state = model.state_dict()
    stored = {k for k in state if k != "lm_head.weight"}  # tied: written once
    assert set(index["weight_map"]) == stored and set(index["weight_map"].values()) == set(shards)
    total = 0
    for shard in shards:
        path = folder / shard
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            names = list(f.keys())
            for name in names:
                assert index["weight_map"][name] == shard
                assert torch.equal(f.get_tensor(name), state[name])
                total += state[name].numel() * state[name].element_size()
        start, _ = _header_by_hand(path)
        digest = hashlib.sha256(path.read_bytes()[start:]).hexdigest()
        assert (
            meta["mixstack.data_sha256"]
            == digest
            == index["metadata"]["mixstack.data_sha256"][shard]
        )
        # Each shard stays under the limit unless it holds one larger tensor.
        assert path.stat().st_size - start <= 4000 or len(names) == 1
    assert index["metadata"]["total_size"] == total
    loaded = mixstack.from_pretrained(folder)
    ids = torch.randint(0, 20, (2, 7))
    assert torch.equal(loaded(ids), model(ids))
    assert loaded.lm_head.weight is loaded.embedding.weight
    # A single file again when the whole model fits one shard.
    single = save_model_dir(model, tmp_path / "one", max_shard_size="1GB")
    assert sorted(p.name for p in single.glob("*.safetensors")) == ["model.safetensors"]


@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    return save_model_dir(mixstack.build(SPEC, seed=9), tmp_path / "sharded", max_shard_size=4000)


def test_a_shard_of_another_export_is_refused(sharded: Path, tmp_path: Path) -> None:
    other = save_model_dir(mixstack.build(SPEC, seed=10), tmp_path / "o", max_shard_size=4000)
    shard = "model-00002-of-" + sorted(sharded.glob("model-*"))[0].name[-17:]
    shutil.copy(other / shard, sharded / shard)
    _refused(sharded, shard, "differs from the one model.safetensors.index.json lists")


def test_a_missing_shard_and_an_escaping_index_are_refused(sharded: Path) -> None:
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../elsewhere.safetensors"
    index_path.write_text(json.dumps(index))
    _refused(sharded, f"weight_map[{name!r}] = '../elsewhere.safetensors' is not a shard name")
    index["weight_map"][name] = "model-00099-of-00099.safetensors"
    index_path.write_text(json.dumps(index))
    _refused(sharded, "shard model-00099-of-00099.safetensors is missing")


def test_a_bad_shard_size_is_refused_before_writing(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="max_shard_size '12 parsecs' is not a size"):
        save_model_dir(mixstack.build(SPEC, seed=1), tmp_path / "m", max_shard_size="12 parsecs")
    assert not (tmp_path / "m").exists()
    assert integrity.parse_size("2GB") == 2 * 10**9 and integrity.parse_size("1GiB") == 2**30


def test_a_truncated_or_garbled_header_is_a_checkpoint_error(exported) -> None:
    folder, _ = exported
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 10])
    _refused(folder, "not a valid safetensors file", "the file holds")
    path.write_bytes(struct.pack("<Q", 2**40) + raw[8:])
    _refused(folder, "header length 1099511627776 does not fit")
