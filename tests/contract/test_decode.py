"""Contract 3: decoding (prefill with ``forward(state=...)`` then ``step``) equals forward.

Prefills have odd lengths (and lengths not dividing chunk sizes); the cache is sized
exactly to the sequence; a beam reorder with ``State.index_select`` keeps rows intact.
"""

from __future__ import annotations

import pytest
import torch

from mixstack.dsl.errors import CapabilityError, MixstackError
from mixstack.mixers.base import State

LENGTH = 11


def decode(case, module, x, ids, prefill: int, state: State):
    """Outputs of a prefill of ``prefill`` tokens followed by single steps, (B, L, D)."""
    head = None if ids is None else ids[:, :prefill]
    outs = [case.run(module, x[:, :prefill], head, state=state)]
    for t in range(prefill, x.shape[1]):
        token = None if ids is None else ids[:, t]
        outs.append(case.step(module, x[:, t], token, state)[:, None])
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("prefill", [1, 5, 9])
def test_step_equals_forward_after_odd_prefill(decode_case, prefill: int, near) -> None:
    module = decode_case.build()
    x, ids = decode_case.inputs(2, LENGTH, seed=prefill)
    with torch.no_grad():
        want = decode_case.run(module, x, ids)
        state = module.init_state(2, LENGTH, device="cpu", dtype=torch.float64)
        got = decode(decode_case, module, x, ids, prefill, state)
    near(got[:, :prefill], want[:, :prefill], 1e-9, "prefill outputs")
    near(got[:, prefill:], want[:, prefill:], 1e-9, "step outputs")


def test_state_index_select_reorders_rows(decode_case, near) -> None:
    module = decode_case.build()
    x, ids = decode_case.inputs(3, 8, seed=7)
    order = torch.tensor([2, 0, 0])
    with torch.no_grad():
        want = decode_case.run(module, x[order], None if ids is None else ids[order])
        state = module.init_state(3, 8, device="cpu", dtype=torch.float64)
        decode_case.run(module, x[:, :5], None if ids is None else ids[:, :5], state=state)
        state = state.index_select(order)
        steps = [
            decode_case.step(module, x[order, t], None if ids is None else ids[order, t], state)
            for t in range(5, 8)
        ]
    near(torch.stack(steps, dim=1), want[:, 5:], 1e-9, "steps after index_select")


def test_init_state_on_meta_device(decode_case) -> None:
    module = decode_case.build(dtype=torch.float32)
    state = module.init_state(3, 17, device="meta", dtype=torch.bfloat16)
    assert isinstance(state, State)
    for tensor in state.tensors():
        assert tensor.is_meta, "init_state(device='meta') allocated real memory"
        if tensor.dim() > 0:
            assert tensor.shape[0] == 3, f"state tensor {tuple(tensor.shape)} is not batch-first"
    assert module.state_nbytes(17, torch.bfloat16) * 3 == state.nbytes()


def test_layers_without_decode_refuse_every_decode_entry_point(nodecode_case) -> None:
    """init_state, step and forward(state=...) each raise one CapabilityError naming the
    layer type and the capability (a MixstackError, so the CLI prints it; a TypeError too)."""
    module = nodecode_case.build()
    x, ids = nodecode_case.inputs(1, 4)
    token = None if ids is None else ids[:, 0]
    calls = {
        "init_state": lambda: module.init_state(1, 4, device="cpu", dtype=torch.float64),
        "step": lambda: nodecode_case.step(module, x[:, 0], token, State()),
        "forward(state=...)": lambda: nodecode_case.run(module, x, ids, state=State()),
    }
    layer_type = nodecode_case.config.type
    for name, call in calls.items():
        with pytest.raises(CapabilityError) as info:
            call()
        message = str(info.value)
        assert f"{layer_type} layer" in message, f"{name}: {message}"
        assert "capability `decode`" in message, f"{name}: {message}"
        assert isinstance(info.value, MixstackError) and isinstance(info.value, TypeError)
