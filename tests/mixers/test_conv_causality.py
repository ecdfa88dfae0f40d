"""Causality of the convolution family, checked on the full Jacobian (fp64).

The contract tests perturb a few positions and look at the zero pattern of the mixing
matrices M, which hold the coefficients (gates, data-dependent kernels) fixed. Here every
output's derivative with respect to every input is computed, so a dependence on the
future through *any* path (short conv, conditioning network of block-causal Orchid,
implicit filters, packed-document layout) shows up: output (b, i) may depend on input
(b, j) only when j <= i, both are tokens (not padding) and both belong to the same
document. Padding outputs depend on nothing. And the allowed dependencies are really
there (no vacuous pass).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mixstack.blocks.implicit_filter import ImplicitFilterConfig
from mixstack.dsl.context import LayerContext
from mixstack.mixers.hyena import Hyena, HyenaConfig
from mixstack.mixers.long_conv import LongConv, LongConvConfig, SGConvKernelConfig
from mixstack.mixers.long_conv import SquashKernelConfig as Squash
from mixstack.mixers.orchid import Orchid, OrchidConfig

F64 = torch.float64
D, LMAX, L = 4, 16, 12
SMALL = ImplicitFilterConfig(width=8)
# padding inside a document (row 0), at both ends (row 1), a 2-token document
SEQ_IDX = torch.tensor(
    [[0, 0, 0, -1, 0, 0, 1, 1, 1, 1, 1, 1], [-1, 2, 2, 2, 2, 2, 2, 2, 3, 3, -1, -1]]
)

CASES: dict[str, tuple[type[nn.Module], object]] = {
    "orchid-block1-absfreq": (Orchid, OrchidConfig(block_size=1, filter=SMALL)),
    "orchid-block3-absfreq": (Orchid, OrchidConfig(block_size=3, filter=SMALL)),
    "orchid-block5-corrTime": (
        Orchid,
        OrchidConfig(conditioning="corrTime", block_size=5, conv_filter_size=5, filter=SMALL),
    ),
    "orchid-block4-corrTime-no-res-no-norm": (
        Orchid,
        OrchidConfig(
            conditioning="corrTime",
            block_size=4,
            norm="none",
            residual_long_conv="none",
            filter=SMALL,
        ),
    ),
    "hyena-order2": (Hyena, HyenaConfig(filter=SMALL)),
    "hyena-order3": (Hyena, HyenaConfig(order=3, short_filter_order=4, filter=SMALL)),
    "long_conv-squash-smooth": (
        LongConv,
        LongConvConfig(kernel_len=9, kernel=Squash(lam=0.001, smooth=3)),
    ),
    "long_conv-sgconv": (LongConv, LongConvConfig(kernel=SGConvKernelConfig(sub_kernel_len=3))),
}


def build(name: str) -> nn.Module:
    cls, cfg = CASES[name]
    m = cls(cfg, LayerContext(d_model=D, max_seq_len=LMAX, arch="causal_lm")).double()
    m.reset_parameters(torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # generic values: small init projections would hide weak leaks
        for pname, p in m.named_parameters():
            if pname.startswith(("in_linear", "in_proj")):
                p.normal_(0, 0.5, generator=g)
            elif pname == "kernel.kernel":
                p.normal_(0, 0.05, generator=g)
            elif "norm" in pname and p.dim() == 1:
                p.normal_(1.0 if pname.endswith("weight") else 0.0, 0.3, generator=g)
    assert m.capabilities.causal
    return m


def allowed(seq_idx: torch.Tensor | None, B: int) -> torch.Tensor:
    """(B, L, B, L) bool: output (b, i) may depend on input (c, j)."""
    out = torch.zeros(B, L, B, L, dtype=torch.bool)
    for b in range(B):
        doc, prev, docs = -1, None, []
        for t in range(L):
            sid = 0 if seq_idx is None else int(seq_idx[b, t])
            if sid < 0:
                docs.append(None)  # padding: transparent, belongs to no document
                continue
            if sid != prev:
                doc += 1
            docs.append(doc)
            prev = sid
        for i in range(L):
            for j in range(i + 1):
                if docs[i] is not None and docs[i] == docs[j]:
                    out[b, i, b, j] = True
    return out


def jacobian_norms(m: nn.Module, x: torch.Tensor, seq_idx: torch.Tensor | None) -> torch.Tensor:
    """(B, L, B, L): max over channels of |∂ (r · out[b, i, :]) / ∂ x[c, j, :]| for a random
    r per output position (one forward, one backward per position; a dependence on any
    channel survives a random combination almost surely)."""
    x = x.clone().requires_grad_()
    out = m(x, seq_idx=seq_idx)
    r = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=out.dtype)
    B = x.shape[0]
    J = torch.zeros(B, L, B, L, dtype=x.dtype)
    for b in range(B):
        for i in range(L):
            (g,) = torch.autograd.grad(out[b, i] @ r[b, i], x, retain_graph=True)
            J[b, i] = g.abs().amax(dim=-1)
    return J


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed-padded"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_no_output_depends_on_the_future_other_documents_or_padding(name, packed):
    m = build(name)
    seq_idx = SEQ_IDX if packed else None
    x = torch.randn(2, L, D, generator=torch.Generator().manual_seed(2), dtype=F64)
    J = jacobian_norms(m, x, seq_idx)
    ok = allowed(seq_idx, 2)
    scale = J.max()
    leak = J[~ok].max()
    # FFT rounding leaves ~1e-17 where the exact value is 0; a real leak is O(1)
    assert leak <= 1e-12 * scale, f"{name}: dependence outside the causal pattern {leak:.3g}"
    # the allowed pattern is really used: every token depends on itself and (when it has a
    # predecessor in its document) on the token before it
    for b in range(2):
        for i in range(L):
            if ok[b, i, b, i]:
                assert J[b, i, b, i] > 1e-6 * scale, f"{name}: ({b}, {i}) ignores itself"
                earlier = [j for j in range(i) if ok[b, i, b, j]]
                if earlier:
                    assert J[b, i, b, earlier[-1]] > 1e-6 * scale, f"{name}: ({b}, {i}) past"
