"""generate() against repeated full forwards (no state), token for token in float64.

Every decode-capable layer type in the registry (each of its examples, so a layer
registered later is covered the moment it exists) and mixed hybrids are checked after
an odd-length prefill and with left-padded batches of unequal prompts; sampled
generation against the same processors written here and the same seeded generator;
generation past max_seq_len against the same weights built with a larger max_seq_len.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

from mixstack.archs.builder import build
from mixstack.archs.models import MixStackModel
from mixstack.dsl import registry
from mixstack.dsl.base import LayerExample
from mixstack.dsl.errors import CapabilityError, MixstackError
from mixstack.dsl.spec import ModelSpec
from mixstack.generation import generate

VOCAB = 12  # + 4 specials = 16 ids
MLP = {"type": "mlp", "hidden": 24, "activation": "gelu"}


def make_model(
    pattern: str,
    symbols: dict[str, Any],
    *,
    d_model: int = 16,
    max_seq_len: int = 32,
    seed: int = 0,
    **model: Any,
) -> MixStackModel:
    """A float64 causal LM in eval mode; init std 0.1 so logits are far from ties."""
    data = {
        "arch": "causal_lm",
        "vocab_size": VOCAB,
        "max_seq_len": max_seq_len,
        "d_model": d_model,
        "init": {"std": 0.1},
        "layers": {"pattern": pattern, "symbols": symbols},
    }
    data.update(model)
    return build(ModelSpec.model_validate(data), seed=seed, dtype=torch.float64).eval()


def reference_decode(
    model: MixStackModel,
    prompt: list[int],
    n_new: int,
    pick: Callable[[Tensor, list[int]], int] | None = None,
) -> list[int]:
    """``n_new`` tokens after ``prompt``, each from a full forward over the whole
    sequence so far (``pick(logits (V,), sequence) -> id``; default argmax)."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n_new):
            logits = model(torch.tensor([seq]))[0, -1]
            seq.append(int(logits.argmax()) if pick is None else pick(logits, seq))
    return seq[len(prompt) :]


def prompts(lengths: list[int], seed: int = 0, high: int = VOCAB) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, high, (n,), generator=g).tolist() for n in lengths]


def left_pad(rows: list[list[int]], pad: int) -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask) (B, max len), padding on the left."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


N_NEW = 7


def decode_examples() -> list[Any]:
    """(layer type, example) for every causal, decode-capable example in the registry."""
    out = []
    for entry in registry.entries():
        if entry.kind not in ("sequence", "channel"):
            continue
        for i, example in enumerate(entry.config_cls.examples()):
            if example.arch != "causal_lm":
                continue
            ctx = example.context()
            caps = example.config.resolve(ctx).capabilities(ctx)
            if caps.decode and caps.causal:
                out.append(pytest.param(example, id=f"{entry.name}-{example.name or i}"))
    return out


def example_model(example: LayerExample, max_seq_len: int | None = None, **kwargs: Any):
    """Two of the layer around an MLP: ``A-A``."""
    layer = example.config.model_dump(mode="json")
    return make_model(
        "A-A",
        {"A": layer, "-": MLP},
        d_model=example.d_model,
        max_seq_len=max_seq_len or example.max_seq_len,
        **kwargs,
    )


HYBRIDS = {
    "mamba2-attention-mlp": (
        "M*-M-*",
        {
            "M": {"type": "mamba2", "d_state": 8, "headdim": 8, "chunk_size": 4},
            "*": {"type": "attention", "n_heads": 4, "n_kv_heads": 2},
            "-": MLP,
        },
    ),
    "windowed-s4d-mamba-parallel": (
        "W-SP",
        {
            "W": {"type": "attention", "n_heads": 2, "window": 3},
            "S": {"type": "s4d", "d_state": 4},
            "P": {
                "type": "parallel",
                "layers": [
                    {"type": "mamba", "d_state": 4},
                    {"type": "attention", "n_heads": 2, "window": 5},
                ],
            },
            "-": MLP,
        },
    ),
    "sequential-block": (
        "BM",
        {
            "B": {"type": "sequential", "layers": [{"type": "attention", "n_heads": 2}, MLP]},
            "M": {"type": "mamba2", "d_state": 8, "headdim": 8, "chunk_size": 3},
        },
    ),
}


def hybrid(name: str, **kwargs: Any):
    pattern, symbols = HYBRIDS[name]
    return make_model(pattern, symbols, **kwargs)


