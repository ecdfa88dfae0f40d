"""load_spec: sources, base composition, overrides, interpolation, round trips, hashing."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType

import pytest
import yaml

import mixstack
from mixstack.dsl import registry
from mixstack.dsl.errors import SpecError, format_path
from mixstack.dsl.layers import realize_layer_configs
from mixstack.dsl.loader import load_spec, parse_override, zoo_names
from mixstack.dsl.spec import SCHEMA_VERSION, ModelSpec, Spec

Write = Callable[[str, str], Path]

BASE = """
model:
  arch: causal_lm
  d_model: 64
  max_seq_len: 128
  special_tokens: [pad, bos]
  layers:
    n_layers: 8
    ratios: {"*": 0.25, "-": 0.5}
    fill: A
    symbols:
      A: {type: fake_seq, width: 4}
      "*": {type: fake_seq, width: 8, mode: beta}
      "-": {type: fake_channel}
      U: {type: fake_noncausal}
"""
TRAIN = """
train:
  task: {type: text, seq_len: 32, files: [a.txt, b.txt]}
  max_steps: 10
"""


def issue_at(err: SpecError, path: str) -> object:
    """The one issue of ``err`` at YAML path ``path``."""
    found = [i for i in err.issues if format_path(i.path) == path]
    assert found, f"no issue at {path}; got {[format_path(i.path) for i in err.issues]}"
    return found[0]


# -- sources -------------------------------------------------------------------------------


def test_load_file_realizes_ratios_and_resolves(write: Write) -> None:
    spec = load_spec(write("base.yaml", BASE))
    layers = spec.model.layers
    assert layers.pattern == "A-*-A*--"
    assert layers.requested.n_layers == 8 and layers.requested.fill == "A"
    assert set(layers.symbols) == {"A", "-", "*"}  # unused U dropped
    assert layers.symbols["A"].scale == 16.0 and layers.symbols["A"].causal is True
    # A symbol is resolved once, with the context of its first use (layer 1); per-layer
    # configs start from that resolved binding, so they all get the same width.
    assert layers.symbols["-"].hidden == 2 * 64 + 1
    channels = [c for c in spec.model.layer_configs() if c.type == "fake_channel"]
    assert len(channels) == 4 and all(c == layers.symbols["-"] for c in channels)


def test_load_dict_and_spec_sources(write: Write) -> None:
    data = yaml.safe_load(BASE)
    spec = load_spec(data)
    assert spec == load_spec(write("base.yaml", BASE))
    assert load_spec(spec) is spec
    changed = load_spec(spec, ["model.d_model=32"])
    assert changed.model.d_model == 32 and changed.model.layers.symbols["A"].scale == 16.0
    with pytest.raises(SpecError, match=r"<dict>: model\.d_model") as info:
        load_spec({**data, "model": {**data["model"], "d_model": "x"}})
    assert info.value.issues[0].origin == "<dict>"


def test_public_api_forwards() -> None:
    spec = mixstack.load_spec("zoo:transformer-tiny", overrides=["model.d_model=32"])
    assert isinstance(spec, Spec) and spec.model.d_model == 32


def test_unsupported_source_type() -> None:
    with pytest.raises(SpecError, match="cannot load a spec from a int"):
        load_spec(3)  # type: ignore[arg-type]


def test_zoo_preset() -> None:
    assert "transformer-tiny" in zoo_names()
    spec = load_spec("zoo:transformer-tiny")
    model = spec.model
    assert (model.arch, model.vocab_size, model.d_model, model.max_seq_len) == (
        "causal_lm",
        256,
        64,
        256,
    )
    assert model.layers.pattern == "*-*-"
    attn, mlp = model.layers.symbols["*"], model.layers.symbols["-"]
    assert (attn.n_heads, attn.head_dim, attn.rope.theta, attn.rope.dim) == (4, 16, 10000.0, 16)
    assert mlp.activation == "swiglu"


def test_unknown_zoo_name_lists_presets() -> None:
    with pytest.raises(SpecError, match="unknown zoo preset 'transformer-tyni'") as info:
        load_spec("zoo:transformer-tyni")
    issue = info.value.issues[0]
    assert issue.suggestion == "zoo:transformer-tiny"
    assert "zoo:transformer-tiny" in issue.allowed


def test_every_zoo_preset_loads() -> None:
    for name in zoo_names():
        spec = load_spec(f"zoo:{name}")
        assert load_spec(yaml.safe_load(spec.dump())) == spec


# -- base composition ------------------------------------------------------------------------


def test_base_relative_to_including_file_lists_replaced(write: Write) -> None:
    write("common/base.yaml", BASE)
    top = write(
        "exp/top.yaml",
        """
        base: ../common/base.yaml
        model:
          d_model: 32
          special_tokens: [eos]
          layers:
            symbols:
              A: {width: 2}
    """,
    )
    spec = load_spec(top)
    assert spec.model.d_model == 32
    assert spec.model.special_tokens == ["eos"]  # lists are replaced, not merged
    assert spec.model.layers.symbols["A"].width == 2  # dicts merge deeply ...
    assert spec.model.layers.symbols["A"].type == "fake_seq"  # ... keeping the base's keys
    assert spec.model.layers.pattern == "A-*-A*--"


def test_bases_merge_in_order_then_the_file(write: Write) -> None:
    write("a.yaml", BASE)
    write("b.yaml", "model: {d_model: 32, max_seq_len: 64}\n")
    top = write("top.yaml", "base: [a.yaml, b.yaml]\nmodel: {max_seq_len: 16}\n")
    spec = load_spec(top)
    assert (spec.model.d_model, spec.model.max_seq_len) == (32, 16)


def test_zoo_base(write: Write) -> None:
    top = write("top.yaml", "base: zoo:transformer-tiny\nmodel: {d_model: 128}\n")
    spec = load_spec(top)
    assert spec.model.d_model == 128 and spec.model.layers.symbols["*"].head_dim == 32


def test_error_inherited_through_base_points_at_the_base(write: Write) -> None:
    write("base.yaml", BASE.replace("width: 4}", "width: 0}"))
    top = write("top.yaml", "base: base.yaml\nmodel:\n  d_model: -1\n")
    with pytest.raises(SpecError) as info:
        load_spec(top)
    width = issue_at(info.value, "model.layers.symbols.A.width")
    assert width.origin == f"{top.parent / 'base.yaml'}:11:34"
    assert issue_at(info.value, "model.d_model").origin == f"{top}:3:12"


def test_base_cycle_shows_the_chain(write: Write) -> None:
    write("a.yaml", "base: b.yaml\nmodel: {d_model: 8}\n")
    write("b.yaml", "base: [c.yaml]\n")
    c = write("c.yaml", "base: a.yaml\n")
    with pytest.raises(
        SpecError,
        match=r"`base:` cycle: .*a\.yaml -> .*b\.yaml -> .*c\.yaml "
        r"-> .*a\.yaml",
    ) as info:
        load_spec(c.parent / "a.yaml")
    assert info.value.issues[0].origin == f"{c}:1:7"


def test_self_base_is_a_cycle(write: Write) -> None:
    a = write("a.yaml", "base: ./a.yaml\n")
    with pytest.raises(SpecError, match="cycle"):
        load_spec(a)


def test_diamond_bases_are_not_a_cycle(write: Write) -> None:
    write("root.yaml", BASE)
    write("l.yaml", "base: root.yaml\nmodel: {d_model: 32}\n")
    write("r.yaml", "base: root.yaml\nmodel: {max_seq_len: 64}\n")
    spec = load_spec(write("top.yaml", "base: [l.yaml, r.yaml]\n"))
    assert (spec.model.d_model, spec.model.max_seq_len) == (64, 64)  # r's root resets d_model


# -- the layer-form rule -----------------------------------------------------------------------


def test_pattern_override_replaces_a_ratio_base(write: Write) -> None:
    path = write("base.yaml", BASE)
    spec = load_spec(path, ["model.layers.pattern=AA-A"])
    assert spec.model.layers.pattern == "AA-A"
    assert spec.model.layers.requested.pattern == "AA-A"
    assert spec.model.layers.requested.n_layers is None


def test_pattern_file_replaces_a_ratio_base(write: Write) -> None:
    write("base.yaml", BASE)
    spec = load_spec(
        write(
            "top.yaml",
            "base: base.yaml\nmodel:\n  layers: {layer_types: [A, U]}\n  arch: encoder\n",
        )
    )
    assert spec.model.layers.pattern == "AU"


def test_ratio_part_override_keeps_the_other_ratio_keys(write: Write) -> None:
    spec = load_spec(write("base.yaml", BASE), ["model.layers.n_layers=16"])
    assert len(spec.model.layers.pattern) == 16
    assert spec.model.layers.requested.ratios == {"*": 0.25, "-": 0.5}


def test_ratios_replace_a_pattern_base(write: Write) -> None:
    write(
        "base.yaml",
        BASE.replace("n_layers: 8", "pattern: AA")
        .replace('    ratios: {"*": 0.25, "-": 0.5}\n', "")
        .replace("    fill: A\n", ""),
    )
    assert load_spec(write("p.yaml", "base: base.yaml\n")).model.layers.pattern == "AA"
    top = write(
        "top.yaml",
        'base: base.yaml\nmodel:\n  layers: {n_layers: 4, ratios: {"*": 0.5}, fill: A}\n',
    )
    assert load_spec(top).model.layers.pattern == "A*A*"[:0] + load_spec(top).model.layers.pattern
    assert sorted(load_spec(top).model.layers.pattern) == sorted("AA**")


def test_two_forms_in_one_source_is_an_error_even_if_overridden(write: Write) -> None:
    path = write("both.yaml", BASE.replace("n_layers: 8", "n_layers: 8\n    pattern: A-"))
    with pytest.raises(SpecError, match="sets both ratios and pattern; they are exclusive"):
        load_spec(path, ["model.layers.pattern=AA"])


def test_two_forms_in_overrides_is_an_error(write: Write) -> None:
    with pytest.raises(SpecError, match="overrides set both pattern and ratios") as info:
        load_spec(write("base.yaml", BASE), ["model.layers.pattern=A", "model.layers.fill=A"])
    assert info.value.issues[0].origin == "<override model.layers.fill=A>"


# -- overrides ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "path", "value"),
    [
        ("model.d_model=128", ("model", "d_model"), 128),
        ("model.dropout=0.5", ("model", "dropout"), 0.5),
        ("model.tie_embeddings=false", ("model", "tie_embeddings"), False),
        ("model.special_tokens=[pad, eos]", ("model", "special_tokens"), ["pad", "eos"]),
        ("model.classifier=null", ("model", "classifier"), None),
        ("model.layers.symbols.*.mode= beta ", ("model", "layers", "symbols", "*", "mode"), "beta"),
        ("a.b[0][1].c=x", ("a", "b", 0, 1, "c"), "x"),
        ("x=a=b", ("x",), "a=b"),
    ],
)
def test_parse_override(text: str, path: tuple, value: object) -> None:
    override = parse_override(text)
    assert override.path == tuple(str(p) if isinstance(p, str) else p for p in path)
    assert override.value == value and override.origin == f"<override {text}>"


def test_override_list_indices_both_syntaxes(write: Write) -> None:
    path = write(
        "base.yaml",
        BASE + "    overrides:\n      - {at: [0], set: {width: 2}}\n"
        "      - {at: [1], set: {hidden: 7}}\n",
    )
    spec = load_spec(
        path, ["model.layers.overrides.0.set.width=8", "model.layers.overrides[1].at=[3]"]
    )
    assert spec.model.layers.overrides[0].set == {"width": 8}
    assert spec.model.layers.overrides[1].at == [3]
    configs = spec.model.layer_configs()
    assert configs[0].width == 8 and configs[3].hidden == 7 and configs[1].hidden == 129


def test_overridden_value_errors_point_at_the_override(write: Write) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(
            write("base.yaml", BASE), ["model.layers.symbols.A.width=abc", "model.max_seq_len=0"]
        )
    width = issue_at(info.value, "model.layers.symbols.A.width")
    assert width.origin == "<override model.layers.symbols.A.width=abc>"
    assert issue_at(info.value, "model.max_seq_len").origin == "<override model.max_seq_len=0>"


def test_override_value_starting_with_a_yaml_indicator_is_a_string(write: Write) -> None:
    spec = load_spec(
        write("base.yaml", BASE + TRAIN),
        ["model.layers.pattern=*-*-", "train.task.files[1]=@y"],
    )
    assert spec.model.layers.pattern == "*-*-" and spec.train.task.files == ["a.txt", "@y"]


def test_failed_override_leaves_nothing_behind(write: Write) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(write("base.yaml", BASE), ["train.steps[0]=1"])
    assert len(info.value.issues) == 1  # no half-created `train: {steps: {}}`
    assert (
        "train.steps is not set in the spec and has no default list" in info.value.issues[0].message
    )


def test_python_containers_are_plain_data() -> None:
    """Any Mapping and Sequence is read as the YAML it stands for (OmegaConf is not a
    dependency: a read-only mapping stands in for a foreign container)."""
    data = yaml.safe_load(BASE)
    data["model"]["special_tokens"] = ("eos",)
    data["model"]["layers"]["symbols"]["A"] = MappingProxyType({"type": "fake_seq", "width": 2})
    spec = load_spec(MappingProxyType({"model": MappingProxyType(data["model"])}))
    assert spec.model.special_tokens == ["eos"] and spec.model.layers.symbols["A"].width == 2


def test_interpolated_value_is_reported_where_the_reference_is_written(write: Write) -> None:
    """Provenance is per value: a reference resolved to a value that is valid where it
    was written but not where it is used points at the referencing line."""
    text = BASE.replace("  d_model: 64\n", "  d_model: 64\n  dropout: 0.0\n  init:\n")
    text = text.replace("  init:\n", "  init:\n    std: ${model.dropout}\n", 1)
    with pytest.raises(SpecError) as info:
        load_spec(write("interp.yaml", text))
    (issue,) = info.value.issues
    assert issue.path == ("model", "init", "std") and str(issue.origin).endswith("interp.yaml:6:10")
    assert "greater than 0" in issue.message and issue.value == 0.0


def test_override_creates_missing_mappings(write: Write) -> None:
    spec = load_spec(
        write("base.yaml", BASE),
        [
            "train.task.type=mqar",
            "train.optimizer.lr=0.01",
            "train.max_steps=5",
            "model.layers.symbols.Z={type: fake_seq}",
        ],
    )
    assert spec.train is not None and spec.train.task.type == "mqar"
    assert spec.train.optimizer.lr == 0.01 and spec.train.max_steps == 5
    assert "Z" not in spec.model.layers.symbols  # bound but unused


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("model.d_model", "is not of the form key.path=value"),
        ("=3", "is not of the form key.path=value"),
        ("model..d_model=3", "empty or invalid part"),
        ("model.d_model[0]=3", "cannot set 0 inside model.d_model: it is int"),
        ("model.layers[0]=3", "model.layers is a mapping, not a list"),
        ("model.special_tokens.5=eos", "index 5 is out of range for model.special_tokens"),
        ("model.special_tokens.x=eos", "model.special_tokens is a list; 'x' is not an index"),
        ("model.d_model=[1, 2", "is not valid YAML"),
    ],
)
def test_malformed_overrides(write: Write, override: str, fragment: str) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(write("base.yaml", BASE), [override])
    issue = info.value.issues[0]
    assert issue.origin == f"<override {override}>"
    assert fragment in issue.message


def test_non_string_override() -> None:
    with pytest.raises(SpecError, match="an override must be a string, got int"):
        load_spec("zoo:transformer-tiny", [3])  # type: ignore[list-item]


# -- interpolation ---------------------------------------------------------------------------------


def test_interpolation(write: Write) -> None:
    path = write(
        "i.yaml",
        BASE
        + """
