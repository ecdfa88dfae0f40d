"""``mixstack bench``: the equality checks that gate every timing, the report files, the
comparison with an earlier run. No time is asserted anywhere (only that figures exist
and ratios are ratios of the recorded medians)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mixstack.benchmarks import references as R
from mixstack.benchmarks import report, suites
from mixstack.cli.main import app
from mixstack.kernels import native

pytest.importorskip("transformers")
runner = CliRunner()
SMALL = R.MixerShape(d_model=32, headdim=8, d_state=8, chunk=16, mamba1_d_state=4)


def _params(module: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"x": x, **dict(module.named_parameters())}


@pytest.mark.parametrize("which", ["mamba2", "mamba1"])
def test_transformers_mixers_hold_our_weights_and_agree(which: str) -> None:
    ours = R.ours_mamba2(SMALL) if which == "mamba2" else R.ours_mamba1(SMALL)
    ref = R.hf_mamba2(ours, SMALL) if which == "mamba2" else R.hf_mamba1(ours, SMALL)
    x = torch.randn(2, 37, SMALL.d_model, requires_grad=True)  # 37: not a chunk multiple
    err = R.check_pair(which, lambda: ours(x), _params(ours, x), lambda: ref(x), _params(ref, x))
    assert err < R.RTOL
    # the check is not vacuous: a changed weight in the reference is caught, by name
    with torch.no_grad():
        ref.out_proj.weight[0, 0] += 0.5
    with pytest.raises(R.EqualityError, match=r"differs from the reference.*no timing"):
        R.check_pair(which, lambda: ours(x), _params(ours, x), lambda: ref(x), _params(ref, x))


def test_llama_mapping_gives_the_same_loss_and_gradients() -> None:
    import mixstack

    shape = R.LlamaShape(
        n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, ffn=48, vocab=64, batch=2, seq_len=16
    )
    ours = mixstack.build(mixstack.load_spec(R.transformer_pp_spec(shape)), seed=0)
    ref = R.hf_llama(ours, shape)
    ids = torch.randint(0, shape.vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    by_ref = dict(ref.named_parameters())
    mapping = R.llama_param_map(shape.n_layers)
    assert set(mapping) == set(dict(ours.named_parameters()))
    err = R.check_pair(
        "llama",
        lambda: R.lm_loss(ours(ids), ids),
        dict(ours.named_parameters()),
        lambda: ref(input_ids=ids, labels=ids).loss,
        {k: by_ref[v] for k, v in mapping.items()},
    )
    assert err < R.RTOL
    # lm_loss is the shifted next-token cross-entropy, written out
    logits = ours(ids)
    manual = -torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).mean()
    torch.testing.assert_close(R.lm_loss(logits, ids), manual)


def test_close_is_relative_to_the_tensor_scale() -> None:
    b = torch.tensor([1000.0, 0.0, -1.0])
    assert R.close(b * (1 + 5e-5), b)[0]
    assert not R.close(b + torch.tensor([0.0, 0.0, 1.0]), b)[0]


def test_check_run_writes_the_report_and_times_nothing(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["bench", "--suite", "all", "--size", "small", "--check", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["format"] == report.FORMAT
    assert data["entries"] == [] and data["ratios"] == []
    names = " ".join(data["checks"])
    for pair in ("Mamba2Mixer", "MambaMixer", "reference kernels", "LlamaForCausalLM", "decode"):
        assert pair in names
    assert all(err < R.RTOL for err in data["checks"].values())
    machine = data["machine"]
    assert machine["threads"] == torch.get_num_threads() and machine["torch"] == torch.__version__
    assert any(k.startswith("ssd_scan@cpu") for k in machine["backends"])
    assert "Equality checks" in (tmp_path / "bench.md").read_text()


def test_timed_run_reports_medians_ratios_and_compares(tmp_path: Path) -> None:
    opts = suites.replace(
        suites.small_options(), lengths=(32,), reps=2, presets=("transformer-tiny",)
    )
    result = suites.run_suites(["mixers", "decode"], opts)
    by = {(e.name, e.mode): e for e in result.entries}
    m2, hf = by["mamba2", "fwd+bwd"], by["transformers Mamba2Mixer", "fwd+bwd"]
    ratio = next(r for r in result.ratios if r.name.startswith("Mamba2Mixer"))
    assert ratio.value == pytest.approx(hf.median / m2.median)
    assert len(m2.times) == 2 and m2.peak_bytes is not None and m2.peak_bytes > 0
    # decode: the state of attention grows with the context, Mamba-2's does not
    dec = {e.name: e for e in result.entries if e.suite == "decode"}
    assert dec["mamba2"].extra["state_bytes"] > 0
    data = report.to_json(result, {"cpu": "x"}, {})
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    rows = report.compare(data, report.load_json(path))
    assert rows and all(r[3] == pytest.approx(1.0) for r in rows)


def test_compare_refuses_a_foreign_file(tmp_path: Path) -> None:
    bad = tmp_path / "x.json"
    bad.write_text('{"entries": []}')
    result = runner.invoke(app, ["bench", "--check", "--size", "small", "--compare", str(bad)])
    assert result.exit_code == 1
    assert "is not a `mixstack bench` result" in result.output
    result = runner.invoke(app, ["bench", "--suite", "speed", "--check"])
    assert result.exit_code == 1 and "--suite must be one of mixers" in result.output
    result = runner.invoke(app, ["bench", "--lengths", "64,x", "--check", "--size", "small"])
    assert result.exit_code == 1 and "comma-separated integers" in result.output


def test_a_float64_run_arbitrates_a_gap_that_is_the_references_rounding() -> None:
    x = torch.randn(64, requires_grad=True, generator=torch.Generator().manual_seed(0))
    x64 = x.detach().double().requires_grad_()
    exact = (lambda: x64 * 2.0, {"x": x64})
    off = 1 + 3e-4  # a relative gap of 3e-4 > RTOL

    def pair(ours_scale: float, ref_scale: float, **kw: object) -> float:
        return R.check_pair(
            "toy",
            lambda: x * 2.0 * ours_scale,
            {"x": x},
            lambda: x * 2.0 * ref_scale,
            {"x": x},
            **kw,  # type: ignore[arg-type]
        )

    # the reference is the one off float64: accepted, ours' error against float64 counts
    assert pair(1.0, off, exact=exact) < 1e-5  # fp32 rounding of the cotangent only
    # without the float64 run the same gap stops the benchmark
    with pytest.raises(R.EqualityError, match=r"toy: output differs .*error [23]\.\d\de-04 > rtol"):
        pair(1.0, off)
    # ours off float64 (the reference exact): refused, with ours' error
    with pytest.raises(R.EqualityError, match=r"toy: output differs .*error [23]\.\d\de-04 > rtol"):
        pair(off, 1.0, exact=exact)


def test_contenders_run_only_the_chosen_comparisons() -> None:
    opts = suites.replace(
        suites.small_options(), lengths=(32,), reps=1, memory=False, contenders=("hydra",)
    )
    result = suites.run_suites(["mixers", "models"], opts)
    # hydra brings mamba2 (its ratio's denominator) and nothing else: no reference built,
    # no equality check, no model timed
    assert {e.name for e in result.entries} == {"mamba2", "hydra"}
    assert [r.name for r in result.ratios] == ["hydra / mamba2 (fwd)"]
    assert result.checks == {}
    hydra = next(e for e in result.entries if e.name == "hydra" and e.mode == "fwd")
    assert result.ratios[0].value == pytest.approx(
        hydra.median
        / next(e for e in result.entries if (e.name, e.mode) == ("mamba2", "fwd")).median
    )
    opts = suites.replace(opts, contenders=("mamba1-hf",))
    result = suites.run_suites(["mixers"], opts)
    assert {e.name for e in result.entries} == {"mamba1", "transformers MambaMixer"}
    assert [r.name for r in result.ratios] == ["MambaMixer / mamba1 (fwd+bwd)"]
    # a pair brings its check and its ratio
    opts = suites.replace(opts, contenders=("mamba2-hf", "llama"), check_only=True)
    result = suites.run_suites(["mixers", "models"], opts)
    assert sorted(result.checks) == [
        "mamba2 vs transformers Mamba2Mixer (L=32)",
        "transformer++ vs LlamaForCausalLM loss (L=64)",
    ]


def test_contenders_refuses_unknown_names_with_the_valid_list(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        ["bench", "--size", "small", "--check", "--contenders", "mamba2-hf,mamba3"],
    )
    assert result.exit_code == 1
    assert "'mamba3' is not a comparison of the suite(s) mixers" in result.output
    for name in (
        "mamba2-hf",
        "mamba1-hf",
        "hydra",
        "lower-bound",
        "mamba2-reference",
        "mamba2-torch",
    ):
        assert name in result.output
    # a models name is not a mixers comparison
    result = runner.invoke(app, ["bench", "--check", "--contenders", "llama"])
    assert result.exit_code == 1 and "'llama' is not a comparison" in result.output
    out = tmp_path / "b"
    result = runner.invoke(
        app,
        ["bench", "--size", "small", "--check", "--contenders", "mamba1-hf", "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    checks = json.loads((out / "bench.json").read_text())["checks"]
    assert list(checks) == ["mamba1 vs transformers MambaMixer (L=64)"]


def test_a_contender_slower_than_the_threshold_gets_fewer_rounds() -> None:
    from mixstack.benchmarks.timing import interleave

    calls = {"fast": 0, "slow": 0}

    def fast() -> None:
        calls["fast"] += 1

    def slow() -> None:
        calls["slow"] += 1
        time.sleep(0.02)

    times = interleave({"fast": fast, "slow": slow}, reps=4, slow_s=0.01, slow_reps=1)
    assert len(times["fast"]) == 4 and len(times["slow"]) == 1
    # one warm-up each; the slow one's warm-up is its one timed call
    assert calls == {"fast": 5, "slow": 1}
    times = interleave({"fast": fast, "slow": slow}, reps=4, slow_s=0.01, slow_reps=2)
    assert len(times["slow"]) == 2 and calls == {"fast": 10, "slow": 3}
    times = interleave({"fast": fast, "slow": slow}, reps=3)  # no threshold: every round
    assert len(times["slow"]) == 3


def test_chunk_sets_both_sides_and_the_bound_and_drops_the_goals(tmp_path: Path) -> None:
    """``--chunk``: ours, transformers' and the lower bound's FLOP count all use it; the
    goals (stated at the default chunk) are not applied to another one."""
    small = suites.small_options()
    reports = {}
    for chunk in (None, 8):
        out = tmp_path / str(chunk)
        args = ["bench", "--size", "small", "--lengths", str(small.goal_length), "--reps", "1"]
        args += ["--contenders", "mamba2-hf,lower-bound", "--out", str(out)]
        result = runner.invoke(app, args + ([] if chunk is None else ["--chunk", str(chunk)]))
        assert result.exit_code == 0, result.output
        reports[chunk] = json.loads((out / "bench.json").read_text())
    assert reports[None]["options"]["mixer"]["chunk"] == small.mixer.chunk == 32
    assert reports[8]["options"]["mixer"]["chunk"] == 8
    for chunk, data in reports.items():
        length = small.goal_length
        entries = {e["name"]: e for e in data["entries"]}
        rate = entries["projection GEMMs"]["extra"]["flop_s"]
        shape = R.MixerShape(**data["options"]["mixer"])
        flops = R.ours_mamba2(shape).flops_per_token(length)
        bound = entries["mamba2 matmul lower bound"]["times"][0]
        assert bound == pytest.approx(3 * flops * length / rate)
        goals = [r["goal"] for r in data["ratios"]]
        assert goals == ([1.5, 1.8] if chunk is None else [None, None])
    # the two chunk sizes count different FLOPs (so the check above tells them apart)
    flops = [
        R.ours_mamba2(suites.replace(small.mixer, chunk=c)).flops_per_token(small.goal_length)
        for c in (8, small.mixer.chunk)
    ]
    assert flops[0] != flops[1]


def test_torch_kernels_contender_shows_the_pure_torch_figure() -> None:
    """``mamba2-torch``: the same layer pinned to the torch kernels, checked equal to the
    default one, with its ratios, and its own entry in the resolved backends."""
    opts = suites.replace(
        suites.small_options(),
        lengths=(32,),
        reps=2,
        contenders=("mamba2-torch", "mamba2-hf", "lower-bound"),
    )
    result = suites.run_suites(["mixers"], opts)
    assert list(result.checks) == [
        "mamba2 vs transformers Mamba2Mixer (L=32)",
        "mamba2 vs mamba2 on torch kernels (L=32)",
    ]
    by = {(e.name, e.mode): e.median for e in result.entries}
    ratios = {r.name: r.value for r in result.ratios}
    pure = by["mamba2 (torch kernels)", "fwd+bwd"]
    assert ratios["torch kernels / default kernels, mamba2 (fwd+bwd)"] == pytest.approx(
        pure / by["mamba2", "fwd+bwd"]
    )
    assert ratios["Mamba2Mixer / mamba2 on torch kernels (fwd+bwd)"] == pytest.approx(
        by["transformers Mamba2Mixer", "fwd+bwd"] / pure
    )
    bound = by["mamba2 matmul lower bound", "fwd+bwd"]
    assert ratios["mamba2 on torch kernels / matmul lower bound (fwd+bwd)"] == pytest.approx(
        pure / bound
    )
    pinned = {k: v for k, v in result.backends.items() if "(mamba2 (torch kernels))" in k}
    if native.unavailable("ssd") is None:  # the default resolved to native, the pin differs
        assert result.backends["ssd_scan@cpu/float32"] == "native"
        assert pinned["ssd_scan@cpu/float32 (mamba2 (torch kernels))"] == "torch"
    else:
        assert result.backends["ssd_scan@cpu/float32"] == "torch" and not pinned
