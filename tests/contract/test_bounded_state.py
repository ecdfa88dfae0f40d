"""Contract: ``Mixer.bounded_state`` tells the truth.

A layer that declares a bounded decode state (it may decode past ``max_seq_len``) must
allocate the same bytes whatever ``max_len`` it is asked for; one that does not (the
default) is refused past ``max_seq_len``, which is only needed when its state grows.
Sizes come from ``init_state`` on the meta device, so nothing is allocated.
"""

from __future__ import annotations

import torch

SHORT, LONG = 64, 4096


def test_declared_bounded_state_matches_the_state_size(decode_case) -> None:
    module = decode_case.build(dtype=torch.float32)
    assert isinstance(module.bounded_state, bool)
    short = module.state_nbytes(SHORT, torch.float32)
    long = module.state_nbytes(LONG, torch.float32)
    if module.bounded_state:
        assert short == long, (
            f"{decode_case.id} declares bounded_state but its state grows from {short} bytes "
            f"(max_len {SHORT}) to {long} (max_len {LONG})"
        )
    else:
        assert long > short, (
            f"{decode_case.id}'s state has {short} bytes for any max_len: declare "
            "`bounded_state` True (property on the mixer) so it may decode past max_seq_len"
        )
