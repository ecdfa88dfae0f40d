"""The suites of ``mixstack bench``: mixers, models, decode.

Each suite first checks that every pair it compares computes the same numbers (fp32,
outputs and gradients within ``rtol`` 1e-4, :func:`~mixstack.benchmarks.references.check_pair`),
then times the contenders with interleaved rounds and reports medians and ratios of
medians. Nothing here asserts a time; the goals of docs/performance.md are printed next
to the measured ratios.

* ``mixers``: per mixer, forward and forward+backward time and peak memory against the
  length L (B = 1): Mamba-2 (ours with the default kernels, ours on the naive
  ``reference`` kernels, ours on the pure ``torch`` kernels, transformers'
  ``Mamba2Mixer``), Mamba-1 (ours, transformers' ``MambaMixer``), Hydra; and Mamba-2's
  matmul-only lower bound, ``3 · flops_per_token(L) · L / GEMM rate`` with the GEMM rate
  measured at the layer's projection shapes in the same run.
* ``models``: one training step (forward, loss, backward, AdamW step) in tokens/s: our
  transformer++ against ``LlamaForCausalLM`` (SDPA) with the same weights and the loss
  computed the transformers way, and the zoo presets named by ``presets``.
* ``decode``: an attention, a Mamba-2 and a hybrid model: per-token latency of
  ``model.step`` after a prefill of each context length, tokens/s, and the decode state's
  bytes per sequence.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from mixstack.benchmarks import references as R
from mixstack.benchmarks.timing import interleave, median, peak_bytes

SUITES = ("mixers", "models", "decode")
DEFAULT_PRESETS = ("transformer-tiny", "mqar-tiny")

# The comparisons ``--contenders`` can choose, per suite (decode always runs its three
# models). Each name brings its contenders, its equality check and its ratio.
CONTENDERS: dict[str, dict[str, str]] = {
    "mixers": {
        "mamba2-hf": "Mamba-2 vs transformers Mamba2Mixer (fwd+bwd ratio)",
        "mamba1-hf": "Mamba-1 vs transformers MambaMixer (its sequential torch scan)",
        "hydra": "Hydra forward vs Mamba-2 forward",
        "lower-bound": "Mamba-2 fwd+bwd vs its matmul lower bound (GEMM rate of the same run)",
        "mamba2-reference": "Mamba-2 on our step-by-step reference kernels vs the torch ones",
        "mamba2-torch": "Mamba-2 on the torch kernels (no native C) vs the default ones",
    },
    "models": {
        "llama": "transformer++ train step vs transformers LlamaForCausalLM",
        "presets": "training tokens/s of the zoo presets (--presets)",
    },
    "decode": {},
}


def check_contenders(suites: list[str], names: tuple[str, ...]) -> tuple[str, ...]:
    """``names`` if every one is a comparison of one of ``suites``, else a
    :class:`~mixstack.dsl.errors.MixstackError` that lists the valid names."""
    from mixstack.dsl.errors import MixstackError

    valid = {n: s for s in suites for n in CONTENDERS[s]}
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        listing = "; ".join(f"{n} ({CONTENDERS[s][n]})" for n, s in valid.items())
        what = ", ".join(repr(n) for n in unknown) if unknown else "an empty list"
        raise MixstackError(
            f"--contenders: {what} is not a comparison of the suite(s) {', '.join(suites)}; "
            f"valid names: {listing or 'none (these suites have no choice)'}"
        )
    return names


@dataclass
class Entry:
    """One timed contender at one length and mode."""

    suite: str
    name: str
    length: int
    mode: str  # fwd | fwd+bwd | train | step | gemm
    times: list[float]
    batch: int = 1
    peak_bytes: int | None = None
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.suite}/{self.name}/{self.mode}/L={self.length}"

    @property
    def median(self) -> float:
        return median(self.times)

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "key": self.key, "median_s": self.median}


@dataclass
class Ratio:
    """``value = slow / fast`` of two medians (> 1: ``fast`` is faster), with an optional goal
    ``value >= goal`` (speed-up goals) or ``value <= goal`` (``at_most``)."""

    suite: str
    name: str
    length: int
    value: float
    goal: float | None = None
    at_most: bool = False

    @property
    def met(self) -> bool | None:
        if self.goal is None:
            return None
        return self.value <= self.goal if self.at_most else self.value >= self.goal

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "met": self.met}


@dataclass
class SuiteResult:
    entries: list[Entry] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)
    checks: dict[str, float] = field(default_factory=dict)  # pair -> max relative error
    backends: dict[str, str] = field(default_factory=dict)

    def extend(self, other: SuiteResult) -> None:
        self.entries += other.entries
        self.ratios += other.ratios
        self.checks.update(other.checks)
        self.backends.update(other.backends)


@dataclass(frozen=True)
class Options:
    lengths: tuple[int, ...] = (512, 1024, 2048)
    reps: int = 5
    check_only: bool = False
    mixer: R.MixerShape = field(default_factory=R.MixerShape)
    llama: R.LlamaShape = field(default_factory=R.LlamaShape)
    presets: tuple[str, ...] = DEFAULT_PRESETS
    preset_batch: int = 8
    preset_len: int = 128
    decode_d_model: int = 256
    decode_steps: int = 16
    goal_length: int = 2048
    memory: bool = True
    contenders: tuple[str, ...] | None = None  # None: every comparison of each suite
    slow_s: float | None = 5.0  # a call slower than this in warm-up gets ``slow_reps`` rounds
    slow_reps: int = 1
    # transformers' MambaMixer pair is checked at most this long: its sequential scan's
    # backward is quadratic in L (each step's slice gradient is a full (B, D, L, N) zero
    # tensor), minutes per call at L = 2048
    sequential_check_len: int = 512


def _chosen(suite: str, opts: Options) -> set[str]:
    """The comparisons of ``suite`` to run: those named in ``opts.contenders``, or all."""
    names = set(CONTENDERS[suite])
    return names if opts.contenders is None else names & set(opts.contenders)


def _params(module: nn.Module, x: Tensor) -> dict[str, Tensor]:
    return {"x": x, **dict(module.named_parameters())}


def _fwd(module: nn.Module, x: Tensor) -> Callable[[], Any]:
    def run() -> None:
        with torch.no_grad():
            module(x)

    return run


def _fwd_bwd(module: nn.Module, x: Tensor) -> Callable[[], Any]:
    params = [x, *module.parameters()]

    def run() -> None:
        y = module(x)
        torch.autograd.grad(y.sum(), params)

    return run


def _resolved(*modules: nn.Module, names: tuple[str, ...] = ()) -> dict[str, str]:
    """``{"kernel@device/dtype": provider}`` the modules' kernel policies resolved to; a
    module that resolved a kernel differently from an earlier one (a contender pinned
    to other kernels) adds its own entry, ``"kernel@device/dtype (its name)"``."""
    out: dict[str, str] = {}
    for i, module in enumerate(modules):
        for m in module.modules():
            policy = getattr(m, "backends", None)
            if policy is None or not hasattr(policy, "resolved"):
                continue
            for key, provider in policy.resolved().items():
                if out.setdefault(key, provider) != provider:
                    out[f"{key} ({names[i] if i < len(names) else i})"] = provider
    return out


# -- mixers ------------------------------------------------------------------------------------


def _gemm_rate(
    shape: R.MixerShape, length: int, in_width: int, reps: int
) -> tuple[float, list[float]]:
    """FLOP/s of fwd+bwd GEMMs at the mixer's in_proj and out_proj shapes (B = 1, L rows):
    each projection forward (1 GEMM) and backward (2 GEMMs: input and weight grads)."""
    d, d_inner = shape.d_model, 2 * shape.d_model
    u = torch.randn(length, d)
    w_in = torch.randn(in_width, d)
    y = torch.randn(length, d_inner)
    w_out = torch.randn(d, d_inner)
    g_in = torch.randn(length, in_width)
    g_out = torch.randn(length, d)

    def run() -> None:
        torch.mm(u, w_in.t())  # forward in_proj
        torch.mm(g_in, w_in)  # grad input
        torch.mm(g_in.t(), u)  # grad weight
        torch.mm(y, w_out.t())
        torch.mm(g_out, w_out)
        torch.mm(g_out.t(), y)

    flops = 3 * 2.0 * length * (d * in_width + d_inner * d)
    times = interleave({"gemm": run}, reps)["gemm"]
    return flops / median(times), times


# (comparisons it needs, ratio name, slower entry, faster entry, goal at the goal length,
# goal is a maximum)
_MIXER_RATIOS: tuple[tuple[tuple[str, ...], str, str, str, float | None, bool], ...] = (
    (
        ("mamba2-hf",),
        "Mamba2Mixer / mamba2 (fwd+bwd)",
        "transformers Mamba2Mixer|fwd+bwd",
        "mamba2|fwd+bwd",
        1.5,
        False,
    ),
    (
        ("mamba1-hf",),
        "MambaMixer / mamba1 (fwd+bwd)",
        "transformers MambaMixer|fwd+bwd",
        "mamba1|fwd+bwd",
        1.5,
        False,
    ),
    (("hydra",), "hydra / mamba2 (fwd)", "hydra|fwd", "mamba2|fwd", 2.2, True),
    (
        ("mamba2-reference",),
        "reference kernels / default kernels, mamba2 (fwd+bwd)",
        "mamba2 (reference kernels)|fwd+bwd",
        "mamba2|fwd+bwd",
        None,
        False,
    ),
    (
        ("mamba2-torch",),
        "torch kernels / default kernels, mamba2 (fwd+bwd)",
        "mamba2 (torch kernels)|fwd+bwd",
        "mamba2|fwd+bwd",
        None,
        False,
    ),
    (
        ("mamba2-torch", "mamba2-hf"),
        "Mamba2Mixer / mamba2 on torch kernels (fwd+bwd)",
        "transformers Mamba2Mixer|fwd+bwd",
        "mamba2 (torch kernels)|fwd+bwd",
        None,
        False,
    ),
)


def mixers_suite(opts: Options) -> SuiteResult:
    """Mamba-2, Mamba-1 and Hydra against their references, per length (only the
    comparisons named in ``opts.contenders``, all when it is None)."""
    from mixstack.kernels.backends import BackendPolicy

    out = SuiteResult()
    chosen = _chosen("mixers", opts)
    if not chosen:
        return out
    shape = opts.mixer
    m2 = R.ours_mamba2(shape)
    contenders: dict[str, nn.Module] = {}
    if chosen - {"mamba1-hf"}:  # every other comparison divides by (or checks) mamba2
        contenders["mamba2"] = m2
    pairs: list[tuple[str, nn.Module, nn.Module]] = []
    if "mamba2-hf" in chosen:
        contenders["transformers Mamba2Mixer"] = hf2 = R.hf_mamba2(m2, shape)
        pairs.append(("mamba2 vs transformers Mamba2Mixer", m2, hf2))
    if "mamba2-reference" in chosen:
        m2_naive = R.ours_mamba2(shape)
        m2_naive.load_state_dict(m2.state_dict())
        m2_naive.backends = BackendPolicy("reference")
        contenders["mamba2 (reference kernels)"] = m2_naive
        pairs.append(("mamba2 vs mamba2 on reference kernels", m2, m2_naive))
    if "mamba2-torch" in chosen:  # the pure-torch figure, without mixstack's compiled C
        m2_torch = R.ours_mamba2(shape)
        m2_torch.load_state_dict(m2.state_dict())
        m2_torch.backends = BackendPolicy("torch")
        contenders["mamba2 (torch kernels)"] = m2_torch
        pairs.append(("mamba2 vs mamba2 on torch kernels", m2, m2_torch))
    if "mamba1-hf" in chosen:
        contenders["mamba1"] = m1 = R.ours_mamba1(shape)
        contenders["transformers MambaMixer"] = hf1 = R.hf_mamba1(m1, shape)
        pairs.append(("mamba1 vs transformers MambaMixer", m1, hf1))
    if "hydra" in chosen:
        contenders["hydra"] = R.ours_hydra(shape)

    g = torch.Generator().manual_seed(0)
    x_full = torch.randn(1, min(opts.lengths), shape.d_model, generator=g)
    exact: dict[int, nn.Module] = {}
    for name, a, b in pairs:
        check_len = x_full.shape[1]
        if b is contenders.get("transformers MambaMixer"):
            check_len = min(check_len, opts.sequential_check_len)
        x = x_full[:, :check_len].clone().requires_grad_()
        # float64 copies of ours arbitrate a gap beyond rtol (R.check_pair: the
        # reference's own fp32 rounding at long L)
        x64 = x.detach().double().requires_grad_()
        if id(a) not in exact:
            exact[id(a)] = copy.deepcopy(a).double()
        ours64 = exact[id(a)]
        out.checks[f"{name} (L={check_len})"] = R.check_pair(
            name,
            lambda a=a, x=x: a(x),
            _params(a, x),
            lambda b=b, x=x: b(x),
            _params(b, x),
            exact=(lambda m=ours64, x64=x64: m(x64), _params(ours64, x64)),
        )
    del exact
    out.backends.update(_resolved(*contenders.values(), names=tuple(contenders)))
    if opts.check_only:
        return out

    for length in opts.lengths:
        x = torch.randn(1, length, shape.d_model, generator=g, requires_grad=True)
        fns: dict[str, Callable[[], Any]] = {}
        for name, module in contenders.items():
            fns[f"{name}|fwd"] = _fwd(module, x)
            fns[f"{name}|fwd+bwd"] = _fwd_bwd(module, x)
        times = interleave(fns, opts.reps, slow_s=opts.slow_s, slow_reps=opts.slow_reps)
        med = {k: median(v) for k, v in times.items()}
        for key, ts in times.items():
            name, mode = key.split("|")
            # a slow contender (fewer rounds) skips the memory pass too: the op-by-op
            # tracking would cost more than its timing
            measure = opts.memory and len(ts) == opts.reps
            peak = peak_bytes(fns[key]) if measure else None
            out.entries.append(Entry("mixers", name, length, mode, ts, peak_bytes=peak))
        goal = length == opts.goal_length

        for needs, name, slow, fast, target, at_most in _MIXER_RATIOS:
            if chosen.issuperset(needs):
                out.ratios.append(
                    Ratio(
                        "mixers",
                        name,
                        length,
                        med[slow] / med[fast],
                        target if goal else None,
                        at_most=at_most,
                    )
                )
        if "lower-bound" in chosen:
            in_width = m2.in_proj.out_features
            rate, gemm_times = _gemm_rate(shape, length, in_width, opts.reps)
            out.entries.append(
                Entry(
                    "mixers", "projection GEMMs", length, "gemm", gemm_times, extra={"flop_s": rate}
                )
            )
            bound = 3 * m2.flops_per_token(length) * length / rate
            out.entries.append(
                Entry("mixers", "mamba2 matmul lower bound", length, "fwd+bwd", [bound])
            )
            out.ratios.append(
                Ratio(
                    "mixers",
                    "mamba2 / matmul lower bound (fwd+bwd)",
                    length,
                    med["mamba2|fwd+bwd"] / bound,
                    1.8 if goal else None,
                    at_most=True,
                )
            )
            if "mamba2-torch" in chosen:
                out.ratios.append(
                    Ratio(
                        "mixers",
                        "mamba2 on torch kernels / matmul lower bound (fwd+bwd)",
                        length,
                        med["mamba2 (torch kernels)|fwd+bwd"] / bound,
                        None,
                        at_most=True,
                    )
                )
    return out


# -- models ------------------------------------------------------------------------------------


def _adamw(model: nn.Module) -> torch.optim.Optimizer:
    """Our training path's optimizer (param groups from param_hints, lr 1e-3, wd 0.1)."""
    from mixstack.dsl.spec import AdamWConfig
    from mixstack.training.optim import build_optimizer

    return build_optimizer(model, AdamWConfig(lr=1e-3, weight_decay=0.1))


