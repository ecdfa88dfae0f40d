"""The n-gram layer against a brute-force reference written with explicit loops.

The reference follows the definition (docs/math.md#n-gram-layers) position by position:
row i averages x_j over every earlier j whose preceding k tokens equal the k tokens
ending at i, inside i's document; y = t0(h) + t1(x). Outputs and gradients (input and
every parameter) are compared in fp64, for k = 1..4, batches, repeated and unrepeated
contexts, packed and padded rows, and with the match matrix split into many chunks.
Decoding is compared token by token, and a forward at L = 4096 runs under an
address-space limit that k int64 (L, L) masks would exceed.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import Tensor

from mixstack.dsl.context import LayerContext
from mixstack.dsl.errors import CapabilityError
from mixstack.mixers import ngram as ngram_module
from mixstack.mixers.ngram import Ngram, NgramConfig

D = 6


def build(k: int, seed: int = 0) -> Ngram:
    layer = Ngram(NgramConfig(match_len=k), LayerContext(d_model=D, max_seq_len=64))
    layer.reset_parameters(torch.Generator().manual_seed(seed))
    with torch.no_grad():  # non-zero biases, so a lost bias term would show
        layer.t0.bias.normal_(generator=torch.Generator().manual_seed(seed + 1))
        layer.t1.bias.normal_(generator=torch.Generator().manual_seed(seed + 2))
    return layer.double()


def reference(layer: Ngram, x: Tensor, ids: Tensor, seq_idx: Tensor | None = None) -> Tensor:
    """Explicit loops over rows i and earlier positions j (differentiable in x and the
    parameters, so autograd gives the reference gradients)."""
    k = layer.match_len
    B, L, _ = x.shape
    docs = torch.zeros(B, L, dtype=torch.long) if seq_idx is None else seq_idx
    rows = []
    for b in range(B):
        out_b = []
        for i in range(L):
            doc = int(docs[b, i])
            if doc < 0:  # padding outputs 0
                out_b.append(torch.zeros(D, dtype=x.dtype))
                continue

            def same(p: int, b: int = b, doc: int = doc) -> bool:
                return p >= 0 and int(docs[b, p]) == doc

            picked = []
            for j in range(i):
                ok = same(j)
                for r in range(k):
                    a, c = i - r, j - 1 - r
                    ok = ok and same(a) and same(c) and int(ids[b, a]) == int(ids[b, c])
                if ok:
                    picked.append(x[b, j])
            h = torch.stack(picked).mean(dim=0) if picked else torch.zeros(D, dtype=x.dtype)
            out_b.append(layer.t0(h) + layer.t1(x[b, i]))
        rows.append(torch.stack(out_b))
    return torch.stack(rows)


def grads(layer: Ngram, fn, x: Tensor) -> dict[str, Tensor]:
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = fn(x)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=out.dtype)
    (out * cot).sum().backward()
    return {"x": x.grad, **{n: p.grad for n, p in layer.named_parameters()}}


def inputs(B: int, L: int, n_values: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, D, generator=g, dtype=torch.float64)
    return x, torch.randint(0, n_values, (B, L), generator=g)


def assert_close(got: Tensor, want: Tensor, what: str) -> None:
    err = (got - want).abs().max().item()
    assert err <= 1e-10 * max(want.abs().max().item(), 1.0), f"{what}: max error {err:.3g}"


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize(("n_values", "chunk"), [(2, None), (3, 5), (50, None)])
def test_forward_and_gradients_equal_the_loop_reference(k, n_values, chunk, monkeypatch) -> None:
    """n_values 2 / 3: many repeated contexts; 50: almost none (empty rows give t1(x) + b0).
    chunk 5: the match matrix is built 5 entries at a time (one row per chunk)."""
    if chunk is not None:
        monkeypatch.setattr(ngram_module, "CHUNK_ENTRIES", chunk)
    layer = build(k, seed=k)
    x, ids = inputs(3, 15, n_values, seed=10 * k + n_values)
    want = reference(layer, x, ids)
    got = layer(x, input_ids=ids)
    assert_close(got, want, "output")
    if n_values <= 3:
        matched = ngram_module.ngram_match(ids, None, k).chunk(0, 15).any()
        assert matched, "the case has no match at all: it would test only t1"
    g_want = grads(layer, lambda v: reference(layer, v, ids), x)
    g_got = grads(layer, lambda v: layer(v, input_ids=ids), x)
    for name, g in g_want.items():
        assert_close(g_got[name], g, f"d{name}")


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_packed_and_padded_rows_equal_the_loop_reference(k, monkeypatch) -> None:
    monkeypatch.setattr(ngram_module, "CHUNK_ENTRIES", 40)
    layer = build(k, seed=5)
    x, ids = inputs(2, 16, 2, seed=k)
    seq_idx = torch.tensor(
        [[-1, -1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, -1], [4] * 9 + [7] * 5 + [-1] * 2]
    )
    x = torch.where((seq_idx < 0)[..., None], torch.full_like(x, 1e3), x)
    want = reference(layer, x, ids, seq_idx)
    assert_close(layer(x, input_ids=ids, seq_idx=seq_idx), want, "packed output")
    g_want = grads(layer, lambda v: reference(layer, v, ids, seq_idx), x)
    g_got = grads(layer, lambda v: layer(v, input_ids=ids, seq_idx=seq_idx), x)
    for name, g in g_want.items():
        assert_close(g_got[name], g, f"packed d{name}")


def test_repeated_token_never_matches_itself() -> None:
    """ "aaaa…" with k = 1: row i averages x_1..x_{i-1} (the successors of earlier a's),
    never x_i; rows 0 and 1 are empty (h = 0)."""
    layer = build(1)
    x, _ = inputs(1, 7, 2, seed=3)
    ids = torch.zeros(1, 7, dtype=torch.long)
    match = ngram_module.ngram_match(ids, None, 1)
    h = ngram_module.ngram_average(match, x)
    want = torch.stack(
        [torch.zeros(D, dtype=x.dtype)] * 2 + [x[0, 1:i].mean(0) for i in range(2, 7)]
    )
    assert_close(h[0], want, "h")
    state = layer.init_state(1, 7, device="cpu", dtype=torch.float64)
    steps = [layer.step(x[:, t], state, token_t=ids[:, t]) for t in range(7)]
    assert_close(torch.stack(steps, dim=1), layer(x, input_ids=ids), "decode")


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_decode_token_by_token_equals_forward(k) -> None:
    layer = build(k, seed=2)
    x, ids = inputs(2, 14, 2, seed=k)
    with torch.no_grad():
        want = layer(x, input_ids=ids)
        state = layer.init_state(2, 14, device="cpu", dtype=torch.float64)
        got = torch.stack([layer.step(x[:, t], state, token_t=ids[:, t]) for t in range(14)], 1)
    assert_close(got, want, "steps from an empty state")


def test_packed_prefill_then_steps_continue_the_last_document() -> None:
    layer = build(2, seed=4)
    x, ids = inputs(1, 14, 2, seed=8)
    seq_idx = torch.tensor([[0] * 4 + [1] * 4 + [-1] * 2 + [1] * 4])
    with torch.no_grad():
        want = layer(x, input_ids=ids, seq_idx=seq_idx)
        state = layer.init_state(1, 14, device="cpu", dtype=torch.float64)
        head = layer(x[:, :10], input_ids=ids[:, :10], seq_idx=seq_idx[:, :10], state=state)
        tail = [layer.step(x[:, t], state, token_t=ids[:, t]) for t in range(10, 14)]
    assert_close(torch.cat([head, torch.stack(tail, 1)], 1), want, "prefill + steps")


def test_missing_token_ids_and_overflow_are_refused_by_name() -> None:
    layer = build(1)
    x, ids = inputs(1, 4, 2, seed=0)
    with pytest.raises(CapabilityError, match="ngram layer needs the token ids"):
        layer(x)
    state = layer.init_state(1, 4, device="cpu", dtype=torch.float64)
    with pytest.raises(CapabilityError, match="ngram layer needs the token ids"):
        layer.step(x[:, 0], state)
    with pytest.raises(CapabilityError, match="input_ids has shape"):
        layer(x, input_ids=ids[:, :3])
    layer(x, input_ids=ids, state=state)
    with pytest.raises(CapabilityError, match="ngram history overflow"):
        layer.step(x[:, 0], state, token_t=ids[:, 0])


MEMORY_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    import torch
    torch.set_num_threads(1)
    from mixstack.dsl.context import LayerContext
    from mixstack.mixers.ngram import Ngram, NgramConfig

    L, K = 4096, 3
    layer = Ngram(NgramConfig(match_len=K), LayerContext(d_model=8, max_seq_len=L))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, L, 8, generator=g).requires_grad_()
    ids = torch.randint(0, 3, (1, L), generator=g)
    layer(x[:, :64], input_ids=ids[:, :64]).sum().backward()  # warm up lazy allocations
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))
    masks = K * L * L * 8  # what k int64 (L, L) masks need
    limit = vm + masks // 2
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    out = layer(x, input_ids=ids)
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    try:
        held = [torch.ones(L, L, dtype=torch.long) for _ in range(K)]
    except (RuntimeError, MemoryError):
        print("OK", vm, limit)
    else:
        print("LIMIT-TOO-HIGH")
    """
)


