"""Scaling of the SSM scan kernels with sequence length at a constant token count.

For each length L (512 ... 32k) the batch is ``B = tokens / L``, so a linear-time
kernel keeps a flat time, and a kernel with quadratic parts grows with L. Methods:

* ``ssd chunked``: the ``torch`` backend of ``ssd_scan`` (linear scan over chunks);
* ``ssd quadratic states``: ssd_minimal's quadratic inter-chunk state passing;
* ``ssd naive recurrence``: the ``reference`` backend, one step at a time (capped).

Forward and forward+backward are timed with interleaved repetitions (every method
and length once per round, then the next round) and reported as medians; peak memory
is measured in a separate pass (CUDA allocator peak on GPU; on CPU the peak of live
tensor storage tracked op by op, :class:`CpuPeakMemory`), counting only memory
allocated inside the measured call. Ratios: time relative to the same method at
``--base-length`` and relative to the chunked path at the same length.

Adding a kernel: write an input maker ``(args, batch, length, device) -> kwargs`` and
append :class:`Method` entries in :func:`methods`.

Usage: ``python -m mixstack.benchmarks.ssm --tokens 32768 --reps 3 --plot ssm_scaling.png``
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mixstack.benchmarks.common import MODES, argument_parser, loglog_modes, pyplot, save_figure
from mixstack.kernels import ssd

log = logging.getLogger("benchmarks.ssm")

InputMaker = Callable[[argparse.Namespace, int, int, torch.device], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Method:
    """One kernel variant: how to build its inputs and call it, and its length cap."""

    name: str
    make_inputs: InputMaker
    fn: Callable[..., Any]
    kwargs: dict[str, Any] = field(default_factory=dict)
    max_len: int | None = None


def ssd_inputs(
    args: argparse.Namespace, batch: int, length: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Random SSD inputs (B, L, H, P) etc. with gradients, in ``args.dtype``."""
    g = torch.Generator().manual_seed(length)
    dtype = getattr(torch, args.dtype)
    inputs = ssd.random_inputs(
        g, batch, length, args.heads, args.headdim, args.groups, args.d_state, dtype=dtype
    )
    return {k: v.to(device).requires_grad_(True) for k, v in inputs.items()}


def methods(args: argparse.Namespace) -> list[Method]:
    chunk = {"chunk_size": args.chunk}
    return [
        Method("ssd chunked", ssd_inputs, ssd.ssd_scan_chunked, chunk),
        Method(
            "ssd quadratic states",
            ssd_inputs,
            ssd.ssd_scan_chunked,
            {**chunk, "quadratic_states": True},
            max_len=args.quadratic_max,
        ),
        Method(
            "ssd naive recurrence",
            ssd_inputs,
            ssd.ssd_scan_reference,
            chunk,
            max_len=args.naive_max,
        ),
    ]


# -- measurement -------------------------------------------------------------------------------


def _run(method: Method, inputs: dict[str, torch.Tensor], mode: str) -> None:
    out = method.fn(**inputs, **method.kwargs)
    y = out[0] if isinstance(out, tuple) else out
    if mode == "fwd+bwd":
        torch.autograd.grad(y.float().sum(), list(inputs.values()))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(
    method: Method, inputs: dict[str, torch.Tensor], mode: str, device: torch.device
) -> float:
    """Seconds for one call (forward, or forward plus backward)."""
    _sync(device)
    start = time.perf_counter()
    if mode == "fwd":
        with torch.no_grad():
            _run(method, inputs, mode)
    else:
        _run(method, inputs, mode)
    _sync(device)
    return time.perf_counter() - start


