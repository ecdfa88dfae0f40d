"""Save the example's model as it is before training, for the "before" numbers.

Builds ``lm.yaml``'s model with the run's seed (``train.seed``: the weights training
starts from) and writes it as a model directory, with the example's tokenizer stored in
it, so ``mixstack eval`` and ``mixstack lm-eval`` read it like the trained one.

    python examples/lm_stdlib/init_model.py [--out runs/lm_stdlib/init]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import mixstack
from mixstack.hub.modeldir import save_model_dir

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/lm_stdlib/init"))
    parser.add_argument("--tokenizer", type=Path, default=Path("runs/lm_stdlib/tok"))
    args = parser.parse_args()
    spec = mixstack.load_spec(str(HERE / "lm.yaml"))
    assert spec.train is not None
    model = mixstack.build(spec.model, seed=spec.train.seed)
    # stored with its sha256 in config.json, as training stores it
    save_model_dir(model, args.out, tokenizer=args.tokenizer / "tokenizer.json")
    print(f"untrained model (seed {spec.train.seed}) -> {args.out}")


if __name__ == "__main__":
    main()