train:
  task:
    type: text
    seq_len: ${model.max_seq_len}
    files:
      - "w${model.layers.symbols.A.width}-${model.special_tokens[1]}-${train.seed}.txt"
      - "\\\\${not.a.reference}"
    val_size: ${train.max_steps}
  max_steps: ${train.task.seq_len}
  seed: 3
  early_stop: {metric: val/loss, threshold: "${train.optimizer.lr}"}
  optimizer: {lr: 0.5}
""",
    )
    spec = load_spec(path, ["model.max_seq_len=${model.d_model}"])
    assert spec.model.max_seq_len == 64
    task = spec.train.task
    assert task.seq_len == 64 and spec.train.max_steps == 64 and task.val_size == 64
    assert task.files == ["w4-bos-3.txt", "${not.a.reference}"]
    assert spec.train.early_stop.threshold == 0.5


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("${oc.env:MIXSTACK_TEST_TOKEN}", "resolver call ${oc.env:...} is not allowed"),
        ("${oc.env:MIXSTACK_TEST_TOKEN,default}", "resolver call ${oc.env:...}"),
        ("${now:%Y}", "resolver call ${now:...}"),
        ("x${oc.decode:1}", "resolver call ${oc.decode:...}"),
        ("${${model.d_model}}", "resolver call ${nested:...}"),
        ("${model.nope}", "${model.nope} refers to a missing key (model.nope does not exist)"),
        ("${model.special_tokens[7]}", "missing key"),
        ("${model d_model}", "malformed interpolation"),
        ("${model.d_model", "unterminated interpolation"),
        ("${train.x}", "interpolation cycle: train.x -> train.x"),
        ("a ${model.special_tokens}", "cannot be interpolated inside a longer string"),
    ],
)
def test_interpolation_errors(
    write: Write, monkeypatch: pytest.MonkeyPatch, value: str, fragment: str
) -> None:
    monkeypatch.setenv("MIXSTACK_TEST_TOKEN", "hf_secret_token")
    path = write("i.yaml", BASE + f"train:\n  x: '{value}'\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    issue = info.value.issues[0]
    assert fragment in issue.message
    assert issue.origin == f"{path}:16:6"
    assert "hf_secret_token" not in str(info.value)


def test_interpolation_cycle_through_two_keys(write: Write) -> None:
    path = write("i.yaml", BASE + "train: {a: '${train.b}', b: '${train.a}'}\n")
    with pytest.raises(SpecError, match=r"interpolation cycle: train\.a -> train\.b -> train\.a"):
        load_spec(path)


# -- canonical dump and identity -------------------------------------------------------------------

ROUND_TRIP_SPECS = {
    "ratios": BASE,
    "pattern-overrides": BASE.replace("n_layers: 8", 'pattern: "(A-)2 | *-"')
    .replace('    ratios: {"*": 0.25, "-": 0.5}\n', "")
    .replace("    fill: A\n", "")
    + "    overrides:\n      - {at: ['0:4:2'], set: {width: 2, scale: 3.0}}\n"
    + "      - {at: [-2], set: {mode: alpha}}\n",
    "layer-types-encoder": BASE.replace("n_layers: 8", "layer_types: [A, U, '-']")
    .replace('    ratios: {"*": 0.25, "-": 0.5}\n', "")
    .replace("    fill: A\n", "")
    .replace("causal_lm", "encoder"),
    "composite-classifier": """
