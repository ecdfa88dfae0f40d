"""GPU library providers (kernels/libraries.py) without a GPU.

The libraries (fla, mamba_ssm, causal-conv1d, flash-attn) are CUDA/Triton builds, so here
fake modules are put in ``sys.modules`` that compute each library's *documented* math
with plain loops (their own layouts: channels-first, (K, V) states, cu_seqlens, window
sizes). That tests three things on the CPU: resolution (available only when importable,
applicable only on CUDA, never silently replaced), refusal (clear errors for what a
library cannot express), and the argument mapping (every parity case a provider accepts
matches mixstack's ``reference`` on outputs and gradients). Real parity on a GPU is
marked ``gpu`` and skips without CUDA and the library.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import itertools
import math
import sys
import types
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

from mixstack.dsl.errors import BackendError
from mixstack.kernels import backends as kb
from mixstack.kernels import libraries as lib
from tests.kernels.parity_cases import PARITY_CASES

CUDA = torch.device("cuda")  # a device object only: resolution never touches the GPU
CPU = torch.device("cpu")


# -- fake libraries: the documented math, as loops -------------------------------------------------


def fake_chunk_simple_gla(
    q,
    k,
    v,
    g=None,
    g_gamma=None,
    scale=None,
    initial_state=None,
    output_final_state=False,
    cu_seqlens=None,
):
    """fla: S_t = exp(g_t) S_{t-1} + k_tᵀ v_t, o_t = scale · q_t S_t; [B, T, H, K/V];
    with cu_seqlens (batch 1) each segment is its own sequence with initial_state[i]."""
    bsz, length, heads, dk = q.shape
    dv = v.shape[-1]
    scale = dk**-0.5 if scale is None else scale
    bounds = (
        [(b, 0, length) for b in range(bsz)]
        if cu_seqlens is None
        else [(0, int(s), int(e)) for s, e in itertools.pairwise(cu_seqlens.tolist())]
    )
    o = torch.zeros(bsz, length, heads, dv, dtype=torch.float64)
    finals = []
    for n, (b, s, e) in enumerate(bounds):
        h = (
            torch.zeros(heads, dk, dv, dtype=torch.float64)
            if initial_state is None
            else initial_state[n].double()
        )
        for t in range(s, e):
            h = (
                torch.exp(g[b, t].double())[:, None, None] * h
                + k[b, t].double()[:, :, None] * v[b, t].double()[:, None, :]
            )
            o[b, t] = scale * torch.einsum("hk,hkv->hv", q[b, t].double(), h)
        finals.append(h)
    return o.to(v.dtype), (torch.stack(finals) if output_final_state else None)


def fake_mamba_chunk_scan_combined(
    x,
    dt,
    A,
    B,
    C,
    chunk_size,
    D=None,
    z=None,
    dt_bias=None,
    initial_states=None,
    seq_idx=None,
    dt_softplus=False,
    return_final_states=False,
):
    """mamba_ssm: per head h (group h // (H/G)), state reset where seq_idx changes."""
    assert not dt_softplus and dt_bias is None and z is None
    bsz, length, heads, hdim = x.shape
    rep = heads // B.shape[2]
    y = torch.zeros(bsz, length, heads, hdim, dtype=torch.float64)
    finals = []
    for b in range(bsz):
        s = (
            torch.zeros(heads, hdim, B.shape[-1], dtype=torch.float64)
            if initial_states is None
            else initial_states[b]
        )
        for t in range(length):
            if seq_idx is not None and t > 0 and seq_idx[b, t] != seq_idx[b, t - 1]:
                s = torch.zeros_like(s)
            Bh = B[b, t].repeat_interleave(rep, 0).double()  # (H, N)
            Ch = C[b, t].repeat_interleave(rep, 0).double()
            d = dt[b, t].double()  # (H,)
            s = (
                torch.exp(d * A)[:, None, None] * s
                + (d[:, None] * x[b, t].double())[:, :, None] * Bh[:, None, :]
            )
            y[b, t] = torch.einsum("hpn,hn->hp", s, Ch)
            if D is not None:
                y[b, t] = y[b, t] + x[b, t].double() * (D[:, None] if D.dim() == 1 else D)
        finals.append(s)
    y = y.to(x.dtype)
    return (y, torch.stack(finals)) if return_final_states else y


def fake_selective_scan_fn(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    return_last_state=False,
):
    """mamba_ssm's selective scan, channels first: u (b, d, l), B/C (b, n, l) | (b, g, n, l)."""
    bsz, dim, length = u.shape
    x = torch.zeros(bsz, dim, A.shape[1], dtype=torch.float64)
    ys = []
    for t in range(length):
        Bt = B[..., t] if B.dim() == 3 else B[..., t].repeat_interleave(dim // B.shape[1], 1)
        Ct = C[..., t] if C.dim() == 3 else C[..., t].repeat_interleave(dim // C.shape[1], 1)
        if Bt.dim() == 2:  # (b, n): shared by every channel
            Bt, Ct = Bt[:, None, :], Ct[:, None, :]
        d = delta[..., t][..., None]  # (b, d, 1)
        x = torch.exp(d * A.double()) * x + d * Bt * u[..., t][..., None]
        ys.append((x * Ct).sum(-1))
    y = torch.stack(ys, dim=-1)  # (b, d, l)
    if D is not None:
        y = y + u * D[:, None]
    if z is not None:
        y = y * torch.nn.functional.silu(z)
    return (y, x) if return_last_state else y


def fake_causal_conv1d_fn(
    x,
    weight,
    bias=None,
    seq_idx=None,
    initial_states=None,
    return_final_states=False,
    final_states_out=None,
    activation=None,
):
    """causal-conv1d: x (b, c, l), weight (c, k), initial_states (b, c, k-1); taps never
    cross a change of seq_idx."""
    bsz, ch, length = x.shape
    width = weight.shape[1]
    hist = (
        torch.zeros(bsz, ch, width - 1, dtype=torch.float64)
        if initial_states is None
        else initial_states.double()
    )
    full = torch.cat([hist, x.double()], dim=-1)  # (b, c, k-1+l)
    y = torch.zeros(bsz, ch, length, dtype=torch.float64)
    for b in range(bsz):
        for t in range(length):
            for j in range(width):
                src = t - (width - 1) + j
                if seq_idx is not None and (src < 0 or seq_idx[b, src] != seq_idx[b, t]):
                    continue
                y[b, :, t] += weight[:, j].double() * full[b, :, src + width - 1]
    if bias is not None:
        y = y + bias.double()[:, None]
    if activation in ("silu", "swish"):
        y = torch.nn.functional.silu(y)
    return y.to(x.dtype)


def _fake_attend(q, k, v, scale, causal, window_size):
    """One sequence: q (sq, h, d), k/v (sk, hk, d); bottom-right causal; window (l, r)."""
    sq, heads, dim = q.shape
    sk = k.shape[0]
    rep = heads // k.shape[1]
    kk, vv = k.repeat_interleave(rep, 1).double(), v.repeat_interleave(rep, 1).double()
    scale = dim**-0.5 if scale is None else scale
    scores = torch.einsum("qhd,khd->hqk", q.double(), kk) * scale
    i = torch.arange(sq)[:, None] + sk - sq
    j = torch.arange(sk)[None, :]
    left, right = window_size
    right = 0 if causal else right
    ok = torch.ones(sq, sk, dtype=torch.bool)
    if left >= 0:
        ok &= j >= i - left
    if right >= 0:
        ok &= j <= i + right
    scores = scores.masked_fill(~ok, float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, -1), vv)


def fake_flash_attn_func(
    q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1)
):
    return torch.stack(
        [_fake_attend(q[b], k[b], v[b], softmax_scale, causal, window_size) for b in range(len(q))]
    ).to(q.dtype)


def fake_flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
):
    parts = []
    for n in range(len(cu_seqlens_q) - 1):
        qs = slice(int(cu_seqlens_q[n]), int(cu_seqlens_q[n + 1]))
        ks = slice(int(cu_seqlens_k[n]), int(cu_seqlens_k[n + 1]))
        assert qs.stop - qs.start <= max_seqlen_q
        parts.append(_fake_attend(q[qs], k[ks], v[ks], softmax_scale, causal, window_size))
    return torch.cat(parts).to(q.dtype)


