"""A table of malformed specs: each must fail with one SpecError naming the origin
(file:line), the YAML path and what is allowed. Uses the real attention and mlp layers."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mixstack.dsl.errors import SpecError, format_path
from mixstack.dsl.loader import load_spec

VALID = """\
model:
  arch: causal_lm
  vocab_size: 256
  d_model: 64
  max_seq_len: 128
  layers:
    pattern: "(*-)2"
    symbols:
      "*": {type: attention, n_heads: 4, rope: {theta: 10000}}
      "-": {type: mlp, activation: swiglu}
"""
PATTERN_LINE = '    pattern: "(*-)2"\n'


def edit(old: str, new: str, text: str = VALID) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


def ratios(spec: str) -> str:
    """VALID with the pattern replaced by a ratio request (same line count + 2 at the end)."""
    ratio_line, n_layers, fill = spec.split("|")
    return edit(PATTERN_LINE, f"    ratios: {ratio_line}\n") + (
        f"    n_layers: {n_layers}\n    fill: '{fill}'\n"
    )


OVERRIDE = VALID + "    overrides:\n      - {at: %s, set: %s}\n"  # the override is on line 12


@dataclass(frozen=True)
class Case:
    id: str
    files: dict[str, str]
    origin: str  # "file.yaml:LINE" or an exact origin such as "<override ...>"
    path: str  # format_path of the issue's YAML path
    fragment: str  # must appear in the rendered issue (message, got, allowed, did-you-mean)
    overrides: tuple[str, ...] = ()
    source: str = "main.yaml"
    extra: dict[str, str] = field(default_factory=dict)


def main(text: str) -> dict[str, str]:
    return {"main.yaml": text}


CASES = [
    Case(
        "unknown-type",
        main(edit("type: mlp,", "type: mpl,")),
        "main.yaml:10",
        "model.layers.symbols.-.type",
        "did you mean 'mlp'?",
    ),
    Case(
        "missing-type",
        main(edit("{type: mlp, activation", "{activation")),
        "main.yaml:10",
        "model.layers.symbols.-",
        "registered types: attention",
    ),
    Case(
        "misspelled-model-key",
        main(edit("d_model: 64", "d_modle: 64")),
        "main.yaml:4",
        "model.d_modle",
        "did you mean 'd_model'?",
    ),
    Case(
        "misspelled-layer-key",
        main(edit("n_heads: 4", "n_haeds: 4")),
        "main.yaml:9",
        "model.layers.symbols.*.n_haeds",
        "did you mean 'n_heads'?",
    ),
    Case(
        "misspelled-layers-key",
        main(edit("pattern:", "patern:")),
        "main.yaml:7",
        "model.layers.patern",
        "did you mean 'pattern'?",
    ),
    Case(
        "misspelled-top-key",
        main(VALID + "trian: {}\n"),
        "main.yaml:11",
        "trian",
        "did you mean 'train'?",
    ),
    Case(
        "wrong-value-type",
        main(edit("d_model: 64", "d_model: sixty")),
        "main.yaml:4",
        "model.d_model",
        "allowed: an integer >= 1",
    ),
    Case(
        "out-of-range",
        main(edit("vocab_size: 256", "vocab_size: 0")),
        "main.yaml:3",
        "model.vocab_size",
        "allowed: >= 1",
    ),
    Case(
        "out-of-range-layer-field",
        main(edit("n_heads: 4", "n_heads: 0")),
        "main.yaml:9",
        "model.layers.symbols.*.n_heads",
        "allowed: >= 1",
    ),
    Case(
        "bad-literal",
        main(edit("swiglu", "swiglo")),
        "main.yaml:10",
        "model.layers.symbols.-.activation",
        "did you mean 'swiglu'?",
    ),
    Case(
        "bad-arch",
        main(edit("arch: causal_lm", "arch: decoder")),
        "main.yaml:2",
        "model.arch",
        "one of 'causal_lm', 'encoder', 'classifier'",
    ),
    Case(
        "unknown-symbol",
        main(edit("(*-)2", "(*-)2Z")),
        "main.yaml:7",
        "model.layers.pattern",
        "symbol 'Z' is used by the layers but not bound",
    ),
    Case(
        "pattern-column",
        main(edit("(*-)2", "(*-)0")),
        "main.yaml:7",
        "model.layers.pattern",
        "repeat count 0: a group must repeat at least once at column 5",
    ),
    Case(
        "pattern-with-ratios",
        main(VALID + "    n_layers: 4\n"),
        "main.yaml:11",
        "model.layers.n_layers",
        "sets both pattern and ratios; they are exclusive",
    ),
    Case(
        "ratios-sum-above-1",
        main(ratios('{"*": 0.6, "-": 0.6}|4|A')),
        "main.yaml:7",
        "model.layers.ratios",
        "ratios sum to 1.2, more than 1",
    ),
    Case(
        "ratio-out-of-range",
        main(ratios('{"*": 1.5}|4|-')),
        "main.yaml:7",
        "model.layers.ratios.*",
        "a number in [0, 1]",
    ),
    Case(
        "fill-among-ratios",
        main(ratios('{"*": 0.5}|4|*')),
        "main.yaml:7",
        "model.layers.ratios.*",
        "the fill symbol '*' cannot also have a ratio",
    ),
    Case(
        "ratios-do-not-fit",
        main(ratios('{"*": 0.5, "-": 0.5}|3|A')),
        "main.yaml:7",
        "model.layers.ratios.-",
        "at most n_layers = 3",
    ),
    Case(
        "ratio-form-incomplete",
        main(edit(PATTERN_LINE, "    n_layers: 4\n")),
        "main.yaml:6",
        "model.layers",
        "ratio form needs ratios, fill",
    ),
    Case(
        "bad-layer-types",
        main(edit(PATTERN_LINE, "    layer_types: ['*', '12']\n")),
        "main.yaml:7",
        "model.layers.layer_types[1]",
        "exactly one character",
    ),
    Case(
        "override-index-out-of-range",
        main(OVERRIDE % ("[4]", "{window: 8}")),
        "main.yaml:12",
        "model.layers.overrides[0].at[0]",
        "indices -4..3",
    ),
    Case(
        "override-bad-slice",
        main(OVERRIDE % ("['1:x']", "{window: 8}")),
        "main.yaml:12",
        "model.layers.overrides[0].at[0]",
        "must hold integers",
    ),
    Case(
        "override-changes-type",
        main(OVERRIDE % ("[0]", "{type: mlp}")),
        "main.yaml:12",
        "model.layers.overrides[0].set.type",
        "bind another symbol for another type",
    ),
    Case(
        "override-bad-value",
        main(OVERRIDE % ("[0]", "{window: 0}")),
        "main.yaml:12",
        "model.layers.overrides[0].set.window",
        "allowed: >= 1",
    ),
    Case(
        "override-unknown-field",
        main(OVERRIDE % ("[1]", "{hiden: 8}")),
        "main.yaml:12",
        "model.layers.overrides[0].set.hiden",
        "did you mean 'hidden'?",
    ),
    Case(
        "invalid-yaml",
        main(edit("{theta: 10000}}", "{theta: 10000}")),
        "main.yaml:10",
        "<root>",
        "invalid YAML: expected ',' or '}'",
    ),
    Case(
        "duplicate-key",
        main(VALID + "  d_model: 32\n"),
        "main.yaml:11",
        "model.d_model",
        "duplicate key 'd_model' (first set at line 4)",
    ),
    Case(
        "top-level-not-mapping",
        main("- model\n"),
        "main.yaml:1",
        "<root>",
        "a mapping with a `model:` section",
    ),
    Case("empty-file", main("# nothing\n"), "main.yaml:1", "<root>", "the spec file is empty"),
    Case(
        "missing-file",
        {},
        "nope.yaml",
        "<root>",
        "spec file 'nope.yaml' does not exist",
        source="nope.yaml",
    ),
    Case(
        "missing-base-file",
        main("base: other.yaml\n" + VALID),
        "main.yaml:1",
        "<root>",
        "other.yaml' does not exist",
    ),
    Case(
        "unknown-zoo-base",
        main("base: zoo:transfomer-tiny\n" + VALID),
        "main.yaml:1",
        "<root>",
        "did you mean 'zoo:transformer-tiny'?",
    ),
    Case(
        "unknown-zoo-source",
        {},
        "zoo:transformer",
        "<root>",
        "allowed: zoo:",
        source="zoo:transformer",
    ),
    Case(
        "base-not-a-path",
        main("base: 3\n" + VALID),
        "main.yaml:1",
        "base",
        "`base:` must be a path or a list of paths",
    ),
    Case(
        "cycle-in-base",
        {"main.yaml": "base: a.yaml\n" + VALID, "a.yaml": "base: main.yaml\n"},
        "a.yaml:1",
        "base",
        "`base:` cycle",
    ),
    Case(
        "bad-value-through-base",
        {"base.yaml": edit("d_model: 64", "d_model: -8"), "main.yaml": "base: base.yaml\n"},
        "base.yaml:4",
        "model.d_model",
        "allowed: >= 1",
    ),
    Case(
        "bad-cli-override",
        main(VALID),
        "<override model.d_model=abc>",
        "model.d_model",
        "allowed: an integer",
        overrides=("model.d_model=abc",),
    ),
    Case(
        "malformed-cli-override",
        main(VALID),
        "<override model.layers.symbols>",
        "<root>",
        "is not of the form key.path=value",
        overrides=("model.layers.symbols",),
    ),
    Case(
        "cli-index-into-non-list",
        main(VALID),
        "<override model.layers.pattern[0]=x>",
        "<root>",
        "cannot set 0 inside model.layers.pattern: it is str",
        overrides=("model.layers.pattern[0]=x",),
    ),
    Case(
        "cli-index-out-of-range",
        main(VALID + "  special_tokens: [pad]\n"),
        "<override model.special_tokens[9]=pad>",
        "<root>",
        "index 9 is out of range for model.special_tokens",
        overrides=("model.special_tokens[9]=pad",),
    ),
    Case(
        "cli-two-forms",
        main(VALID),
        "<override model.layers.n_layers=4>",
        "model.layers",
        "overrides set both pattern and ratios",
        overrides=("model.layers.pattern=**", "model.layers.n_layers=4"),
    ),
    Case(
        "noncausal-in-causal-lm",
        main(edit("n_heads: 4,", "n_heads: 4, causal: false,")),
        "main.yaml:9",
        "model.layers.symbols.*.causal",
        "'*' (type attention) at layers [0, 2] is not causal",
    ),
    Case(
        "window-in-encoder",
        main(edit("causal_lm", "encoder", edit("n_heads: 4,", "n_heads: 4, window: 8,"))),
        "main.yaml:9",
        "model.layers.symbols.*.window",
        "needs causal attention",
    ),
    Case(
        "missing-model",
        main("run: {compile: true}\n"),
        "main.yaml:1",
        "model",
        "a `model:` mapping",
    ),
    Case(
        "missing-layers",
        main("model: {d_model: 8}\n"),
        "main.yaml:1",
        "model.layers",
        "missing required key 'layers'",
    ),
    Case(
        "classifier-without-head",
        main(edit("causal_lm", "classifier")),
        "main.yaml:2",
        "model.classifier",
        "classifier: {n_classes: N}",
    ),
    Case(
        "classifier-without-n-classes",
        main(edit("causal_lm", "classifier") + "  classifier: {pooling: mean}\n"),
        "main.yaml:11",
        "model.classifier.n_classes",
        "missing required key 'n_classes'",
    ),
    Case(
        "classifier-on-causal-lm",
        main(VALID + "  classifier: {n_classes: 3}\n"),
        "main.yaml:11",
        "model.classifier",
        "only used by arch classifier",
    ),
    Case(
        "resolver-call",
        main(edit("d_model: 64", "d_model: ${oc.env:HOME}")),
        "main.yaml:4",
        "model.d_model",
        "allowed: plain references like ${model.d_model}",
    ),
    Case(
        "missing-interpolation",
        main(edit("d_model: 64", "d_model: ${model.width}")),
        "main.yaml:4",
        "model.d_model",
        "${model.width} refers to a missing key",
    ),
    Case(
        "check-divisibility",
        main(edit("d_model: 64", "d_model: 60", edit("n_heads: 4", "n_heads: 8"))),
        "main.yaml:9",
        "model.layers.symbols.*.n_heads",
        "d_model (60) is not divisible",
    ),
    Case(
        "check-gqa",
        main(edit("n_heads: 4", "n_heads: 4, n_kv_heads: 3")),
        "main.yaml:9",
        "model.layers.symbols.*.n_kv_heads",
        "must be a multiple of n_kv_heads",
    ),
    Case(
        "schema-version",
        main("schema_version: 4\n" + VALID),
        "main.yaml:1",
        "schema_version",
        "newer than this mixstack reads (1..3)",
    ),
    Case(
        "bad-backend",
        main(VALID + "run: {backend: [torch]}\n"),
        "main.yaml:11",
        "run.backend",
        "{kernel: provider} mapping",
    ),
    Case(
        "repeated-special-token",
        main(VALID + "  special_tokens: [pad, pad]\n"),
        "main.yaml:11",
        "model.special_tokens",
        "special_tokens repeats pad",
    ),
    Case(
        "train-not-mapping",
        main(VALID + "train: 3\n"),
        "main.yaml:11",
        "train",
        "train must be a mapping",
    ),
]


def _origin_matches(origin: str | None, expected: str, tmp_path: Path) -> bool:
    if origin is None:
        return False
    if expected.startswith("<") or expected.startswith("zoo:"):
        return origin == expected
    name, _, line = expected.partition(":")
    if not line:
        return origin == name or origin.endswith("/" + name)
    return re.fullmatch(rf"(.*/)?{re.escape(name)}:{line}:\d+", origin) is not None


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_spec(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, text in case.files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError) as info:
        load_spec(case.source, case.overrides)
    issues = info.value.issues
    matching = [
        i for i in issues if format_path(i.path) == case.path and case.fragment in i.render()
    ]
    assert matching, "\n".join(i.render() for i in issues)
    assert any(_origin_matches(i.origin, case.origin, tmp_path) for i in matching), [
        i.origin for i in matching
    ]
    assert case.fragment in str(info.value)  # the rendered error carries it too


def test_table_is_large_enough() -> None:
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


def test_valid_template_loads(tmp_path: Path) -> None:
    (tmp_path / "main.yaml").write_text(VALID, encoding="utf-8")
    spec = load_spec(tmp_path / "main.yaml")
    assert spec.model.layers.pattern == "*-*-"
