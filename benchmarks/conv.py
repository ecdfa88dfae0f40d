"""Long convolutions: ``fftconv`` against a plain ``torch.fft`` one-liner and direct convolution.

All methods compute the same thing, the causal depthwise convolution of ``u (B, D, L)``
with a kernel ``k (D, K)``, ``y_t = Σ_j k_j · u_{t−j}``:

* ``fftconv``: the ``torch`` backend of :mod:`mixstack.kernels.fftconv` (FFT size padded
  to the next 2^a·3^b·5^c at or above L + K − 1);
* ``plain fft``: ``irfft(rfft(u, n=2L) · rfft(k, n=2L), n=2L)[..., :L]``, the one-line
  reference of safari and docs/math.md#long-convolution (same math, always 2L);
* ``direct``: ``F.conv1d`` (depthwise, left padding K − 1, flipped kernel): O(L·K).

Three measurements:

1. **Long kernels** (K = L, the long-convolution case), L from 1k to 64k, direct capped
   at ``--direct-max`` (16k): forward and forward+backward medians over interleaved
   rounds (every method and length once per round; each measurement repeats the call
   until it lasts ``--min-time``), and the ratios plain/fftconv and direct/fftconv
   (> 1: fftconv is faster; the median of per-round ratios).
2. **Short kernels**: at ``--sweep-length`` tokens, kernel lengths 2 … 2048, all three
   methods (fftconv pads to a fast size near L + K, the one-liner always to 2L); the
   *crossover* is the shortest kernel from which fftconv is faster for every
   longer kernel measured (for a fixed short kernel, direct convolution is O(L·K) and
   the FFT O(L log L), so the crossover is a kernel length, roughly independent of L).
3. **bf16 error**: fftconv on bf16 inputs (computed in fp32, returned in bf16) against
   fp64 on the same bf16-rounded inputs: relative L2 error and the bf16 unit roundoff
   (2^-8) for scale; fp32 inputs for comparison.

Usage: ``python -m mixstack.benchmarks.conv --out bench_conv`` writes ``conv.md`` (the tables) and
``conv.png`` (the plot) there. One thread by default (``--threads``): on a shared
machine it keeps timings stable, and all methods get the same.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from mixstack.benchmarks.common import MODES, argument_parser, loglog_modes, pyplot, save_figure
from mixstack.kernels.fftconv import fftconv_reference, fftconv_torch

log = logging.getLogger("benchmarks.conv")
Conv = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def plain_fft(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The one-line reference: FFT size 2L, kernel zero-padded, first L outputs."""
    L = u.shape[-1]
    return torch.fft.irfft(torch.fft.rfft(u, n=2 * L) * torch.fft.rfft(k, n=2 * L), n=2 * L)[
        ..., :L
    ]


