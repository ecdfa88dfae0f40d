"""Peak memory of the n-gram layer per (B, L, L) entry of its match matrix.

Each measurement runs in a fresh subprocess: it builds an ``ngram`` layer, runs a small
warm-up call (so lazily allocated buffers and libraries are already resident), reads
the peak resident set size, runs the measured call, and reports the growth of the peak
divided by ``B·L²``. The measured call is a forward (no autograd) or a forward and
backward with respect to the input. Token ids come from ``--n-values`` values, so rows
have many matches.

For scale: the reference implementation stacks k int64 (B, L, L) masks (8·k bytes per
entry before any float copy); a dense float32 matrix alone is 4 bytes per entry.

Usage: ``python benchmarks/ngram_memory.py --batch 8 --length 2048 --match-len 3``
prints one line per mode. CPU only; one thread.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import json, resource, sys
import torch
torch.set_num_threads(1)
from mixstack.dsl.context import LayerContext
from mixstack.mixers.ngram import Ngram, NgramConfig

B, L, K, D, V, mode = json.loads(sys.argv[1])
layer = Ngram(NgramConfig(match_len=K), LayerContext(d_model=D, max_seq_len=L))
g = torch.Generator().manual_seed(0)
x = torch.randn(B, L, D, generator=g)
ids = torch.randint(0, V, (B, L), generator=g)
grad = mode == "fwd+bwd"

def call(x, ids):
    if grad:
        x = x.clone().requires_grad_()
        layer(x, input_ids=ids).square().sum().backward()
    else:
        with torch.no_grad():
            layer(x, input_ids=ids)

call(x[:, :64], ids[:, :64])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
call(x, ids)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"peak_growth": after - before}))
"""


def measure(batch: int, length: int, match_len: int, d_model: int, n_values: int, mode: str) -> int:
    args = json.dumps([batch, length, match_len, d_model, n_values, mode])
    run = subprocess.run(
        [sys.executable, "-c", CHILD, args], capture_output=True, text=True, check=True
    )
    return int(json.loads(run.stdout.strip().splitlines()[-1])["peak_growth"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--match-len", type=int, default=3)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--n-values", type=int, default=4, help="distinct token ids")
    args = parser.parse_args()
    entries = args.batch * args.length**2
    for mode in ("fwd", "fwd+bwd"):
        growth = measure(args.batch, args.length, args.match_len, args.d_model, args.n_values, mode)
        print(
            f"ngram k={args.match_len} B={args.batch} L={args.length} D={args.d_model} "
            f"{mode}: peak growth {growth / 2**20:.1f} MiB = {growth / entries:.3f} bytes per "
            f"(B, L, L) entry (k int64 masks: {8 * args.match_len} bytes per entry)"
        )


if __name__ == "__main__":
    main()
