"""Parity cases: inputs on which every backend of a kernel must match its reference.

:data:`PARITY_CASES` maps each registered kernel to a function returning keyword-argument
dicts (fp32, CPU-sized). ``tests/contract/test_backends.py`` runs every backend on them
and fails for a registered kernel without an entry here. Each function seeds its own
generator, so a case list is the same at every call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from mixstack.kernels import selective_scan, ssd

Case = dict[str, Any]


def packed_ids(rows: list[list[tuple[int, int]]]) -> Tensor:
    """``[[(seq_id, length), ...] per row]`` -> (B, L) sequence ids (−1: padding)."""
    return torch.tensor([[sid for sid, n in row for _ in range(n)] for row in rows])


def _scan_packing() -> Tensor:
    """(2, 29): leading padding and three documents; padding between two documents."""
    return packed_ids([[(-1, 2), (0, 9), (1, 12), (2, 6)], [(5, 17), (-1, 3), (6, 9)]])


def attention_cases() -> list[Case]:
    g = torch.Generator().manual_seed(1234)

    def qkv(B: int, Lq: int, Lk: int, H: int, Hkv: int, P: int, Pv: int) -> Case:
        return {
            "q": torch.randn(B, Lq, H, P, generator=g),
            "k": torch.randn(B, Lk, Hkv, P, generator=g),
            "v": torch.randn(B, Lk, Hkv, Pv, generator=g),
        }

    packed = packed_ids([[(-1, 2), (0, 4), (1, 5)], [(3, 6), (4, 3), (-1, 2)]])  # (2, 11)
    cached_ids = packed_ids([[(0, 6), (1, 4)], [(-1, 3), (2, 7)]])  # (2, 10)
    return [
        {**qkv(2, 7, 7, 4, 4, 8, 8), "causal": True},
        {**qkv(2, 7, 7, 4, 4, 8, 8), "causal": False},
        {**qkv(1, 9, 9, 6, 2, 5, 3), "causal": True},  # GQA, odd P, Pv != P
        {**qkv(2, 11, 11, 4, 1, 8, 8), "causal": True, "window": 3},  # MQA
        {**qkv(2, 11, 11, 4, 2, 8, 8), "causal": True, "q_seq_idx": packed, "k_seq_idx": packed},
        {**qkv(2, 11, 11, 2, 2, 4, 4), "causal": False, "q_seq_idx": packed, "k_seq_idx": packed},
        {**qkv(2, 3, 10, 4, 2, 8, 8), "causal": True},  # chunked prefill
        {**qkv(2, 1, 10, 4, 2, 8, 8), "causal": True, "window": 4},  # decode
        {
            **qkv(2, 4, 10, 4, 2, 8, 8),
            "causal": True,
            "q_seq_idx": cached_ids[:, 6:],
            "k_seq_idx": cached_ids,
        },
        {
            **qkv(2, 5, 5, 3, 3, 7, 13),
            "causal": True,
            "scale": 0.37,
            "q_positions": torch.tensor([[0, 1, 1, 3, 4], [4, 3, 2, 1, -1]]),
        },
    ]


def _conv_packing() -> Tensor:
    """(2, 17): padding at the start, a 1-token document, trailing padding."""
    return packed_ids([[(-1, 2), (0, 5), (1, 1), (2, 9)], [(4, 11), (-1, 6)]])


def _conv_case(
    g: torch.Generator, bsz: int, length: int, channels: int, width: int, *, bias: bool = False
) -> Case:
    """x (B, L, C), weight (C, K) and, with ``bias``, bias (C,)."""
    case = {
        "x": torch.randn(bsz, length, channels, generator=g),
        "weight": torch.randn(channels, width, generator=g),
    }
    if bias:
        case["bias"] = torch.randn(channels, generator=g)
    return case


def causal_conv1d_cases() -> list[Case]:
    g = torch.Generator().manual_seed(99)
    silu = _conv_case(g, 2, 13, 6, 4, bias=True)
    with_state = _conv_case(g, 2, 3, 5, 4)  # L < K: the state reaches every output
    with_state["initial_state"] = torch.randn(2, 5, 4, generator=g)
    packed = _conv_case(g, 2, 17, 3, 3, bias=True)
    packed["initial_state"] = torch.randn(2, 3, 3, generator=g)
    return [
        {**silu, "activation": "silu"},
        {**with_state, "return_final_state": True},
        {**packed, "seq_idx": _conv_packing(), "return_final_state": True},
        _conv_case(g, 1, 9, 4, 1),  # K = 1
    ]


def centered_conv1d_cases() -> list[Case]:
    g = torch.Generator().manual_seed(7)
    return [
        {**_conv_case(g, 2, 13, 6, 7, bias=True), "activation": "silu"},
        {**_conv_case(g, 2, 17, 3, 5), "seq_idx": _conv_packing()},
        _conv_case(g, 1, 2, 4, 7),  # K > L
    ]


def fftconv_cases() -> list[Case]:
    g = torch.Generator().manual_seed(606)

    def r(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g)

    # (2, 19): padding at the start, inside a document and at the end; a 1-token document
    packed = packed_ids(
        [[(-1, 2), (0, 5), (1, 1), (2, 3), (-1, 1), (2, 7)], [(4, 11), (5, 4), (-1, 4)]]
    )
    return [
        {"u": r(2, 5, 13), "k": r(5, 13)},  # K = L
        {"u": r(2, 3, 17), "k": r(2, 3, 6)},  # per-sample, K < L
        {"u": r(1, 4, 9), "k": r(4, 30)},  # K > L
        {"u": r(2, 3, 11), "k": r(3, 11), "mode": "two_sided", "k_back": r(3, 4)},
        {"u": r(2, 2, 10), "k": r(2, 2, 3), "mode": "two_sided", "k_back": r(2, 2, 25)},
        {"u": r(2, 3, 12), "k": r(3, 12), "mode": "circular"},
        {"u": r(3, 2, 7), "k": r(3, 2, 16), "mode": "circular"},  # folded kernel
        {"u": r(2, 3, 19), "k": r(3, 19), "seq_idx": packed},
        {
            "u": r(2, 3, 19),
            "k": r(2, 3, 8),
            "mode": "two_sided",
            "k_back": r(2, 3, 19),
            "seq_idx": packed,
        },
    ]


def selective_scan_cases() -> list[Case]:
    g = torch.Generator().manual_seed(1234)
    inputs = selective_scan.random_inputs
    return [
        {**inputs(g, 2, 37, 6, 4), "chunk_size": 16},
        {
            **inputs(g, 2, 37, 6, 4, 3),
            "chunk_size": 8,
            "D": torch.randn(6, generator=g),
            "z": torch.randn(2, 37, 6, generator=g),
            "initial_state": torch.randn(2, 6, 4, generator=g),
            "return_final_state": True,
        },
        {**inputs(g, 1, 5, 3, 2), "chunk_size": 64},  # L < chunk
        {
            **inputs(g, 2, 29, 4, 3, 2),
            "chunk_size": 7,
            "D": torch.randn(4, generator=g),
            "seq_idx": _scan_packing(),
            "initial_state": torch.randn(2, 4, 3, generator=g),
            "return_final_state": True,
        },
    ]


def ssd_scan_cases() -> list[Case]:
    g = torch.Generator().manual_seed(4321)
    inputs = ssd.random_inputs
    return [
        {**inputs(g, 2, 37, 4, 8, 1, 8), "chunk_size": 16},
        {
            **inputs(g, 2, 37, 4, 8, 2, 8),
            "chunk_size": 8,
            "D": torch.randn(4, generator=g),
            "initial_state": torch.randn(2, 4, 8, 8, generator=g),
            "return_final_state": True,
        },
        {**inputs(g, 1, 5, 6, 3, 3, 4), "chunk_size": 64},  # L < chunk
        {
            **inputs(g, 2, 29, 4, 4, 2, 4),
            "chunk_size": 8,
            "seq_idx": _scan_packing(),
            "D": torch.randn(4, 4, generator=g),
            "return_final_state": True,
        },
    ]


def gated_rms_norm_cases() -> list[Case]:
    g = torch.Generator().manual_seed(2468)

    def case(shape: tuple[int, ...], group: int, gated: bool, before: bool) -> Case:
        return {
            "y": torch.randn(*shape, generator=g),
            "z": torch.randn(*shape, generator=g) * 3 if gated else None,
            "weight": 1 + 0.3 * torch.randn(shape[-1], generator=g),
            "group_size": group,
            "eps": 1e-5,
            "norm_before_gate": before,
        }

    return [
        case((2, 5, 24), 24, True, False),  # Mamba-2: gate before the norm
        case((3, 70), 35, True, True),  # Hydra: gate after; 70 = 64 + 6 lanes
        case((2, 3, 40), 8, True, False),  # groups of 8: partial vectors only
        case((37, 20), 5, False, False),  # no gate; rows past one unit of 32
    ]


PARITY_CASES: dict[str, Callable[[], list[Case]]] = {
    "attention": attention_cases,
    "causal_conv1d": causal_conv1d_cases,
    "centered_conv1d": centered_conv1d_cases,
    "fftconv": fftconv_cases,
    "gated_rms_norm": gated_rms_norm_cases,
    "selective_scan": selective_scan_cases,
    "ssd_scan": ssd_scan_cases,
}
