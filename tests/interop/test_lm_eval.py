"""The lm-eval adapter against independent computations written here: full forwards with
log-softmax summed over the continuation, lm-eval's own rolling-window code, a greedy
decode by repeated full forwards, and a local multiple-choice task a tiny byte-level
model that memorised a sentence must score 1.0 on (chance 0.25)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import mixstack
from mixstack.cli.main import app
from mixstack.dsl.errors import MixstackError
from mixstack.generation.tokenizers import ByteTokenizer
from mixstack.hub.modeldir import save_model_dir
from mixstack.interop.lm_eval import Scorer, lm_class, load_scorer

TASKS = Path(__file__).parent / "lm_eval_tasks"
TEXT = (
    "mixstack builds sequence models from matrix mixers; a tiny model learns this "
    "sentence by heart, so every question about its next words has one right answer."
)
W = 32  # model.max_seq_len: the text (156 bytes) is several windows long
EOS = 256 + 2  # the default special tokens are pad, bos, eos, mask


def _train(steps: int = 250) -> mixstack.MixStackModel:
    """Memorise ``eos + TEXT`` from random windows of W + 1 tokens (plain Adam loop).

    250 steps: at 150 whether the last words were memorised depended on fp32 rounding
    (the native and the torch norm kernels differed there); both pass with margin now."""
    spec = mixstack.load_spec(
        {
            "model": {
                "vocab_size": 256,
                "max_seq_len": W,
                "d_model": 32,
                "layers": {"pattern": "*-", "symbols": {"-": {"type": "mlp", "hidden": 64}}},
            }
        }
    )
    model = mixstack.build(spec.model, seed=0)
    stream = torch.tensor([EOS, *TEXT.encode()])
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        starts = torch.randint(len(stream) - W, (16,), generator=gen)
        rows = torch.stack([stream[s : s + W + 1] for s in starts.tolist()])  # (16, W + 1)
        logits = model(rows[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model_dir(_train(), tmp_path_factory.mktemp("lm") / "model")


@pytest.fixture(scope="module")
def scorer(model_dir: Path) -> Scorer:
    return load_scorer(model_dir, batch_size=3)


def _logprobs(model, ids: list[int]) -> torch.Tensor:
    """``(len(ids), V)`` fp64 log-softmax of one full forward."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).double()[0], dim=-1)


def _reference_ll(model, ctx: list[int], cont: list[int], width: int = W) -> tuple[float, bool]:
    """Score the continuation from the last window of W + 1 tokens (one full forward);
    what that window cannot reach is scored the same way with the sequence cut before
    the window's first scored token."""
    if not cont:
        return 0.0, True
    seq = ctx + cont
    window = seq[-(width + 1) :]
    n = min(len(cont), width)
    logp = _logprobs(model, window[:-1])
    targets = window[-n:]
    rows = logp[-n:]
    total = sum(float(rows[i, t]) for i, t in enumerate(targets))
    greedy = all(int(rows[i].argmax()) == t for i, t in enumerate(targets))
    rest_total, rest_greedy = _reference_ll(model, ctx, cont[: len(cont) - n], width)
    return total + rest_total, greedy and rest_greedy


CASES = [
    ("", "mixstack builds"),  # empty context: conditioned on eos
    ("  ", "mixstack"),  # only whitespace: it moves to the continuation, eos is the context
    ("mixstack builds ", "sequence models"),  # the trailing space moves to the continuation
    (TEXT[:60], TEXT[60:75]),  # context + continuation cross max_seq_len
    (TEXT[:30], TEXT[30:100]),  # the continuation alone is longer than max_seq_len
    ("a tiny model", " learns ünïcödé"),  # not memorised, multi-byte characters
    (TEXT[:50], "zzz"),  # not greedy
]