def check_greedy(model, lengths: list[int]) -> None:
    """One batch of left-padded prompts (or a single prompt) against each row alone."""
    rows = prompts(lengths, seed=sum(lengths))
    pad = model.spec.special_ids["pad"]
    ids, mask = left_pad(rows, pad)
    out = generate(
        model, ids, attention_mask=mask, max_new_tokens=N_NEW, eos_token_id=[], seed=None
    )
    for r, row in enumerate(rows):
        want = reference_decode(model, row, N_NEW)
        assert out.new_tokens[r].tolist() == want, f"row {r} (prompt length {len(row)})"
    assert out.stop_reasons == ["length"] * len(rows)
    assert out.lengths.tolist() == [N_NEW] * len(rows)
    assert torch.equal(out.sequences[:, : ids.shape[1]], ids)


@pytest.mark.parametrize("example", decode_examples())
def test_every_decode_layer_greedy_equals_full_forwards(example: LayerExample) -> None:
    model = example_model(example)
    check_greedy(model, [5])  # odd-length prefill
    check_greedy(model, [3, 6, 5])  # left-padded batch of unequal prompts


@pytest.mark.parametrize("name", sorted(HYBRIDS))
def test_hybrids_greedy_equals_full_forwards(name: str) -> None:
    model = hybrid(name)
    check_greedy(model, [7])
    check_greedy(model, [2, 9, 4, 9])


def reference_processors(logits, seq, *, temperature, top_k, top_p, penalty):
    """The processors written out for one row (transformers' order)."""
    scores = logits.clone()
    for token in set(seq):
        scores[token] = scores[token] / penalty if scores[token] > 0 else scores[token] * penalty
    scores = scores / temperature
    kth = torch.sort(scores, descending=True).values[top_k - 1]
    scores[scores < kth] = -math.inf
    probs = torch.softmax(scores, dim=-1)
    order = torch.argsort(scores, descending=True).tolist()
    mass, keep = 0.0, set()
    for i in order:
        keep.add(i)
        mass += float(probs[i])
        if mass >= top_p:
            break
    for i in range(scores.numel()):
        if i not in keep:
            scores[i] = -math.inf
    return scores


@pytest.mark.parametrize("name", sorted(HYBRIDS))
def test_sampling_equals_full_forwards_with_the_same_generator(name: str) -> None:
    """Sampled tokens are diverse, so a wrong state shows up within a few tokens."""
    model = hybrid(name)
    knobs = {"temperature": 1.7, "top_k": 9, "top_p": 0.95}
    prompt = prompts([5], seed=3)[0]
    out = generate(
        model,
        torch.tensor([prompt]),
        max_new_tokens=12,
        repetition_penalty=1.3,
        eos_token_id=[],
        seed=11,
        **knobs,
    )
    g = torch.Generator().manual_seed(11)

    def pick(logits, seq):
        scores = reference_processors(logits, seq, penalty=1.3, **knobs)
        return int(torch.multinomial(torch.softmax(scores, -1)[None], 1, generator=g)[0, 0])

    want = reference_decode(model, prompt, 12, pick)
    assert out.new_tokens[0].tolist() == want
    assert len(set(want)) > 3, "the test needs diverse samples to mean anything"
    assert out.seed == 11


def test_seeded_sampling_is_reproducible_and_seeds_matter() -> None:
    model = hybrid("mamba2-attention-mlp")
    ids = torch.tensor(prompts([4, 4], seed=1))
    kwargs = {"max_new_tokens": 10, "temperature": 2.0, "eos_token_id": []}
    a = generate(model, ids, seed=5, **kwargs)
    b = generate(model, ids, generator=torch.Generator().manual_seed(5), **kwargs)
    c = generate(model, ids, seed=6, **kwargs)
    assert torch.equal(a.sequences, b.sequences)
    assert not torch.equal(a.sequences, c.sequences)
    fresh = generate(model, ids, **kwargs)
    assert isinstance(fresh.seed, int)
    again = generate(model, ids, seed=fresh.seed, **kwargs)
    assert torch.equal(fresh.sequences, again.sequences)


