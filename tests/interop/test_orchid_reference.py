"""Orchid reference checkpoints (Karami-m/orchid ``OrchidOperator``) converted to
mixstack's Orchid: equal outputs against an independent re-statement, written here, of
the reference's forward formula (its scaling: ``rfft(x)/n`` forward, unscaled inverse;
zero-padded convolutions; ``causal=False`` conditioning), in the regime where the two
agree (the conversion length, filters of width 1), and different outside it."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from mixstack.dsl.context import LayerContext
from mixstack.dsl.errors import CheckpointError
from mixstack.interop.orchid_reference import (
    ReferenceConfig,
    convert_state_dict,
    orchid_config,
)
from mixstack.mixers.orchid import Orchid

F64 = torch.float64
D, LMAX, WIDTH, EMB = 4, 16, 8, 5


def reference_state_dict(ref: ReferenceConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of a reference ``OrchidOperator`` (its key names), drawn at random:
    norms, Sin frequencies, positional features and decays included."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 0.5, mean: float = 0.0) -> torch.Tensor:
        return mean + scale * torch.randn(*shape, generator=g, dtype=F64)

    K, Kc = ref.short_filter_order, ref.conv_filter_size
    sd = {
        "in_linear.weight": r(3 * D, D),
        "in_linear.bias": r(3 * D),
        "out_linear.weight": r(D, D),
        "out_linear.bias": r(D),
        "conv1d_short.weight": r(3 * D, 1, K),
        "conv1d_short.bias": r(3 * D),
        "conv_kernel_nn.nn_model.conv1d_ls.0.weight": r(D, 1, Kc),
        "conv_kernel_nn.nn_model.conv1d_ls.0.bias": r(D),
        "conv_kernel_nn.nn_model.norm_ls.0.norm_conv_kernel.weight": r(D, mean=1.0),
        "conv_kernel_nn.nn_model.norm_ls.0.norm_conv_kernel.bias": r(D),
        "conv_kernel_nn.nn_model2.conv1d_ls.0.weight": r(2 * D, 1, Kc),
        "conv_kernel_nn.nn_model2.conv1d_ls.0.bias": r(2 * D),
        "conv_kernel_nn.nn_model2.norm_ls.0.norm_conv_kernel.weight": r(2 * D, mean=1.0),
        "conv_kernel_nn.nn_model2.norm_ls.0.norm_conv_kernel.bias": r(2 * D),
    }
    for name in ("fixed_conv", "fixed_conv_res"):
        freq = r(1, WIDTH, mean=1.0)  # one Sin module shared by the three activations
        sd |= {
            f"{name}.bias": r(D),
            f"{name}.pos_emb.z": r(1, LMAX, EMB),
            f"{name}.pos_emb.t": torch.linspace(0, 1, LMAX, dtype=F64)[None, :, None],
            f"{name}.modulation.deltas": -r(1, 1, D, mean=3.0).abs(),
            f"{name}.implicit_filter.0.weight": r(WIDTH, EMB),
            f"{name}.implicit_filter.0.bias": r(WIDTH),
            f"{name}.implicit_filter.2.weight": r(WIDTH, WIDTH),
            f"{name}.implicit_filter.2.bias": r(WIDTH),
            f"{name}.implicit_filter.4.weight": r(WIDTH, WIDTH),
            f"{name}.implicit_filter.4.bias": r(WIDTH),
            f"{name}.implicit_filter.6.weight": r(D, WIDTH),
        }
        for i in (1, 3, 5):
            sd[f"{name}.implicit_filter.{i}.freq"] = freq
    return sd


# -- the reference's formula, restated ------------------------------------------------------------


def _conv_zero(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, groups: int, causal: bool):
    """Zero-padded conv of x (B, n, C_in) along axis 1, as nn.Conv1d with padding K−1 then
    [:n] (causal) or (K−1)//2 ('same')."""
    K = w.shape[-1]
    pad = (K - 1, 0) if causal else ((K - 1) // 2, (K - 1) // 2)
    return F.conv1d(F.pad(x.transpose(1, 2), pad), w, b, groups=groups).transpose(1, 2)


def _filter(sd, name: str, n: int, w_mod: float) -> torch.Tensor:
    """The reference's implicit filter at n positions: (D, n)."""
    h, t = sd[f"{name}.pos_emb.z"][0, :n], sd[f"{name}.pos_emb.t"][0, :n]
    for i in (0, 2, 4):
        h = h @ sd[f"{name}.implicit_filter.{i}.weight"].T + sd[f"{name}.implicit_filter.{i}.bias"]
        h = torch.sin(w_mod * sd[f"{name}.implicit_filter.{i + 1}.freq"] * h)
    h = h @ sd[f"{name}.implicit_filter.6.weight"].T
    decay = torch.exp(-t * sd[f"{name}.modulation.deltas"][0].abs())
    return (h * decay).T


def reference_forward(sd, u: torch.Tensor, ref: ReferenceConfig) -> torch.Tensor:
    """OrchidOperator.forward for causal=False, absfreq/convtf, order 2, one head."""
    n = u.shape[1]
    fft = lambda x: torch.fft.rfft(x, n=n, dim=-1) / n  # noqa: E731  (the reference's transform)
    ifft = lambda X: torch.fft.irfft(X, n=n, dim=-1, norm="forward")  # noqa: E731
    P = u @ sd["in_linear.weight"].T + sd["in_linear.bias"]  # (B, n, 3D)
    s = P[..., 2 * D :]
    c = "conv_kernel_nn."
    a = _conv_zero(
        s, sd[c + "nn_model.conv1d_ls.0.weight"], sd[c + "nn_model.conv1d_ls.0.bias"], D, False
    )
    a = F.layer_norm(a, (D,), sd[c + "nn_model.norm_ls.0.norm_conv_kernel.weight"],
                     sd[c + "nn_model.norm_ls.0.norm_conv_kernel.bias"])  # fmt: skip
    A = fft(a.transpose(1, 2)).transpose(1, 2)  # (B, bins, D)
    m = A.real**2 + A.imag**2
    h = _conv_zero(
        m, sd[c + "nn_model2.conv1d_ls.0.weight"], sd[c + "nn_model2.conv1d_ls.0.bias"], D, False
    )
    h = F.layer_norm(h, (2 * D,), sd[c + "nn_model2.norm_ls.0.norm_conv_kernel.weight"],
                     sd[c + "nn_model2.norm_ls.0.norm_conv_kernel.bias"])  # fmt: skip
    h_hat = torch.complex(h[..., 0::2], h[..., 1::2]).transpose(1, 2)  # (B, D, bins)
    x0, x1, v = _conv_zero(
        P, sd["conv1d_short.weight"], sd["conv1d_short.bias"], 3 * D, True
    ).split(D, -1)
    w = (v * x1).transpose(1, 2)  # (B, D, n)
    k = _filter(sd, "fixed_conv", n, ref.w_mod)
    y = ifft(fft(w) * (fft(k) + h_hat)) + w * sd["fixed_conv.bias"][:, None]
    y = y * x0.transpose(1, 2)
    k2 = _filter(sd, "fixed_conv_res", n, ref.w_mod)
    ut = u.transpose(1, 2)
    y = y + ifft(fft(ut) * fft(k2)) + ut * sd["fixed_conv_res.bias"][:, None]
    return y.transpose(1, 2) @ sd["out_linear.weight"].T + sd["out_linear.bias"]


def converted(ref: ReferenceConfig, sd, length: int) -> Orchid:
    ctx = LayerContext(d_model=D, max_seq_len=ref.l_max, arch="encoder")
    module = Orchid(orchid_config(ref), ctx).double()
    module.load_state_dict(convert_state_dict(sd, ref, length), strict=True)
    return module.eval()


EXACT = ReferenceConfig(
    d_model=D, l_max=LMAX, filter_order=WIDTH, emb_dim=EMB, short_filter_order=1,
    conv_filter_size=1, causal=False, w_mod=1.5,
)  # fmt: skip


@pytest.mark.parametrize("n", [13, 16])
def test_converted_checkpoint_equals_the_reference_formula_at_its_length(n) -> None:
    sd = reference_state_dict(EXACT)
    u = torch.randn(2, n, D, generator=torch.Generator().manual_seed(5), dtype=F64)
    want = reference_forward(sd, u, EXACT)
    with torch.no_grad():
        got = converted(EXACT, sd, n)(u)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert want.abs().max() > 0.1  # not a trivially small output


def test_at_another_length_the_mapping_no_longer_holds() -> None:
    """The 1/n and 1/n² factors are folded in for one n: converted for 16, run at 13."""
    sd = reference_state_dict(EXACT)
    u = torch.randn(2, 13, D, generator=torch.Generator().manual_seed(5), dtype=F64)
    with torch.no_grad():
        diff = (converted(EXACT, sd, 16)(u) - reference_forward(sd, u, EXACT)).abs().max()
    assert diff > 1e-3


def test_wider_filters_pad_differently_and_the_conversion_says_so(caplog) -> None:
    ref = ReferenceConfig(**{**EXACT.__dict__, "short_filter_order": 3, "conv_filter_size": 3})
    sd = reference_state_dict(ref)
    u = torch.randn(2, 16, D, generator=torch.Generator().manual_seed(5), dtype=F64)
    with caplog.at_level(logging.WARNING, logger="mixstack.interop.orchid_reference"):
        module = converted(ref, sd, 16)
    assert "approximate" in caplog.text
    with torch.no_grad():
        assert (module(u) - reference_forward(sd, u, ref)).abs().max() > 1e-6


def test_unsupported_reference_settings_are_all_named() -> None:
    ref = ReferenceConfig(d_model=D, causal=True, conv_type="corrTime", dxt="dct", num_heads=2)
    with pytest.raises(CheckpointError) as info:
        orchid_config(ref)
    for fragment in ("causal=True", "corrTime", "dxt='dct'", "num_heads=2"):
        assert fragment in str(info.value)


def test_missing_and_foreign_keys_are_all_named() -> None:
    sd = reference_state_dict(EXACT)
    del sd["out_linear.bias"], sd["conv_kernel_nn.nn_model2.conv1d_ls.0.weight"]
    sd["adaptive_conv.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as info:
        convert_state_dict(sd, EXACT, 16)
    text = str(info.value)
    assert "missing: conv_kernel_nn.nn_model2.conv1d_ls.0.weight, out_linear.bias" in text
    assert "no counterpart: adaptive_conv.extra" in text


def test_a_prefix_selects_one_operator_of_a_model() -> None:
    sd = {f"bert.layer.0.mixer.{k}": v for k, v in reference_state_dict(EXACT).items()}
    sd["bert.embeddings.word"] = torch.zeros(3)
    out = convert_state_dict(sd, EXACT, 16, prefix="bert.layer.0.mixer.")
    assert "in_linear.weight" in out and "conditioning.freq_conv.weight" in out
    torch.testing.assert_close(
        out["conditioning.freq_conv.weight"],
        sd["bert.layer.0.mixer.conv_kernel_nn.nn_model2.conv1d_ls.0.weight"] / 256,
    )