def test_loglikelihood_equals_full_forwards(scorer: Scorer) -> None:
    got = scorer.loglikelihood(CASES)
    for (context, continuation), (total, greedy) in zip(CASES, got, strict=True):
        stripped = context.rstrip()
        moved = context[len(stripped) :]
        ctx = list(stripped.encode()) if stripped else [EOS]
        cont = list((moved + continuation).encode())
        ref_total, ref_greedy = _reference_ll(scorer.model, ctx, cont)
        assert total == pytest.approx(ref_total, rel=1e-5, abs=1e-4), (context, continuation)
        assert greedy == ref_greedy, (context, continuation)
    # the model memorised the text: continuations read with a long context are greedy
    # (the first targets of a disjoint window see little context: case 4 need not be)
    assert [g for _, g in got[2:4]] == [True, True] and not got[5][1] and not got[6][1]
    assert got[2][0] > -2.0 and got[5][0] < -20.0
    # batch size changes nothing
    one = Scorer(scorer.model, scorer.tokenizer, batch_size=1).loglikelihood(CASES)
    assert [t for t, _ in one] == pytest.approx([t for t, _ in got], rel=1e-5, abs=1e-5)


def test_loglikelihood_rolling_equals_lm_evals_windows(scorer: Scorer) -> None:
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    texts = [TEXT, TEXT[:20], "x", "", "ünïcödé " * 9]
    got = scorer.loglikelihood_rolling(texts)
    for text, total in zip(texts, got, strict=True):
        ref = 0.0
        windows = get_rolling_token_windows(list(text.encode()), EOS, W, 1)
        for context, preds in map(make_disjoint_window, windows):
            # as lm-eval's HF model scores (context, continuation): one forward over the
            # last W + 1 tokens of both, the continuation's log-probs at the end
            inputs = (context + preds)[-(W + 1) :][:-1]
            logp = _logprobs(scorer.model, inputs)[-len(preds) :]
            ref += sum(float(logp[i, t]) for i, t in enumerate(preds))
        assert total == pytest.approx(ref, rel=1e-5, abs=1e-4), text
    assert got[3] == 0.0
    # the memorised text is far likelier than its reverse
    assert got[0] > scorer.loglikelihood_rolling([TEXT[::-1]])[0] + 200.0


def _greedy(model, prompt: list[int], max_new: int, stops: list[str]) -> str:
    ids = prompt[-(W - max_new) :]
    new: list[int] = []
    for _ in range(max_new):
        token = int(_logprobs(model, ids + new)[-1].argmax())
        if token == EOS:
            break
        new.append(token)
        text = bytes(t for t in new if t < 256).decode("utf-8", errors="replace")
        if any(s in text for s in stops):
            break
    text = bytes(t for t in new if t < 256).decode("utf-8", errors="replace")
    cuts = [text.find(s) for s in stops if s in text]
    return text[: min(cuts)] if cuts else text


@pytest.mark.parametrize(
    ("context", "kwargs"),
    [
        ("mixstack builds sequence", {"until": ["matrix", ";"], "max_gen_toks": 20}),
        ("a tiny model learns", {"until": "heart", "max_gen_toks": 25}),
        ("so every question", {"until": ["never there"], "max_gen_toks": 12}),
    ],
)
def test_generate_until_stops_like_a_greedy_decode(
    scorer: Scorer, context: str, kwargs: dict
) -> None:
    until = [kwargs["until"]] if isinstance(kwargs["until"], str) else kwargs["until"]
    got = scorer.generate_until(context, dict(kwargs))
    ref = _greedy(scorer.model, list(context.encode()), kwargs["max_gen_toks"], until)
    assert got == ref
    start = TEXT.index(context) + len(context)
    assert TEXT[start:].startswith(got)  # memorised
    if until != ["never there"]:
        assert TEXT[start + len(got) :].startswith(tuple(until))  # cut before the stop
    else:
        assert len(got.encode()) == kwargs["max_gen_toks"]


