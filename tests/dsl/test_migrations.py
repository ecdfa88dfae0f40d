"""Schema migrations: every older version has a step, v1 -> v2 moves what it should,
newer versions are refused naming both versions, the hash rule is per version."""

from __future__ import annotations

import hashlib
import json

import pytest

from mixstack.dsl.errors import SpecError
from mixstack.dsl.loader import load_spec
from mixstack.dsl.migrations import MIGRATIONS, SCHEMA_VERSION, migrate, spec_hash_of

V1_MODEL = {
    "vocab_size": 16,
    "d_model": 16,
    "activation_checkpointing": True,
    "layers": {"pattern": "*-", "symbols": {"*": {"type": "attention"}, "-": {"type": "mlp"}}},
}
V2_MODEL = {k: v for k, v in V1_MODEL.items() if k != "activation_checkpointing"}


def test_every_older_version_has_one_step() -> None:
    assert sorted(MIGRATIONS) == list(range(1, SCHEMA_VERSION))


def test_v1_checkpointing_true_moves_to_run_and_the_input_is_left_alone() -> None:
    document = {"schema_version": 1, "model": V1_MODEL, "run": {"activation_checkpointing": [0]}}
    before = json.dumps(document, sort_keys=True)
    migrated, notes = migrate(document)
    assert json.dumps(document, sort_keys=True) == before  # a copy is migrated
    assert migrated["schema_version"] == SCHEMA_VERSION
    assert "activation_checkpointing" not in migrated["model"]
    assert migrated["model"]["init"] == {"scheme": "mixstack"}  # the init v1 had
    # v1 checkpointed every block when the model flag was true: `run` selects all.
    assert migrated["run"] == {"activation_checkpointing": True}
    assert len(notes) == 1 and "moved to run.activation_checkpointing" in notes[0]


def test_v1_checkpointing_false_is_dropped_silently_and_run_kept() -> None:
    model = {**V1_MODEL, "activation_checkpointing": False}
    migrated, notes = migrate({"schema_version": 1, "model": model})
    assert "activation_checkpointing" not in migrated["model"] and "run" not in migrated
    assert notes == []
    model = {**V2_MODEL, "init": {"std": 0.1}}
    migrated, _ = migrate({"schema_version": 1, "model": model})
    assert migrated["model"]["init"] == {"std": 0.1, "scheme": "mixstack"}


def test_v1_spec_loads_with_checkpointing_as_a_run_setting(caplog) -> None:
    with caplog.at_level("INFO", logger="mixstack.dsl.migrations"):
        spec = load_spec({"schema_version": 1, "model": V1_MODEL})
    assert spec.run.activation_checkpointing is True
    assert "moved to run.activation_checkpointing" in caplog.text
    assert spec.model == load_spec({"model": V2_MODEL}).model


def test_current_and_unsupported_versions_are_not_touched() -> None:
    for version in (SCHEMA_VERSION, SCHEMA_VERSION + 1, "1", 0):
        document = {"schema_version": version, "model": V1_MODEL}
        assert migrate(document) == (document, [])


@pytest.mark.parametrize(
    ("version", "fragment"),
    [
        (SCHEMA_VERSION + 1, f"newer than this mixstack reads (1..{SCHEMA_VERSION})"),
        ("1", "is not a version"),
        (0, "is not a version"),
    ],
)
def test_unsupported_version_is_one_clear_issue(version: object, fragment: str) -> None:
    with pytest.raises(SpecError) as info:
        load_spec({"schema_version": version, "model": V2_MODEL})
    assert [i.path for i in info.value.issues] == [("schema_version",)]
    assert fragment in str(info.value) and str(version) in str(info.value)


def test_hash_rule_names_its_version_and_ignores_the_request() -> None:
    model = {"d_model": 8, "layers": {"pattern": "*", "requested": {"pattern": "*"}}}
    by_hand = json.dumps(
        {"schema_version": 1, "model": {"d_model": 8, "layers": {"pattern": "*"}}},
        sort_keys=True,
        separators=(",", ":"),
    )
    assert spec_hash_of(model, 1) == hashlib.sha256(by_hand.encode()).hexdigest()
    assert spec_hash_of(model, 1) != spec_hash_of(model, 2)
    assert "requested" in model["layers"]  # the argument is not modified


def test_v2_sgconv_kernels_are_pinned_everywhere_they_occur() -> None:
    """Bindings, composite children and override sets with an SGConv kernel get the v2
    numerics; squash kernels and other layers are left alone."""
    sg = {"type": "sgconv"}
    model = {
        "layers": {
            "pattern": "GSq",
            "symbols": {
                "G": {"type": "long_conv", "kernel": dict(sg)},
                "S": {
                    "type": "sequential",
                    "layers": [
                        {"type": "long_conv", "kernel": {**sg, "sub_kernel_len": 8}},
                        {"type": "mlp"},
                    ],
                },
                "q": {"type": "long_conv", "kernel": {"type": "squash"}},
            },
            "overrides": [{"at": [2], "set": {"kernel": dict(sg), "output_glu": False}}],
        }
    }
    migrated, notes = migrate({"schema_version": 2, "model": model})
    symbols = migrated["model"]["layers"]["symbols"]
    pinned = {"type": "sgconv", "normalize": "truncated", "sub_kernel_len": 32}
    assert symbols["G"] == {"type": "long_conv", "kernel": pinned, "output_glu": True}
    assert symbols["S"]["layers"][0]["kernel"] == {**pinned, "sub_kernel_len": 8}
    assert symbols["S"]["layers"][1] == {"type": "mlp"}
    assert symbols["q"] == {"type": "long_conv", "kernel": {"type": "squash"}}
    override = migrated["model"]["layers"]["overrides"][0]["set"]
    assert override == {"kernel": pinned, "output_glu": False}  # an explicit value stays
    assert len(notes) == 1 and notes[0].startswith("3 SGConv kernel(s)")
    assert migrate({"schema_version": 2, "model": V2_MODEL})[1] == []