def test_forward_at_4096_fits_where_k_int64_masks_do_not() -> None:
    """B=1, L=4096, k=3 forward + backward under RLIMIT_AS = (current address space +
    half of what 3 int64 (L, L) masks take); the script then shows that allocating those
    masks fails under the same limit."""
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "1"}
    run = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("OK"), run.stdout + run.stderr[-2000:]


def test_hybrid_preset_passes_token_ids_and_decodes_like_forward() -> None:
    """zoo:icll-mamba2-ngram-tiny built as a model: the n-gram layers get the ids from the
    model (forward and step), and step-by-step logits equal the forward's."""
    import mixstack

    spec = mixstack.load_spec(
        "zoo:icll-mamba2-ngram-tiny", ["model.max_seq_len=24", "train.task.seq_len=24"]
    )
    model = mixstack.build(spec, seed=0).double()
    ids = torch.randint(0, 5, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids)
        state = model.init_state(2, 24, dtype=torch.float64)
        got = torch.stack([model.step(ids[:, t], state) for t in range(24)], dim=1)
        other = ids.clone()
        other[:, 10] = (other[:, 10] + 1) % 5  # a token changes what the n-gram rows match
        changed = model(other)
    assert_close(got, want, "model decode")
    ngram = [m for m in model.modules() if isinstance(m, Ngram)]
    assert [m.match_len for m in ngram] == [1, 2, 3]
    assert not torch.allclose(changed[:, 11:], want[:, 11:])