def direct(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Depthwise ``F.conv1d`` (a cross-correlation, hence the flipped kernel)."""
    K = k.shape[-1]
    return F.conv1d(F.pad(u, (K - 1, 0)), k.flip(-1)[:, None, :], groups=u.shape[1])


METHODS: dict[str, Conv] = {"fftconv": fftconv_torch, "plain fft": plain_fft, "direct": direct}


# -- timing ---------------------------------------------------------------------------------------


def inputs(args: argparse.Namespace, length: int, taps: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(length * 7919 + taps)
    u = torch.randn(args.batch, args.channels, length, generator=g)
    k = torch.randn(args.channels, taps, generator=g) / taps**0.5
    return u.requires_grad_(), k.requires_grad_()


def time_once(fn: Conv, u: torch.Tensor, k: torch.Tensor, mode: str, calls: int = 1) -> float:
    """Seconds per call, averaged over ``calls`` back-to-back forwards (no autograd graph)
    or forwards + backwards."""
    start = time.perf_counter()
    for _ in range(calls):
        if mode == "fwd":
            with torch.no_grad():
                fn(u, k)
        else:
            y = fn(u, k)
            torch.autograd.grad(y, (u, k), torch.ones_like(y))
    return (time.perf_counter() - start) / calls


@dataclass
class Cell:
    """Per mode: calls per measurement (so one lasts >= --min-time) and the measurements."""

    calls: dict[str, int] = field(default_factory=dict)
    times: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in MODES})

    def median(self, mode: str) -> float:
        return statistics.median(self.times[mode])


def measure(
    args: argparse.Namespace, plan: list[tuple[str, int, int]], modes: tuple[str, ...]
) -> dict[tuple[str, int, int], Cell]:
    """plan: (method, L, K). A warm-up call calibrates the calls per measurement, then
    ``--reps`` interleaved rounds (every cell once per round); medians over the rounds."""
    data = {(L, K): inputs(args, L, K) for _, L, K in plan}
    cells = {key: Cell() for key in plan}
    for name, L, K in plan:
        for mode in modes:
            time_once(METHODS[name], *data[L, K], mode)
            once = time_once(METHODS[name], *data[L, K], mode)
            cells[name, L, K].calls[mode] = max(1, math.ceil(args.min_time / max(once, 1e-9)))
    for rep in range(args.reps):
        log.info("  round %d/%d", rep + 1, args.reps)
        for name, L, K in plan:
            cell = cells[name, L, K]
            for mode in modes:
                seconds = time_once(METHODS[name], *data[L, K], mode, cell.calls[mode])
                cell.times[mode].append(seconds)
    return cells


# -- the three parts ------------------------------------------------------------------------------


def paired_ratio(cells: dict, other: str, L: int, K: int, mode: str) -> float | None:
    """Median over rounds of time(other) / time(fftconv), both measured in the same round
    (back to back), which cancels most of the drift of a shared machine's load."""
    if (other, L, K) not in cells:
        return None
    mine, theirs = cells["fftconv", L, K].times[mode], cells[other, L, K].times[mode]
    return statistics.median(b / a for a, b in zip(mine, theirs, strict=True))


def _ratio(cells: dict, other: str, L: int, K: int, mode: str) -> str:
    ratio = paired_ratio(cells, other, L, K, mode)
    return "-" if ratio is None else f"{ratio:.2f}x"


def long_kernels(args: argparse.Namespace) -> tuple[list[str], dict]:
    """K = L for every length; direct convolution only up to --direct-max."""
    plan = [
        (m, L, L) for L in args.lengths for m in METHODS if m != "direct" or args.direct_max >= L
    ]
    cells = measure(args, plan, MODES)
    rows = [
        "| L | fftconv fwd ms | plain fwd ms | direct fwd ms | fftconv f+b ms | plain f+b ms "
        "| direct f+b ms | plain/fftconv fwd | plain/fftconv f+b | direct/fftconv f+b |",
        "|" + "---|" * 10,
    ]
    for L in args.lengths:
        ms = {
            (m, mode): cells[m, L, L].median(mode) * 1e3
            for m in METHODS
            if (m, L, L) in cells
            for mode in MODES
        }
        times = [
            f"{ms[m, mode]:.2f}" if (m, mode) in ms else "-" for mode in MODES for m in METHODS
        ]
        ratios = [
            _ratio(cells, "plain fft", L, L, "fwd"),
            _ratio(cells, "plain fft", L, L, "fwd+bwd"),
            _ratio(cells, "direct", L, L, "fwd+bwd"),
        ]
        rows.append("| " + " | ".join([str(L), *times, *ratios]) + " |")
    return rows, cells


def crossover(args: argparse.Namespace) -> tuple[list[str], dict, dict[str, int | None]]:
    """Kernel sweep at --sweep-length: all three methods; the plain one-liner always pads
    to 2L, fftconv to the next fast size above L + K − 1."""
    L = args.sweep_length
    plan = [(m, L, K) for K in args.sweep_kernels for m in METHODS]
    cells = measure(args, plan, MODES)
    rows = [
        f"| K (L = {L}) | fftconv fwd ms | plain fwd ms | direct fwd ms | fftconv f+b ms "
        "| plain f+b ms | direct f+b ms | plain/fftconv fwd | direct/fftconv fwd |",
        "|" + "---|" * 9,
    ]
    for K in args.sweep_kernels:
        ms = {(m, mode): cells[m, L, K].median(mode) * 1e3 for m in METHODS for mode in MODES}
        rows.append(
            f"| {K} | {ms['fftconv', 'fwd']:.3f} | {ms['plain fft', 'fwd']:.3f} "
            f"| {ms['direct', 'fwd']:.3f} | {ms['fftconv', 'fwd+bwd']:.3f} "
            f"| {ms['plain fft', 'fwd+bwd']:.3f} | {ms['direct', 'fwd+bwd']:.3f} "
            f"| {_ratio(cells, 'plain fft', L, K, 'fwd')} "
            f"| {_ratio(cells, 'direct', L, K, 'fwd')} |"
        )
    found: dict[str, int | None] = {}
    for mode in MODES:
        faster = [
            (paired_ratio(cells, "direct", L, K, mode) or 0.0) > 1.0 for K in args.sweep_kernels
        ]
        found[mode] = next((K for i, K in enumerate(args.sweep_kernels) if all(faster[i:])), None)
    return rows, cells, found


def bf16_error(args: argparse.Namespace) -> tuple[list[str], dict[int, float]]:
    """Relative L2 error of fftconv in bf16 and fp32 against fp64, per length (K = L)."""
    rows = ["| L | bf16 rel. error | fp32 rel. error |", "|---|---|---|"]
    errors = {}
    for L in args.lengths:
        u, k = (t.detach() for t in inputs(args, L, L))
        out = {}
        for dtype in (torch.bfloat16, torch.float32):
            ul, kl = u.to(dtype), k.to(dtype)
            want = fftconv_torch(ul.double(), kl.double())
            got = fftconv_torch(ul, kl).double()
            out[dtype] = ((got - want).norm() / want.norm()).item()
        errors[L] = out[torch.bfloat16]
        rows.append(f"| {L} | {out[torch.bfloat16]:.2e} | {out[torch.float32]:.2e} |")
    rows.append(f"(bf16 unit roundoff 2^-8 = {2**-8:.2e}; the output is rounded to bf16)")
    return rows, errors


def sanity(args: argparse.Namespace) -> None:
    """The three methods agree with the reference backend before anything is timed."""
    u, k = (t.detach().double() for t in inputs(args, 300, 300))
    want = fftconv_reference(u, k)
    for name, fn in METHODS.items():
        err = (fn(u, k) - want).abs().max().item()
        if err > 1e-9:
            raise SystemExit(f"{name} disagrees with the reference by {err:.3g}")


# -- plot and entry point -------------------------------------------------------------------------


def plot(args: argparse.Namespace, long_cells: dict, short_cells: dict, path: Path) -> None:
    """Left: time vs L for K = L. Right: time vs K at --sweep-length (crossover)."""
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(12, 4.5))
    for i, name in enumerate(METHODS):
        Ls = [L for L in args.lengths if (name, L, L) in long_cells]
        loglog_modes(left, Ls, [long_cells[name, L, L] for L in Ls], i, name)
        L = args.sweep_length
        Ks = [K for K in args.sweep_kernels if (name, L, K) in short_cells]
        if Ks:
            loglog_modes(right, Ks, [short_cells[name, L, K] for K in Ks], i, name)
    left.set(
        xlabel="sequence length L (kernel K = L)",
        ylabel="median time [s]",
        title=f"long kernels, B={args.batch} D={args.channels}",
    )
    right.set(
        xlabel=f"kernel length K (L = {args.sweep_length})",
        ylabel="median time [s]",
        title="short kernels: FFT vs direct",
    )
    save_figure(fig, (left, right), path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argument_parser(__doc__)
    p.add_argument(
        "--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768, 65536]
    )
    p.add_argument("--direct-max", type=int, default=16384, help="longest L for direct conv")
    p.add_argument("--sweep-length", type=int, default=8192, help="L of the kernel sweep")
    p.add_argument(
        "--sweep-kernels",
        type=int,
        nargs="+",
        default=[2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048],
    )
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--channels", type=int, default=32, help="D, convolved independently")
    p.add_argument("--reps", type=int, default=7, help="interleaved timing rounds")
    p.add_argument("--min-time", type=float, default=0.02, help="seconds of calls per measurement")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--out", default="", help="folder for conv.md and conv.png ('' = log only)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    log.info(
        "conv benchmark: B=%d D=%d fp32, %d thread(s), %d rounds",
        args.batch,
        args.channels,
        torch.get_num_threads(),
        args.reps,
    )
    sanity(args)
    log.info("long kernels (K = L) ...")
    long_rows, long_cells = long_kernels(args)
    log.info("kernel sweep at L = %d ...", args.sweep_length)
    short_rows, short_cells, cross = crossover(args)
    err_rows, _ = bf16_error(args)
    cross_rows = [
        f"crossover ({mode}): fftconv beats direct from K = {cross[mode]} on "
        f"(L = {args.sweep_length})"
        if cross[mode]
        else f"crossover ({mode}): direct stays faster up to K = {args.sweep_kernels[-1]}"
        for mode in MODES
    ]
    report = [
        "## long kernels",
        *long_rows,
        "",
        "## short kernels",
        *short_rows,
        "",
        *cross_rows,
        "",
        "## bf16 error (fftconv vs fp64, K = L)",
        *err_rows,
    ]
    for line in report:
        log.info("%s", line)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "conv.md").write_text("\n".join(report) + "\n")
        plot(args, long_cells, short_cells, out / "conv.png")
        log.info("wrote %s and %s", out / "conv.md", out / "conv.png")


if __name__ == "__main__":
    main()
