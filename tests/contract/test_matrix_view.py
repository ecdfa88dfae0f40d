"""Contracts 1 and 2: the matrix view reproduces forward; causality holds exactly.

(1) ``finish(Σ M @ v)`` from the generic :func:`materialize` equals ``forward`` in
fp64, at odd lengths, also with packed ``seq_idx``. (2) Causal mixers have a zero
upper triangle in every M, and changing x at t changes no output before t; mixers that
declare themselves non-causal really look ahead (otherwise they should say causal).
"""

from __future__ import annotations

import pytest
import torch

from mixstack.dsl.errors import CapabilityError
from mixstack.mixers.base import apply_materialized, materialize

# fp64 rounding: an upper-triangle entry below this fraction of max|M| counts as zero
# (FFT-based mixers produce ~1e-17 there; a real leak is O(1)).
ZERO_REL = 1e-12


@pytest.mark.parametrize("length", [1, 7, 33])
def test_materialized_equals_forward_fp64(matrix_case, length: int, near) -> None:
    module = matrix_case.build()
    x, ids = matrix_case.inputs(2, length)
    with torch.no_grad():
        want = matrix_case.run(module, x, ids)
        terms, finish = materialize(module, x, input_ids=ids)
        got = apply_materialized(terms, finish)
    for M, v in terms:
        assert M.shape[:2] == v.shape[:2] and M.shape[-2:] == (length, length)
        assert M.dtype == torch.float64
    near(got, want, 1e-9, "finish(Σ M v) vs forward")


def test_materialized_equals_forward_with_packed_seq_idx(matrix_case, near) -> None:
    module = matrix_case.build()
    x, ids = matrix_case.inputs(2, 12, seed=1)
    seq_idx = torch.tensor([[0] * 5 + [1] * 7, [-1] * 2 + [3] * 6 + [4] * 3 + [-1]])
    with torch.no_grad():
        want = matrix_case.run(module, x, ids, seq_idx=seq_idx)
        terms, finish = materialize(module, x, input_ids=ids, seq_idx=seq_idx)
        got = apply_materialized(terms, finish)
    near(got, want, 1e-9, "packed: finish(Σ M v) vs forward")


def test_matrix_upper_triangle_matches_causality(matrix_case) -> None:
    module = matrix_case.build()
    x, ids = matrix_case.inputs(2, 9, seed=2)
    terms, _ = materialize(module, x, input_ids=ids)
    upper = torch.stack([torch.triu(M, diagonal=1).abs().amax() for M, _ in terms]).amax()
    scale = torch.stack([M.abs().amax() for M, _ in terms]).amax()
    assert scale > 0, "every mixing matrix is zero"
    if matrix_case.capabilities.causal:
        assert upper <= ZERO_REL * scale, f"causal mixer: |M| above the diagonal = {upper:.3g}"
    else:
        assert upper > 1e-6 * scale, "declared non-causal, but M is lower triangular"


@pytest.mark.parametrize("t", [0, 4, 8])
def test_perturbing_x_at_t_changes_nothing_before_t(case, t: int, near) -> None:
    module = case.build()
    x, ids = case.inputs(2, 9, seed=3)
    x2 = x.clone()
    x2[:, t] += torch.randn(2, case.d_model, generator=torch.Generator().manual_seed(4))
    ids2 = None
    if ids is not None:
        ids2 = ids.clone()
        ids2[:, t] = (ids2[:, t] + 1) % max(int(ids.max()) + 1, 2)
    with torch.no_grad():
        out, out2 = case.run(module, x, ids), case.run(module, x2, ids2)
    assert not torch.equal(out[:, t:], out2[:, t:]), "the perturbation changed nothing at all"
    if t == 0:
        return
    if case.capabilities.causal:
        near(out2[:, :t], out[:, :t], ZERO_REL, f"outputs before t={t}")
    else:
        change = (out2[:, :t] - out[:, :t]).abs().max()
        assert change > 1e-9 * out.abs().max(), "declared non-causal, but the past ignores x[t]"


def test_layers_without_a_matrix_view_refuse_it_by_name(nomatrix_case) -> None:
    """mixing_terms / mix of a layer without a matrix view raise one CapabilityError
    naming the layer type (a MixstackError the CLI prints)."""
    module = nomatrix_case.build()
    x, ids = nomatrix_case.inputs(1, 4)
    for call in (
        lambda: module.mixing_terms(x, input_ids=ids),
        lambda: module.mix(None, x[..., None]),
    ):
        with pytest.raises(
            CapabilityError, match=rf"^{nomatrix_case.config.type} layer .* no matrix view"
        ):
            call()
