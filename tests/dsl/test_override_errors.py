"""Overrides and file errors located where the user can act on them: an index into a
list the file does not spell out addresses the field's default; a symbol that is not
bound is named with the bound ones; an error inside a section an override created
points at the override, not at the file; a repeated special token points at
``model.special_tokens``; a non-UTF-8 file names the line, column and byte."""

from __future__ import annotations

from pathlib import Path

import pytest

from mixstack.dsl.errors import SpecError, format_path
from mixstack.dsl.loader import load_spec

SPEC = """\
model:
  d_model: 32
  vocab_size: 16
  layers:
    pattern: "M-"
    symbols:
      M: {type: mamba2, headdim: 16, d_state: 8}
      "-": {type: mlp}
"""


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC)
    return path


def test_an_index_into_a_default_list_changes_that_entry(spec_file: Path) -> None:
    spec = load_spec(spec_file, ["model.layers.symbols.M.A_init_range[1]=8.0"])
    assert spec.model.layers.symbols["M"].A_init_range == (1.0, 8.0)  # default (1, 16)
    spec = load_spec(spec_file, ["model.layers.symbols.M.dt_limit.1=0.5"])
    assert spec.model.layers.symbols["M"].dt_limit == (0.0, 0.5)
    spec = load_spec(spec_file, ["model.special_tokens[1]=mask", "model.special_tokens[3]=bos"])
    assert spec.model.special_tokens == ["pad", "mask", "eos", "bos"]


def test_an_index_where_there_is_no_default_list_says_so(spec_file: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(spec_file, ["model.layers.symbols.M.nope[0]=1"])
    text = str(info.value)
    assert "<override model.layers.symbols.M.nope[0]=1>" in text
    assert "not set in the spec and has no default list" in text
    assert "is a mapping" not in text


def test_an_unbound_symbol_is_named_with_the_bound_ones(spec_file: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(spec_file, ["model.layers.symbols.x.n_heads=4"])
    text = str(info.value)
    assert "<override model.layers.symbols.x.n_heads=4>" in text
    assert "symbol 'x' is not bound" in text and "bound: 'M', '-'" in text
    assert str(spec_file) not in text  # blamed on the override, not the file


def test_an_error_in_a_section_an_override_created_points_at_the_override(
    spec_file: Path,
) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(spec_file, ["symbols.x.n_heads=abc"])
    issue = info.value.issues[0]
    assert issue.origin == "<override symbols.x.n_heads=abc>"
    assert "unknown key 'symbols'" in issue.message
    with pytest.raises(SpecError) as info:
        load_spec(spec_file, ["train.task.type=mqar", "train.task.n_pairs=x"])
    origins = {format_path(i.path): i.origin for i in info.value.issues}
    assert origins["train.task.n_pairs"] == "<override train.task.n_pairs=x>"
    assert all(o.startswith("<override") for o in origins.values()), origins


def test_a_repeated_special_token_points_at_special_tokens(spec_file: Path) -> None:
    spec_file.write_text(
        SPEC.replace("  d_model: 32\n", "  d_model: 32\n  special_tokens: [pad, pad]\n")
    )
    with pytest.raises(SpecError) as info:
        load_spec(spec_file)
    issue = info.value.issues[0]
    assert format_path(issue.path) == "model.special_tokens"
    assert issue.origin.startswith(f"{spec_file}:3:")
    assert "repeats pad" in issue.message


def test_a_non_utf8_file_names_line_column_and_byte(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(SPEC.replace("d_model: 32", "d_model: 3\xe92").encode("latin-1"))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    issue = info.value.issues[0]
    assert issue.origin == f"{path}:2:13"
    assert "byte 0xe9 at line 2, column 13" in issue.message