def _train_step(
    model: nn.Module, opt: torch.optim.Optimizer, ids: Tensor, loss_fn: Callable[[], Tensor]
) -> Callable[[], Any]:
    def run() -> None:
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


def models_suite(opts: Options) -> SuiteResult:
    """transformer++ vs LlamaForCausalLM train step, then each preset's tokens/s (only the
    parts named in ``opts.contenders``, both when it is None)."""
    chosen = _chosen("models", opts)
    out = _llama(opts) if "llama" in chosen else SuiteResult()
    if "presets" in chosen and not opts.check_only:
        out.extend(_presets(opts))
    return out


def _llama(opts: Options) -> SuiteResult:
    import mixstack

    out = SuiteResult()
    shape = opts.llama
    ours = mixstack.build(mixstack.load_spec(R.transformer_pp_spec(shape)), seed=0)
    ref = R.hf_llama(ours, shape)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq_len), generator=g)
    check_ids = ids[:, : min(shape.seq_len, 64)]
    # checked under our parameter names on both sides (the Llama keys map one to one)
    ref_by_key = dict(ref.named_parameters())
    mapping = R.llama_param_map(shape.n_layers)
    # a float64 copy of ours arbitrates a gap beyond rtol, as for the mixers (both fp32
    # losses sit at 7e-5 of each other, near rtol, on the goal model)
    ours64 = copy.deepcopy(ours).double()
    out.checks[f"transformer++ vs LlamaForCausalLM loss (L={check_ids.shape[1]})"] = R.check_pair(
        "transformer++ vs LlamaForCausalLM",
        lambda: R.lm_loss(ours(check_ids), check_ids),
        dict(ours.named_parameters()),
        lambda: ref(input_ids=check_ids, labels=check_ids).loss,
        {ours_key: ref_by_key[ref_key] for ours_key, ref_key in mapping.items()},
        exact=(
            lambda: R.lm_loss(ours64(check_ids), check_ids),
            dict(ours64.named_parameters()),
        ),
    )
    out.backends.update(_resolved(ours))
    if opts.check_only:
        return out

    ours_opt, ref_opt = _adamw(ours), _reference_adamw(ref)
    fns = {
        "transformer++": _train_step(ours, ours_opt, ids, lambda: R.lm_loss(ours(ids), ids)),
        "transformers Llama": _train_step(
            ref, ref_opt, ids, lambda: ref(input_ids=ids, labels=ids).loss
        ),
    }
    times = interleave(fns, opts.reps)
    tokens = ids.numel()
    for name, ts in times.items():
        out.entries.append(
            Entry(
                "models",
                name,
                shape.seq_len,
                "train",
                ts,
                batch=shape.batch,
                extra={"tokens_per_s": tokens / median(ts)},
            )
        )
    out.ratios.append(
        Ratio(
            "models",
            "Llama / transformer++ (train step)",
            shape.seq_len,
            median(times["transformers Llama"]) / median(times["transformer++"]),
            1.05,
        )
    )
    return out


