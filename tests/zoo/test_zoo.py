"""The zoo: published shapes exact to the parameter, hybrid patterns character for
character, every preset valid and reportable on the meta device, every tiny twin trained
for 20 steps, the README table regenerated from the presets, ``zoo list`` / ``zoo show``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import mixstack
from mixstack.cli.main import app
from mixstack.dsl.loader import load_spec
from mixstack.dsl.ratios import allocate
from mixstack.tasks import make_task
from mixstack.training.data import TaskDataset, collate
from mixstack.training.losses import compute_loss, objective_for
from mixstack.training.optim import build_optimizer
from mixstack.zoo.table import Row, markdown_table, presets, render, row

README = Path(__file__).resolve().parent.parent.parent / "README.md"
PRESETS = presets()
REAL = [p for p in PRESETS if p.alias_of is None]
TWINS = [p.name for p in REAL if p.name.endswith("-tiny")]
runner = CliRunner()

# The Megatron allocations, as published (NVIDIA/Megatron-LM examples/mamba).
HYBRID_8B = "M-M-M--M-M*-M-M-M-M--M*-M-M-M-M-M*--M-M-M-M-M*-M--M-M-M-"
HYBRID_800M = "M-M-M--M-*M-M-M-M--*M-M-M-M-*M--M-M-M-*M-M--M-M-"
NEMOTRON_H_8B = "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-"


@pytest.fixture(scope="module")
def rows() -> dict[str, Row]:
    """Every preset loaded, built on the meta device and counted, once."""
    return {p.name: row(p) for p in REAL}


# -- published figures ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "count", "rows_"),
    [("mamba-130m", 129_135_360, 50_280), ("mamba2-130m", 128_989_632, 50_288)],
)
def test_mamba_checkpoints_are_exact_to_the_parameter(rows, name, count, rows_) -> None:
    """The issue's figures, counted from the reference configurations: GPT-NeoX's 50277
    ids padded to 50280 / 50288 embedding rows, tied head."""
    assert rows[name].params == count
    spec = load_spec(f"zoo:{name}").model
    assert (spec.padded_vocab, spec.tie_embeddings, spec.d_model, spec.n_layers) == (
        rows_,
        True,
        768,
        24,
    )


def test_exact_published_counts_equal_the_meta_count(rows) -> None:
    exact = {p.name: p.published_count for p in REAL if p.published_count is not None}
    assert set(exact) == {"mamba-130m", "mamba2-130m", "llama-7b"}
    for name, count in exact.items():
        assert rows[name].params == count, name


def test_rounded_published_figures_round_to_the_meta_count(rows) -> None:
    """Figures published as 9.78B / 153M: our count rounds to them."""
    assert rows["bamba-9b"].published == "9.78B"
    assert round(rows["bamba-9b"].params / 1e9, 2) == 9.78
    assert rows["hyena-153m"].published == "153M"
    assert math.floor(rows["hyena-153m"].params / 1e6) == 153


def test_every_header_cites_a_source_and_a_published_figure_or_says_none() -> None:
    for item in REAL:
        assert item.header[0].startswith(f"{item.name}: "), item.name
        assert item.field("Source"), item.name
        value = item.field("Published parameters")
        assert value, item.name
        # a figure, or an explicit statement that there is none / it is unconfirmed
        assert item.published is not None or value.split()[0] in ("none", "unconfirmed"), value


# -- patterns -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "pattern", "counts"),
    [
        ("mamba2-hybrid-8b", HYBRID_8B, {"M": 24, "*": 4, "-": 28}),
        ("mamba2-hybrid-800m", HYBRID_800M, {"M": 20, "*": 4, "-": 24}),
        ("nemotron-h-8b", NEMOTRON_H_8B, {"M": 24, "*": 4, "-": 24}),
    ],
)
def test_hybrid_patterns_are_the_published_strings(name, pattern, counts) -> None:
    layers = load_spec(f"zoo:{name}").model.layers
    assert layers.pattern == pattern
    assert {s: layers.symbols_in_order.count(s) for s in counts} == counts


@pytest.mark.parametrize(("n", "pattern"), [(56, HYBRID_8B), (48, HYBRID_800M)])
def test_the_nvidia_hybrids_are_megatrons_allocation(n, pattern) -> None:
    """Both are the Megatron allocation of attention ratio 0.08 and MLP ratio 0.5."""
    assert allocate(n, [("*", 0.08), ("-", 0.5)], "M") == pattern


def test_bamba_places_attention_at_blocks_9_18_27() -> None:
    symbols = load_spec("zoo:bamba-9b").model.layers.symbols_in_order
    blocks = ["".join(symbols[i : i + 2]) for i in range(0, len(symbols), 2)]
    assert len(blocks) == 32 and set(blocks) == {"M-", "*-"}
    assert [i for i, b in enumerate(blocks) if b == "*-"] == [9, 18, 27]


def test_aliases_load_the_preset_they_name() -> None:
    aliases = {p.name: p.alias_of for p in PRESETS if p.alias_of is not None}
    assert aliases == {"hybrid-8b-shape": "mamba2-hybrid-8b", "transformer-tiny": "llama-tiny"}
    for old, new in aliases.items():
        assert load_spec(f"zoo:{old}") == load_spec(f"zoo:{new}")


# -- every preset ---------------------------------------------------------------------------------


def test_every_family_has_one_tiny_twin_with_a_train_section() -> None:
    families = {p.name.rsplit("-", 1)[0] for p in REAL if not p.name.endswith("-tiny")}
    for family in families:
        assert f"{family}-tiny" in TWINS, family
    for name in TWINS:
        assert load_spec(f"zoo:{name}").train is not None, name


@pytest.mark.parametrize("name", [p.name for p in REAL])
def test_every_preset_reports_on_the_meta_device(rows, name) -> None:
    spec = load_spec(f"zoo:{name}")
    model = mixstack.build(spec, device="meta")
    report = model.report(min(spec.model.max_seq_len, 256))
    assert len(report.rows) == spec.model.n_layers
    assert report.total_params == rows[name].params
    assert report.total_flops_per_token > 0 and report.total_state_bytes >= 0
    assert all(p.device.type == "meta" for p in model.parameters())


def test_the_readme_table_is_generated_from_the_presets(rows) -> None:
    text = README.read_text(encoding="utf-8")
    assert render(text, markdown_table(PRESETS, rows)) == text, (
        "README.md's zoo table is stale: run python -m mixstack.zoo.table README.md"
    )


def test_a_stale_table_is_detected(tmp_path, rows, monkeypatch) -> None:
    import mixstack.zoo.table as table

    stale = README.read_text(encoding="utf-8").replace("129,135,360", "129,135,361", 1)
    path = tmp_path / "README.md"
    path.write_text(stale, encoding="utf-8")
    monkeypatch.setattr(table, "row", lambda item: rows[item.name])
    assert table.main([str(path), "--check"]) == 1
    assert table.main([str(path)]) == 0
    assert path.read_text(encoding="utf-8") == README.read_text(encoding="utf-8")


# -- tiny twins: forward, backward, 20 training steps -----------------------------------------


def _train_twenty_steps(name: str) -> tuple[list[float], torch.nn.Module]:
    spec = load_spec(f"zoo:{name}", ["train.batch_size=8"])
    assert spec.train is not None
    model = mixstack.build(spec, seed=spec.train.seed)
    task = make_task(spec.train, spec.model)
    data = TaskDataset(task, "train", spec)
    objective = objective_for(spec.model.arch)
    optimizer = build_optimizer(model, spec.train.optimizer)
    losses = []
    for step in range(20):
        batch = collate([data[(step, i)] for i in range(spec.train.batch_size)])
        logits = model(batch["input_ids"], seq_idx=batch.get("seq_idx"))
        loss = compute_loss(objective, logits, batch["labels"])
        optimizer.zero_grad()
        loss.backward()
        if step == 0:  # forward + backward reach every parameter
            missing = [n for n, p in model.named_parameters() if p.grad is None]
            assert not missing, (name, missing)
        optimizer.step()
        losses.append(loss.item())
    return losses, model


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a shared 2-core runner extra
    threads only add contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", TWINS)
def test_tiny_twin_trains_twenty_steps(name, one_thread) -> None:
    torch.manual_seed(0)  # dropout-free twins; only the data and the seed decide
    losses, _ = _train_twenty_steps(name)
    assert all(math.isfinite(x) for x in losses), losses
    assert sum(losses[-5:]) / 5 < losses[0], losses  # it learns something


# -- the command line -----------------------------------------------------------------------------


def test_zoo_list_is_one_line_per_preset_and_marks_aliases() -> None:
    result = runner.invoke(app, ["zoo", "list"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    body = [x for x in lines if x.startswith("│ ")]
    assert len(body) == len(PRESETS)  # exactly one line each, nothing wrapped
    for item in PRESETS:
        (line,) = [x for x in lines if x.startswith(f"│ {item.name} ")]
        if item.alias_of is not None:
            assert f"alias of {item.alias_of}" in line and "(old name)" in line
    (mamba,) = [x for x in lines if x.startswith("│ mamba-130m ")]
    assert "(M)24" in mamba and "129.14M" in mamba and "Gu & Dao 2023" in mamba


def test_zoo_show_prints_the_preset_and_an_alias_its_target() -> None:
    result = runner.invoke(app, ["zoo", "show", "mamba-130m"])
    assert result.exit_code == 0
    item = next(p for p in PRESETS if p.name == "mamba-130m")
    assert result.stdout == item.text
    alias = runner.invoke(app, ["zoo", "show", "zoo:transformer-tiny"])
    assert alias.exit_code == 0
    assert "base: zoo:llama-tiny" in alias.stdout and "llama-tiny: the CPU twin" in alias.stdout


def test_zoo_show_unknown_name_is_a_clean_error() -> None:
    result = runner.invoke(app, ["zoo", "show", "mamba-13m"])
    assert result.exit_code == 1
    assert "unknown zoo preset 'mamba-13m'" in result.stderr
    assert "did you mean" in result.stderr