def _module(name: str, **attrs: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__dict__.update(attrs)
    return module


LIBRARIES: dict[str, dict[str, dict[str, Callable[..., Any]]]] = {
    "fla": {
        "fla": {},
        "fla.ops": {},
        "fla.ops.simple_gla": {"chunk_simple_gla": fake_chunk_simple_gla},
    },
    "mamba_ssm": {
        "mamba_ssm": {},
        "mamba_ssm.ops": {},
        "mamba_ssm.ops.triton": {},
        "mamba_ssm.ops.triton.ssd_combined": {
            "mamba_chunk_scan_combined": fake_mamba_chunk_scan_combined
        },
        "mamba_ssm.ops.selective_scan_interface": {"selective_scan_fn": fake_selective_scan_fn},
    },
    "causal_conv1d": {"causal_conv1d": {"causal_conv1d_fn": fake_causal_conv1d_fn}},
    "flash_attn": {
        "flash_attn": {
            "flash_attn_func": fake_flash_attn_func,
            "flash_attn_varlen_func": fake_flash_attn_varlen_func,
        }
    },
}


@pytest.fixture
def fake_libraries(monkeypatch: pytest.MonkeyPatch) -> None:
    for modules in LIBRARIES.values():
        for name, attrs in modules.items():
            monkeypatch.setitem(sys.modules, name, _module(name, **attrs))


def _missing(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):
        return True


# -- resolution and refusal ------------------------------------------------------------------------

PROVIDED = [
    ("ssd_scan", "fla"),
    ("ssd_scan", "mamba_ssm"),
    ("selective_scan", "mamba_ssm"),
    ("causal_conv1d", "causal_conv1d"),
    ("attention", "flash_attn"),
]


@pytest.mark.parametrize(("kernel", "provider"), PROVIDED)
def test_resolves_on_cuda_when_installed(fake_libraries, kernel: str, provider: str) -> None:
    dtype = torch.bfloat16
    backend = kb.BackendPolicy({kernel: provider}).resolve(kernel, CUDA, dtype)
    assert backend.provider == provider
    assert backend.fn.__module__ == "mixstack.kernels.libraries"


@pytest.mark.parametrize(("kernel", "provider"), PROVIDED)
def test_refused_on_cpu_even_when_installed(fake_libraries, kernel: str, provider: str) -> None:
    with pytest.raises(BackendError, match=r"cannot run on cpu/.*needs a CUDA device"):
        kb.BackendPolicy({kernel: provider}).resolve(kernel, CPU, torch.float32)
    # auto on the CPU is unaffected by the installed libraries: mixstack's own providers
    assert kb.BackendPolicy("auto").resolve(kernel, CPU, torch.float32).provider in {
        "native",
        "torch",
    }


@pytest.mark.parametrize(("kernel", "provider"), PROVIDED)
def test_not_installed_names_the_package_and_the_extra(
    monkeypatch: pytest.MonkeyPatch, kernel: str, provider: str
) -> None:
    for name in {"fla", "mamba_ssm", "causal_conv1d", "flash_attn"}:
        monkeypatch.setitem(sys.modules, name, None)  # import of it fails: not installed
    with pytest.raises(BackendError) as info:
        kb.BackendPolicy({kernel: provider}).resolve(kernel, CUDA, torch.bfloat16)
    assert f"package {provider!r} is not installed" in str(info.value)
    assert "mixstack[cuda]" in str(info.value)


def test_flash_attn_refuses_fp32(fake_libraries) -> None:
    with pytest.raises(BackendError, match=r"dtype torch\.float32 not supported"):
        kb.BackendPolicy("flash_attn").resolve("attention", CUDA, torch.float32)


def test_auto_priority_lists_the_library_providers_before_torch() -> None:
    order = kb.AUTO_PRIORITY
    for provider in ("mamba_ssm", "causal_conv1d", "flash_attn", "fla"):
        assert order.index(provider) < order.index("torch")


# -- argument mapping: every parity case, against the reference -----------------------------------

REFUSALS = {
    # (kernel, provider): substrings of the error for cases the library cannot express
    ("selective_scan", "mamba_ssm"): ("seq_idx", "initial_state"),
    ("causal_conv1d", "causal_conv1d"): ("padding (seq_idx −1) before a real token",),
    ("attention", "flash_attn"): ("q_positions", "different query and key seq_idx"),
}


def _leaves(case: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v.detach().clone().double().requires_grad_()
        if isinstance(v, Tensor) and v.is_floating_point()
        else v
        for k, v in case.items()
    }


def _flat(out: Any) -> list[Tensor]:
    return [out] if isinstance(out, Tensor) else [t for t in out if isinstance(t, Tensor)]


@pytest.mark.parametrize(("kernel", "provider"), PROVIDED)
def test_mapping_matches_the_reference(fake_libraries, kernel: str, provider: str) -> None:
    spec = kb.get_kernel(kernel)
    fn = spec.backends[provider].fn
    reference = spec.backends["reference"].fn
    ran = refused = 0
    for i, case in enumerate(PARITY_CASES[kernel]()):
        ours, theirs = _leaves(case), _leaves(case)
        try:
            got = _flat(fn(**ours))
        except BackendError as error:
            allowed = REFUSALS.get((kernel, provider), ())
            assert any(s in str(error) for s in allowed), f"case {i}: unexpected refusal {error}"
            assert "use backend 'torch'" in str(error)
            refused += 1
            continue
        want = _flat(reference(**theirs))
        assert len(got) == len(want), f"case {i}"
        for a, b in zip(got, want, strict=True):
            assert a.shape == b.shape, f"case {i}"
            torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-6)
        # gradients through the mapping (a random cotangent pulled back)
        g = torch.Generator().manual_seed(i)
        cot = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in want]
        inputs = [k for k, v in ours.items() if isinstance(v, Tensor) and v.requires_grad]
        ga = torch.autograd.grad(
            sum((t.double() * c).sum() for t, c in zip(got, cot, strict=True)),
            [ours[k] for k in inputs],
            allow_unused=True,
        )
        gb = torch.autograd.grad(
            sum((t.double() * c).sum() for t, c in zip(want, cot, strict=True)),
            [theirs[k] for k in inputs],
            allow_unused=True,
        )
        for name, a, b in zip(inputs, ga, gb, strict=True):
            a = torch.zeros_like(ours[name]) if a is None else a
            b = torch.zeros_like(theirs[name]) if b is None else b
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"case {i}: d{name}")
        ran += 1
    assert ran >= 2, f"{provider} ran only {ran} parity cases ({refused} refused)"