def _reference_adamw(model: nn.Module) -> torch.optim.Optimizer:
    """AdamW for the reference with the same implementation flags as ours (so the
    comparison is of the models, not of the optimizer's loop)."""
    from mixstack.training.optim import adamw_impl_kwargs

    impl = adamw_impl_kwargs(model.parameters())
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, **impl)


def _presets(opts: Options) -> SuiteResult:
    """Training tokens/s of each zoo preset at (preset_batch, min(max_seq_len, preset_len))."""
    import mixstack

    out = SuiteResult()
    fns: dict[str, Callable[[], Any]] = {}
    shapes: dict[str, tuple[int, int]] = {}
    for name in opts.presets:
        spec = mixstack.load_spec(f"zoo:{name}")
        model = mixstack.build(spec, seed=0)
        length = min(spec.model.max_seq_len, opts.preset_len)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, spec.model.vocab_size, (opts.preset_batch, length), generator=g)
        opt = _adamw(model)
        fns[name] = _train_step(
            model, opt, ids, lambda model=model, ids=ids: R.lm_loss(model(ids), ids)
        )
        shapes[name] = (opts.preset_batch, length)
        out.backends.update(_resolved(model))
    times = interleave(fns, opts.reps) if fns else {}
    for name, ts in times.items():
        batch, length = shapes[name]
        out.entries.append(
            Entry(
                "models",
                f"zoo:{name}",
                length,
                "train",
                ts,
                batch=batch,
                extra={"tokens_per_s": batch * length / median(ts)},
            )
        )
    return out