class CpuPeakMemory(TorchDispatchMode):
    """Peak bytes of tensor storage allocated inside the ``with`` block (CPU).

    Every op output that does not alias an input (its schema says so) is a fresh
    storage: its bytes are added, and a finalizer on the storage object (PyTorch keeps
    one Python object per storage) subtracts them when the storage is freed, whether it
    was held by Python or saved for backward. Storages from before the block are not
    counted, so the figure is the extra memory one call needs.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        fresh = [r.alias_info is None for r in returns]
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        for is_fresh, t in zip(fresh, outputs, strict=False):
            if is_fresh and isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self._track(t.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        nbytes = storage.nbytes()
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, nbytes)

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes


def peak_memory(
    method: Method, inputs: dict[str, torch.Tensor], mode: str, device: torch.device
) -> int:
    """Peak bytes allocated during one call, above what was allocated before it."""
    grad = torch.enable_grad() if mode == "fwd+bwd" else torch.no_grad()
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        with grad:
            _run(method, inputs, mode)
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    with grad, CpuPeakMemory() as tracker:
        _run(method, inputs, mode)
    return tracker.peak


@dataclass
class Cell:
    """Measurements of one (method, length)."""

    batch: int
    times: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in MODES})
    peak: dict[str, int] = field(default_factory=dict)

    def median(self, mode: str) -> float:
        return statistics.median(self.times[mode])


def measure(args: argparse.Namespace, device: torch.device) -> dict[tuple[str, int], Cell]:
    """Warm-up, interleaved timing rounds, then one memory pass per cell."""
    plan = []
    for length in args.lengths:
        if args.tokens % length:
            raise SystemExit(f"--tokens {args.tokens} is not a multiple of length {length}")
        for method in methods(args):
            if method.max_len is None or length <= method.max_len:
                plan.append((method, length))
    cells: dict[tuple[str, int], Cell] = {}
    inputs = {}
    for method, length in plan:
        batch = args.tokens // length
        inputs[method.name, length] = method.make_inputs(args, batch, length, device)
        cells[method.name, length] = Cell(batch)
        for mode in MODES:  # warm-up
            time_once(method, inputs[method.name, length], mode, device)
    for rep in range(args.reps):
        log.info("round %d/%d", rep + 1, args.reps)
        for method, length in plan:
            for mode in MODES:
                seconds = time_once(method, inputs[method.name, length], mode, device)
                cells[method.name, length].times[mode].append(seconds)
    for method, length in plan:
        for mode in MODES:
            cells[method.name, length].peak[mode] = peak_memory(
                method, inputs[method.name, length], mode, device
            )
    return cells


# -- reporting ---------------------------------------------------------------------------------


def table(args: argparse.Namespace, cells: dict[tuple[str, int], Cell]) -> list[str]:
    """Rows of the results table, with ratios to the base length and to the fast path."""
    fast = methods(args)[0].name
    header = (
        f"{'method':<22}{'L':>7}{'B':>6}{'fwd ms':>10}{'f+b ms':>10}{'fwd MB':>9}"
        f"{'f+b MB':>9}{'fwd/base':>10}{'f+b/base':>10}{'f+b/fast':>10}"
    )
    rows = [header, "-" * len(header)]
    for method in methods(args):
        for length in args.lengths:
            cell = cells.get((method.name, length))
            if cell is None:
                continue
            base = cells.get((method.name, args.base_length))
            ref = cells.get((fast, length))
            fwd, both = cell.median("fwd"), cell.median("fwd+bwd")
            fwd_base = f"{fwd / base.median('fwd'):.2f}" if base else "-"
            both_base = f"{both / base.median('fwd+bwd'):.2f}" if base else "-"
            vs_fast = f"{both / ref.median('fwd+bwd'):.2f}" if ref else "-"
            rows.append(
                f"{method.name:<22}{length:>7}{cell.batch:>6}{fwd * 1e3:>10.1f}"
                f"{both * 1e3:>10.1f}{cell.peak['fwd'] / 2**20:>9.1f}"
                f"{cell.peak['fwd+bwd'] / 2**20:>9.1f}{fwd_base:>10}{both_base:>10}{vs_fast:>10}"
            )
    return rows


def acceptance(args: argparse.Namespace, cells: dict[tuple[str, int], Cell]) -> list[str]:
    """The issue-5 criterion: chunked SSD time(32k) / time(2k) <= 18 at constant B·L."""
    fast = methods(args)[0].name
    lo, hi = cells.get((fast, 2048)), cells.get((fast, 32768))
    if lo is None or hi is None:
        return ["acceptance: needs lengths 2048 and 32768 in --lengths"]
    out = []
    for mode in MODES:
        ratio = hi.median(mode) / lo.median(mode)
        verdict = "PASS" if ratio <= 18 else "FAIL"
        out.append(
            f"acceptance ({mode}): ssd chunked time(32k)/time(2k) = {ratio:.2f} "
            f"(target <= 18): {verdict}"
        )
    return out


def plot(args: argparse.Namespace, cells: dict[tuple[str, int], Cell], path: str) -> None:
    """Log-log time vs length, one colour per method, solid fwd / dashed fwd+bwd."""
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    for i, method in enumerate(methods(args)):
        lengths = [n for n in args.lengths if (method.name, n) in cells]
        loglog_modes(ax, lengths, [cells[method.name, n] for n in lengths], i, method.name)
    ax.set_xlabel(f"sequence length L (B·L = {args.tokens} tokens)")
    ax.set_ylabel("median time per call [s]")
    ax.set_title(
        f"SSD scan, H={args.heads} P={args.headdim} N={args.d_state} "
        f"G={args.groups} chunk={args.chunk}, {args.device}"
    )
    save_figure(fig, (ax,), path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argument_parser(__doc__)
    p.add_argument("--tokens", type=int, default=32768, help="B·L, constant across lengths")
    p.add_argument(
        "--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384, 32768]
    )
    p.add_argument("--base-length", type=int, default=2048, help="length the ratios refer to")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--headdim", type=int, default=32)
    p.add_argument("--d-state", type=int, default=32)
    p.add_argument("--groups", type=int, default=1)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--naive-max", type=int, default=4096, help="longest L for the recurrence")
    p.add_argument(
        "--quadratic-max",
        type=int,
        default=None,
        help="longest L for the quadratic-states variant (default: no cap)",
    )
    p.add_argument("--reps", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--plot", default="ssm_scaling.png", help="PNG path ('' to skip)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    log.info(
        "SSD scan scaling: B·L = %d, H=%d P=%d N=%d G=%d chunk=%d, %s, %s, %d threads",
        args.tokens,
        args.heads,
        args.headdim,
        args.d_state,
        args.groups,
        args.chunk,
        args.dtype,
        device,
        torch.get_num_threads(),
    )
    cells = measure(args, device)
    for line in [*table(args, cells), "", *acceptance(args, cells)]:
        log.info("%s", line)
    if args.plot:
        plot(args, cells, args.plot)
        log.info("plot: %s", args.plot)


if __name__ == "__main__":
    main()
