"""`import mixstack` + load + build + forward must not pull the heavy optional stacks."""

from __future__ import annotations

import json
import subprocess
import sys

# the core's heavy dependencies, then the optional extras (interop, data, eval, cluster)
HEAVY = ("lightning", "pytorch_lightning", "huggingface_hub", "matplotlib")
HEAVY += ("transformers", "tokenizers", "datasets", "lm_eval", "submitit")

SCRIPT = """
import json, sys
import torch
import mixstack
spec = mixstack.load_spec({"model": {
    "vocab_size": 16, "max_seq_len": 16, "d_model": 16,
    "layers": {"pattern": "*-", "symbols": {"*": {"type": "attention", "n_heads": 2},
                                            "-": {"type": "mlp", "hidden": 32}}}}})
model = mixstack.build(spec, seed=0)
logits = model(torch.zeros(1, 4, dtype=torch.long))
mixstack.build(spec, device="meta").report(16)
heavy = [name for name in %r if name in sys.modules]
print(json.dumps({"heavy": heavy, "shape": list(logits.shape)}))
"""


def test_import_build_and_forward_stay_light() -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT % (HEAVY,)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"heavy": [], "shape": [1, 4, 20]}


def test_the_cli_module_stays_light() -> None:
    code = f"import sys, mixstack.cli.main; print([n for n in {HEAVY!r} if n in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