def test_num_return_sequences_repeats_rows_in_order() -> None:
    model = hybrid("mamba2-attention-mlp")
    rows = prompts([3, 5], seed=2)
    ids, mask = left_pad(rows, model.spec.special_ids["pad"])
    kwargs = {"max_new_tokens": 6, "temperature": 1.5, "eos_token_id": [], "seed": 4}
    out = generate(model, ids, attention_mask=mask, num_return_sequences=3, **kwargs)
    assert out.sequences.shape == (6, ids.shape[1] + 6)
    assert torch.equal(out.sequences[:, : ids.shape[1]], ids.repeat_interleave(3, dim=0))
    # the draws are one generator over the (6, V) batch: rows differ
    assert len({tuple(r) for r in out.new_tokens.tolist()}) > 1


def test_eos_stops_rows_and_pads_them_and_min_new_tokens_bans_eos() -> None:
    model = hybrid("mamba2-attention-mlp")
    rows = prompts([5, 5], seed=8)
    ids = torch.tensor(rows)
    free = [reference_decode(model, row, N_NEW) for row in rows]
    eos = free[0][2]  # row 0 reaches it at its third token
    pad = model.spec.special_ids["pad"]
    out = generate(model, ids, max_new_tokens=N_NEW, eos_token_id=eos, output_scores=True)
    for r, want in enumerate(free):
        stop = want.index(eos) + 1 if eos in want else N_NEW
        got = out.new_tokens[r].tolist()
        assert got[:stop] == want[:stop]
        assert got[stop:] == [pad] * (out.new_tokens.shape[1] - stop)
        assert out.lengths[r] == stop
        assert out.stop_reasons[r] == ("eos" if eos in want else "length")
    assert out.scores is not None and out.scores.shape[:2] == (out.new_tokens.shape[1], 2)
    # min_new_tokens: EOS gets -inf before it, so row 0 continues as if EOS were banned
    banned = generate(model, ids[:1], max_new_tokens=N_NEW, eos_token_id=eos, min_new_tokens=4)

    def pick(logits, seq):
        if len(seq) - len(rows[0]) < 4:
            logits = logits.clone()
            logits[eos] = -math.inf
        return int(logits.argmax())

    want = reference_decode(model, rows[0], N_NEW, pick)
    stop = want.index(eos) + 1 if eos in want[4:] else N_NEW
    assert banned.new_tokens[0, :stop].tolist() == want[:stop]


def test_eos_defaults_to_the_spec_special_id() -> None:
    model = hybrid("mamba2-attention-mlp")
    eos = model.spec.special_ids["eos"]
    row = prompts([4], seed=0)[0]
    free = generate(model, torch.tensor([row]), max_new_tokens=3, eos_token_id=[])
    biased = make_model(*HYBRIDS["mamba2-attention-mlp"])
    with torch.no_grad():  # make EOS the argmax everywhere through the tied head
        biased.embedding.weight[eos] = biased.embedding.weight[free.new_tokens[0, 0]] * 50
    out = generate(biased, torch.tensor([row]), max_new_tokens=5)
    assert out.stop_reasons == ["eos"] and out.new_tokens[0, 0] == eos


# -- past max_seq_len ----------------------------------------------------------------------
SHORT = 12


def bounded_examples() -> list[Any]:
    out = []
    for param in decode_examples():
        (example,) = param.values
        if example_model(example, max_seq_len=SHORT).unbounded_state_reasons() == []:
            out.append(param)
    return out


@pytest.mark.parametrize("example", bounded_examples())
def test_past_max_seq_len_equals_a_larger_max_seq_len(example: LayerExample) -> None:
    short = example_model(example, max_seq_len=SHORT)
    long = example_model(example, max_seq_len=4 * SHORT)
    long.load_state_dict(short.state_dict())
    prompt = prompts([5], seed=4)[0]
    n_new = 3 * SHORT
    out = generate(short, torch.tensor([prompt]), max_new_tokens=n_new, eos_token_id=[])
    assert out.new_tokens[0].tolist() == reference_decode(long, prompt, n_new)


def test_every_registered_bounded_layer_is_covered() -> None:
    covered = {p.id.split("-")[0] for p in bounded_examples()}
    assert {"mamba", "mamba2", "s4d", "mlp", "attention"} <= covered


def test_hybrid_past_max_seq_len_with_left_padding() -> None:
    short = hybrid("windowed-s4d-mamba-parallel", max_seq_len=SHORT)
    long = hybrid("windowed-s4d-mamba-parallel", max_seq_len=4 * SHORT)
    long.load_state_dict(short.state_dict())
    rows = prompts([3, 8], seed=6)
    ids, mask = left_pad(rows, short.spec.special_ids["pad"])
    out = generate(short, ids, attention_mask=mask, max_new_tokens=3 * SHORT, eos_token_id=[])
    for r, row in enumerate(rows):
        assert out.new_tokens[r].tolist() == reference_decode(long, row, 3 * SHORT)