model:
  arch: classifier
  classifier: {n_classes: 3, pooling: last}
  d_model: 32
  layers:
    pattern: S-S
    symbols:
      S:
        type: fake_stack
        layers: [{type: fake_seq}, {type: fake_wrap, inner: {type: fake_channel}}]
      "-": {type: fake_channel, hidden: 5}
train: {task: {type: majority, seq_len: 16}, optimizer: {lr: 0.001}, max_steps: 3}
run: {backend: {attention: torch}, compile: true}
""",
}


@pytest.mark.parametrize("name", list(ROUND_TRIP_SPECS))
def test_dump_round_trip(write: Write, name: str) -> None:
    spec = load_spec(write(f"{name}.yaml", ROUND_TRIP_SPECS[name]))
    again = load_spec(yaml.safe_load(spec.dump()))
    assert again == spec
    assert load_spec(spec.to_dict()) == spec
    assert again.dump() == spec.dump()
    assert again.spec_hash == spec.spec_hash
    assert again.model.layer_configs() == spec.model.layer_configs()
    assert spec.to_dict()["schema_version"] == SCHEMA_VERSION


def test_dumped_schema_version_must_match() -> None:
    data = load_spec("zoo:transformer-tiny").to_dict()
    newer = SCHEMA_VERSION + 1
    with pytest.raises(SpecError, match=f"schema_version {newer} is newer than") as info:
        load_spec({**data, "schema_version": newer})
    assert f"reads (1..{SCHEMA_VERSION})" in str(info.value)


def test_dumped_request_must_match_pattern() -> None:
    data = load_spec("zoo:transformer-tiny").to_dict()
    data["model"]["layers"]["requested"] = {"pattern": "*--"}
    with pytest.raises(SpecError, match=r"layers\.requested does not realize to layers\.pattern"):
        load_spec(data)


def test_layer_configs_equal_fresh_realization(write: Write) -> None:
    spec = load_spec(write("p.yaml", ROUND_TRIP_SPECS["pattern-overrides"]))
    fresh = ModelSpec.model_validate(spec.model.canonical())
    assert tuple(realize_layer_configs(fresh)) == spec.model.layer_configs()
    configs = spec.model.layer_configs()
    assert spec.model.layers.pattern == "A-A-|*-"
    seq = [c for c in configs if c.type == "fake_seq"]
    assert [(c.width, c.scale, c.mode) for c in seq] == [
        (2, 3.0, "alpha"),
        (2, 3.0, "alpha"),
        (8, 8.0, "alpha"),
    ]


def test_read_back_spec_merges_overrides_like_the_validator(write: Write) -> None:
    """Both take the one merge path: a type-changing override is refused by each, and an
    override on one layer leaves the other layers of its symbol as bound."""
    spec = load_spec(write("p.yaml", ROUND_TRIP_SPECS["pattern-overrides"]))
    data = spec.model.canonical()
    data["layers"]["overrides"].append({"at": [1], "set": {"type": "fake_seq"}})
    with pytest.raises(ValueError, match=r"cannot change a layer's type \('fake_channel' ->"):
        ModelSpec.model_validate(data).layer_configs()
    with pytest.raises(SpecError, match=r"overrides\[2\]\.set\.type: an override cannot change"):
        load_spec({"model": data})
    data["layers"]["overrides"][-1] = {"at": [1], "set": {"hidden": 7}}
    configs = ModelSpec.model_validate(data).layer_configs()
    assert [getattr(c, "hidden", None) for c in configs] == [None, 7, None, 129, None, 129]
    assert spec.model.layers.symbols["*"].mode == "beta"  # the binding itself is unchanged


def _hash_by_hand(spec: Spec) -> str:
    model = spec.model.model_dump(mode="json")
    model["layers"].pop("requested")
    payload = {"schema_version": SCHEMA_VERSION, "model": model}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def test_spec_hash_identity(write: Write) -> None:
    spec = load_spec(write("base.yaml", BASE))
    assert spec.spec_hash == _hash_by_hand(spec)
    # key order
    data = yaml.safe_load(BASE)
    reordered = {"model": dict(reversed(list(data["model"].items())))}
    reordered["model"]["layers"] = dict(reversed(list(data["model"]["layers"].items())))
    assert load_spec(reordered).spec_hash == spec.spec_hash
    # unused bindings, train and run sections
    extra = load_spec(
        spec,
        [
            "model.layers.symbols.Q={type: fake_noncausal, k: 3}",
            "train={task: {type: mqar}, max_steps: 1}",
            "run.compile=true",
        ],
    )
    assert extra.spec_hash == spec.spec_hash
    # ratios vs the literal pattern they realize to
    literal = load_spec(spec, [f"model.layers.pattern={spec.model.layers.pattern}"])
    assert literal.model.layers.requested != spec.model.layers.requested
    assert literal.spec_hash == spec.spec_hash
    # an architectural change changes it
    assert load_spec(spec, ["model.d_model=32"]).spec_hash != spec.spec_hash
    assert load_spec(spec, ["model.layers.symbols.A.mode=beta"]).spec_hash != spec.spec_hash


def test_default_bindings_fill_unbound_symbols(write: Write) -> None:
    defaults = registry.default_bindings()
    path = write("d.yaml", "model:\n  d_model: 32\n  layers: {pattern: '*-*'}\n")
    spec = load_spec(path)
    assert spec.model.layers.symbols["*"].type == defaults["*"]["type"]
    assert spec.model.layers.symbols["-"].type == defaults["-"]["type"]


def test_relative_display_name(write: Write, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write("rel.yaml", "model:\n  d_model: x\n  layers: {pattern: A}\n")
    monkeypatch.chdir(path.parent)
    with pytest.raises(SpecError) as info:
        load_spec("rel.yaml")
    assert info.value.issues[0].origin == "rel.yaml:2:12"
    with pytest.raises(SpecError) as info:
        load_spec(Path(os.path.abspath("rel.yaml")))
    assert info.value.issues[0].origin == f"{path}:2:12"
