"""``python -m mixstack.ablate.worker OUT --worker K``: one local worker of `grid run`."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mixstack.ablate.worker")
    parser.add_argument("out")
    parser.add_argument("--worker", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    parser.add_argument("--hub-endpoint", default=None, help="Hub URL for run.hub pushes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from mixstack.ablate.runner import work
    from mixstack.cli.main import _quiet_lightning

    _quiet_lightning()
    ran = work(args.out, args.worker, args.hub_endpoint, args.threads or None)
    print(f"worker {args.worker}: ran {ran} point(s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