def test_state_bytes_stay_constant_past_max_seq_len() -> None:
    model = hybrid("windowed-s4d-mamba-parallel", max_seq_len=SHORT)
    state = model.init_state(1, 3 * SHORT + 2)
    assert state.nbytes() == model.init_state(1, SHORT).nbytes()
    model(torch.tensor([[1]]), state=state)
    sizes = []
    for t in range(3 * SHORT + 1):
        model.step(torch.tensor([t % VOCAB]), state)
        sizes.append(state.nbytes())
    assert state.offset == 3 * SHORT + 2
    assert sizes[0] == sizes[-1] == max(sizes) == min(sizes)
    report = model.report(seq_len=3 * SHORT, dtype=torch.float64)
    assert report.total_state_bytes == sizes[0]
    assert model.report(seq_len=SHORT, dtype=torch.float64).total_state_bytes == sizes[0]
    assert report.state_bounded


def test_full_attention_is_refused_past_max_seq_len_naming_the_layer() -> None:
    model = hybrid("mamba2-attention-mlp", max_seq_len=SHORT)
    with pytest.raises(CapabilityError) as info:
        generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=SHORT)
    message = str(info.value)
    assert "exceeds max_seq_len 12" in message
    assert "layer 1 (symbol '*', type 'attention'): full attention keeps every key" in message
    assert "layer 5 (symbol '*', type 'attention')" in message
    assert "mamba2" not in message
    # up to max_seq_len it generates
    assert generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=SHORT - 2).lengths.tolist()


def test_composite_children_and_learned_positions_are_named() -> None:
    pattern, symbols = HYBRIDS["sequential-block"]
    model = make_model(pattern, symbols, max_seq_len=SHORT, embedding={"positional": "learned"})
    reasons = model.unbounded_state_reasons()
    assert reasons[0].startswith("the learned position embedding has 12 rows")
    assert reasons[1].startswith("layer 0 (symbol 'B', type 'attention', blocks.0.mixer)")
    assert len(reasons) == 2


def test_a_layer_that_does_not_declare_a_bounded_state_is_refused(monkeypatch) -> None:
    """Unbounded is the default: a mixer that says nothing (a plugin, the n-gram layer)
    is refused past max_seq_len even when its state happens to have a fixed size."""
    from mixstack.mixers.mamba2 import Mamba2

    monkeypatch.setattr(Mamba2, "bounded_state", property(lambda self: False))
    model = hybrid("sequential-block", max_seq_len=SHORT)
    with pytest.raises(CapabilityError, match=r"layer 1 \(symbol 'M', type 'mamba2'\): its decode"):
        generate(model, torch.tensor([[1, 2]]), max_new_tokens=SHORT)