@pytest.mark.slow(budget_s=45)
def test_simple_evaluate_and_the_cli_score_the_memorised_choices(
    scorer: Scorer, model_dir: Path, tmp_path: Path
) -> None:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    docs = json.loads((TASKS / "memorised.json").read_text(encoding="utf-8"))
    for doc in docs:  # the data is what the test claims: one choice continues the text
        right = doc["context"] + doc["choices"][doc["label"]]
        assert right in TEXT
        assert sum(doc["context"] + c in TEXT for c in doc["choices"]) == 1
    lm = lm_class()(scorer=scorer)
    results = simple_evaluate(
        model=lm,
        tasks=["mixstack_memorised"],
        task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
        log_samples=False,
        bootstrap_iters=0,
    )
    assert results is not None
    assert results["results"]["mixstack_memorised"]["acc,none"] == 1.0
    assert results["n-samples"]["mixstack_memorised"]["effective"] == len(docs) == 8
    # the same through `mixstack lm-eval`, on the first 3 documents
    out = tmp_path / "results.json"
    args = ["lm-eval", str(model_dir), "--tasks", "mixstack_memorised"]
    args += ["--include-path", str(TASKS), "--no-builtin-tasks", "--limit", "3"]
    result = CliRunner().invoke(app, [*args, "--output", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["results"]["mixstack_memorised"]["acc,none"] == 1.0
    assert data["n-samples"]["mixstack_memorised"]["effective"] == 3
    assert "mixstack_memorised" in result.output
    bad = CliRunner().invoke(app, [*args[:3], "nope", *args[4:]])
    assert bad.exit_code == 1 and "unknown task(s) ['nope']" in bad.output


def test_registered_name_and_bad_input(model_dir: Path, tmp_path: Path) -> None:
    from lm_eval.api.registry import get_model

    cls = get_model("mixstack") if lm_class() else None
    lm = cls.create_from_arg_string(f"pretrained={model_dir},max_length=16", {"batch_size": 2})
    assert (lm.scorer.max_length, lm.scorer.batch_size) == (16, 2)
    with pytest.raises(MixstackError, match="is not a model directory"):
        load_scorer(tmp_path / "missing")
    with pytest.raises(MixstackError, match=r"max_length 99 must be in 1\.\.32"):
        Scorer(lm.scorer.model, ByteTokenizer(), max_length=99)
    with pytest.raises(MixstackError, match=r"unsupported generation arguments \['beams'\]"):
        lm.scorer.generate_until("x", {"until": ["."], "beams": 2})
    assert lm.scorer.generate_until("x", {"until": ["."], "max_gen_toks": 0}) == ""
    with pytest.raises(MixstackError, match="'auto' is not supported"):
        cls(pretrained=str(model_dir), batch_size="auto")


def test_bpe_tokenizer_pairs_split_after_the_contexts_tokens(tmp_path: Path) -> None:
    from mixstack.data.bpe import train_bpe
    from mixstack.generation.tokenizers import HFTokenizer

    (tmp_path / "a.txt").write_text(TEXT * 3, encoding="utf-8")
    tok = HFTokenizer.from_file(train_bpe([tmp_path / "a.txt"], 300, tmp_path / "tok"))
    spec = mixstack.load_spec(
        {
            "model": {
                "vocab_size": tok.vocab_size,
                "special_tokens": [],
                "max_seq_len": 16,
                "d_model": 16,
                "layers": {"pattern": "*-", "symbols": {"-": {"type": "mlp", "hidden": 16}}},
            }
        }
    )
    model = mixstack.build(spec.model, seed=3).eval()
    scorer = Scorer(model, tok, batch_size=2)
    assert scorer.prefix_id == tok.eos_token_id == 2  # <eos> of the trained BPE
    pairs = [("", "mixstack builds"), ("a tiny model ", "learns this"), (TEXT[:90], TEXT[90:])]
    got = scorer.loglikelihood(pairs)
    for (context, continuation), (total, _) in zip(pairs, got, strict=True):
        stripped = context.rstrip()
        whole = tok.encode(context + continuation)
        ctx = tok.encode(stripped) if context else [2]
        cont = whole[len(ctx) :] if context else tok.encode(continuation)
        ref, _ = _reference_ll(model, ctx, cont, width=16)
        assert total == pytest.approx(ref, rel=1e-5, abs=1e-4), (context, continuation)
    assert len(tok.encode(TEXT[90:])) > 16  # the last continuation needs several windows


def test_window_chunks_cover_every_target_once() -> None:
    from mixstack.interop.lm_eval import chunks

    assert chunks(10, 1, 4, from_end=False) == [(1, 5), (5, 9), (9, 10)]
    assert chunks(10, 3, 4, from_end=True) == [(3, 6), (6, 10)]
    assert chunks(3, 3, 4, from_end=True) == []
    assert math.isclose(sum(b - a for a, b in chunks(100, 7, 9, from_end=True)), 93)