# -- decode ------------------------------------------------------------------------------------


def decode_specs(d_model: int, max_len: int) -> dict[str, dict[str, Any]]:
    """Three 4-sub-layer models of width ``d_model``: attention, Mamba-2, and a hybrid."""
    heads = max(1, d_model // 64)
    symbols = {
        "*": {"type": "attention", "n_heads": heads, "rope": {"theta": 10000.0}},
        "-": {"type": "mlp", "activation": "swiglu"},
        "M": {"type": "mamba2", "d_state": 64, "headdim": 64, "chunk_size": 128},
    }

    def spec(pattern: str) -> dict[str, Any]:
        return {
            "model": {
                "arch": "causal_lm",
                "d_model": d_model,
                "max_seq_len": max_len,
                "layers": {"pattern": pattern, "symbols": symbols},
            }
        }

    return {"attention": spec("*-*-"), "mamba2": spec("M-M-"), "hybrid": spec("M-*-")}


def decode_suite(opts: Options) -> SuiteResult:
    """Per model and context length: step latency after a prefill, tokens/s, state bytes."""
    import mixstack

    out = SuiteResult()
    max_len = max(opts.lengths) + opts.decode_steps + 1
    models = {
        name: mixstack.build(mixstack.load_spec(spec), seed=0).eval()
        for name, spec in decode_specs(opts.decode_d_model, max_len).items()
    }
    g = torch.Generator().manual_seed(0)
    check_len = min(min(opts.lengths), 64)
    ids = torch.randint(0, 256, (1, check_len + 1), generator=g)
    for name, model in models.items():
        # decoding is checked against the model's own full forward pass
        with torch.no_grad():
            full = model(ids)[:, -1]
            state = model.init_state(1, check_len + 1)
            model(ids[:, :check_len], state=state)
            stepped = model.step(ids[:, check_len], state)
        ok, err = R.close(stepped, full)
        if not ok:
            raise R.EqualityError(
                f"decode {name}: step after prefill differs from the full forward "
                f"(max relative error {err:.2e}); no timing reported"
            )
        out.checks[f"decode {name}: step vs forward (L={check_len})"] = err
        out.backends.update(_resolved(model))
    if opts.check_only:
        return out

    for length in opts.lengths:
        prompt = torch.randint(0, 256, (1, length), generator=g)
        states: dict[str, Any] = {}
        for name, model in models.items():
            state = model.init_state(1, length + opts.decode_steps + 1)
            with torch.no_grad():
                model(prompt, state=state)
            states[name] = state
        token = prompt[:, -1]

        def stepper(model: nn.Module, state: Any, token: Tensor = token) -> Callable[[], Any]:
            def run() -> None:
                with torch.no_grad():
                    model.step(token, state)

            return run

        fns = {name: stepper(m, states[name]) for name, m in models.items()}
        times = interleave(fns, opts.decode_steps - 1, warmup=1)
        for name, ts in times.items():
            state_bytes = sum(t.numel() * t.element_size() for t in states[name].tensors())
            out.entries.append(
                Entry(
                    "decode",
                    name,
                    length,
                    "step",
                    ts,
                    extra={"tokens_per_s": 1.0 / median(ts), "state_bytes": float(state_bytes)},
                )
            )
    return out


def small_options() -> Options:
    """A smoke run of every suite in seconds (tiny widths; the same code paths)."""
    return Options(
        lengths=(64, 128),
        reps=2,
        mixer=R.MixerShape(d_model=64, headdim=16, d_state=16, chunk=32, mamba1_d_state=8),
        llama=R.LlamaShape(
            n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn=160, vocab=256, batch=2, seq_len=64
        ),
        presets=DEFAULT_PRESETS,
        preset_batch=2,
        preset_len=32,
        decode_d_model=64,
        decode_steps=4,
        goal_length=128,
    )


__all__ = ["Options", "SuiteResult", "replace", "run_suites", "small_options"]


RUNNERS: dict[str, Callable[[Options], SuiteResult]] = {
    "mixers": mixers_suite,
    "models": models_suite,
    "decode": decode_suite,
}


def run_suites(names: list[str], opts: Options) -> SuiteResult:
    out = SuiteResult()
    for name in names:
        out.extend(RUNNERS[name](opts))
    return out