# -- refusals ---------------------------------------------------------------------------------
def test_models_that_cannot_generate_are_refused_naming_the_layer() -> None:
    hyena = {"type": "hyena"}
    model = make_model("-H", {"-": MLP, "H": hyena})
    with pytest.raises(
        CapabilityError, match=r"layer 1 \(symbol 'H', type 'hyena'\) cannot decode"
    ):
        generate(model, torch.tensor([[1]]), max_new_tokens=2)
    # a bidirectional layer (a ModelSpec built directly; the loader refuses it already)
    model = make_model("-*", {"-": MLP, "*": {"type": "attention", "n_heads": 2, "causal": False}})
    with pytest.raises(
        CapabilityError, match=r"layer 1 \(symbol '\*', type 'attention'\) is not causal"
    ):
        generate(model, torch.tensor([[1]]), max_new_tokens=2)
    encoder = make_model("*", {"*": {"type": "attention", "n_heads": 2}}, arch="encoder")
    with pytest.raises(CapabilityError, match="generation needs arch 'causal_lm'"):
        generate(encoder, torch.tensor([[1]]), max_new_tokens=2)
    with pytest.raises(MixstackError, match="generate needs a MixStackModel"):
        generate(torch.nn.Linear(2, 2), torch.tensor([[1]]), max_new_tokens=2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"attention_mask": torch.tensor([[1, 1, 0]])}, r"row 0 has padding after a token"),
        ({"attention_mask": torch.tensor([[0, 0, 0]])}, r"row 0 has padding after a token"),
        ({"attention_mask": torch.tensor([[1, 1]])}, r"input_ids' shape \(1, 3\), got \(1, 2\)"),
        ({"attention_mask": torch.tensor([[0.5, 1, 1]])}, "0 \\(padding\\) and 1 \\(token\\)"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an int >= 1, got 0"),
        ({"min_new_tokens": 5}, r"min_new_tokens \(5\) exceeds max_new_tokens \(4\)"),
        ({"num_return_sequences": 2}, "num_return_sequences > 1 needs sampling"),
        ({"stop_strings": ["x"]}, "stop_strings need a tokenizer"),
        ({"temperature": 1.0, "seed": 1, "generator": torch.Generator()}, "not both"),
        ({"eos_token_id": 99}, r"eos_token_id 99 is outside the vocabulary 0\.\.15"),
        ({"eos_token_id": "a"}, "eos_token_id must be an int or a list of ints, got 'a'"),
        ({"streamer": object(), "temperature": 1.0, "num_return_sequences": 2}, "follows one"),
        ({"top_p": 2.0, "temperature": 1.0}, r"top_p must be in \(0, 1\]"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs: dict[str, Any], message: str) -> None:
    model = hybrid("sequential-block")
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(MixstackError, match=message):
        generate(model, torch.tensor([[1, 2, 3]]), **kwargs)


def test_left_padding_with_absolute_positions_is_refused() -> None:
    pattern, symbols = HYBRIDS["sequential-block"]
    model = make_model(pattern, symbols, embedding={"positional": "sinusoidal"})
    ids, mask = left_pad([[1, 2], [3]], 0)
    with pytest.raises(CapabilityError, match="left padding with absolute position embeddings"):
        generate(model, ids, attention_mask=mask, max_new_tokens=2)
    # equal-length prompts (no padding) are fine and match full forwards
    out = generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=4, eos_token_id=[])
    assert out.new_tokens[0].tolist() == reference_decode(model, [1, 2, 3], 4)


def test_model_generate_delegates() -> None:
    model = hybrid("sequential-block")
    ids = torch.tensor([[4, 5, 6]])
    a = model.generate(ids, max_new_tokens=3, eos_token_id=[])
    b = generate(model, ids, max_new_tokens=3, eos_token_id=[])
    assert torch.equal(a.sequences, b.sequences)


def test_model_prefill_returns_the_last_logits_and_fills_the_state() -> None:
    model = hybrid("mamba2-attention-mlp")
    rows = prompts([3, 6], seed=9)
    ids, mask = left_pad(rows, model.spec.special_ids["pad"])
    seq_idx = torch.where(mask.bool(), 0, -1)
    a, b = model.init_state(2, 10), model.init_state(2, 10)
    with torch.no_grad():
        want = model(ids, seq_idx=seq_idx, state=a)[:, -1]
        got = model.prefill(ids, b, seq_idx=seq_idx)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        assert b.offset == a.offset == 6
        token = want.argmax(-1)
        torch.testing.assert_close(
            model.step(token, b), model.step(token, a), rtol=1e-12, atol=1e-12
        )
    encoder = make_model("*", {"*": {"type": "attention", "n_heads": 2}}, arch="encoder")
    with pytest.raises(CapabilityError, match="prefill needs arch 'causal_lm'"):
        encoder.prefill(ids, None)


def test_report_marks_bounded_layers() -> None:
    model = hybrid("mamba2-attention-mlp")
    report = model.report(seq_len=16, dtype=torch.float32)
    assert [r.state_bounded for r in report.rows] == [True, False, True, True, True, False]
    assert report.state_bounded is False and report.to_dict()["state_bounded"] is False
    windowed = hybrid("windowed-s4d-mamba-parallel").report(seq_len=16)
    assert windowed.state_bounded and all(r.state_bounded for r in windowed.rows)
    # a windowed attention layer's state is its window, not the sequence
    short, long = (hybrid("windowed-s4d-mamba-parallel").report(seq_len=n) for n in (5, 50))
    assert short.rows[0].state_bytes == long.rows[0].state_bytes


def test_the_package_exports_the_function() -> None:
    import mixstack.generation
    import mixstack.generation.decoding

    assert mixstack.generation.generate is mixstack.generation.decoding.generate
    assert callable(mixstack.generation.generate)