def test_fla_packs_rows_into_cu_seqlens(fake_libraries, monkeypatch) -> None:
    """The packed SSD case goes through one variable-length batch: segments per document
    run, each row starting a new sequence, padding joined to the run before it."""
    seen: dict[str, Any] = {}

    def spy(**kwargs: Any) -> Any:
        seen.update(kwargs)
        return fake_chunk_simple_gla(**kwargs)

    monkeypatch.setattr(sys.modules["fla.ops.simple_gla"], "chunk_simple_gla", spy)
    case = PARITY_CASES["ssd_scan"]()[3]
    lib.ssd_scan_fla(**case)
    # rows: [pad 2 + doc0 9 | doc1 12 | doc2 6] and [doc5 17 + pad 3 | doc6 9], L = 29
    assert seen["cu_seqlens"].tolist() == [0, 11, 23, 29, 49, 58]
    assert seen["q"].shape[0] == 1 and seen["scale"] == 1.0


def test_selective_scan_refusal_is_clear() -> None:
    case = PARITY_CASES["selective_scan"]()[3]
    with pytest.raises(BackendError) as info:
        lib.selective_scan_mamba_ssm(**case)
    message = str(info.value)
    assert "'mamba_ssm'" in message and "seq_idx" in message and "torch" in message


# -- real libraries on a GPU ---------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(("kernel", "provider"), PROVIDED)
def test_gpu_parity_with_the_real_library(kernel: str, provider: str) -> None:
    if not torch.cuda.is_available() or _missing(provider):
        pytest.skip(f"needs CUDA and the {provider!r} package")
    spec = kb.get_kernel(kernel)
    dtype = torch.bfloat16 if provider == "flash_attn" else torch.float32
    for case in PARITY_CASES[kernel]():
        cuda_case = {
            k: v.to("cuda", dtype)
            if isinstance(v, Tensor) and v.is_floating_point()
            else v.to("cuda")
            if isinstance(v, Tensor)
            else v
            for k, v in case.items()
        }
        try:
            got = _flat(spec.backends[provider].fn(**cuda_case))
        except BackendError:
            continue
        want = _flat(spec.backends["reference"].fn(**case))
        tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
        for a, b in zip(got, want, strict=True):
            scale = b.abs().max().clamp(min=1e-6)
            assert ((a.float().cpu() - b.float()).abs().max() / scale) < tol
    assert math.isfinite(tol)
