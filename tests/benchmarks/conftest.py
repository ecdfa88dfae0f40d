"""transformers inside pytest: the checkout root is on ``sys.path`` (tests import
``tests.…``), where our ``kernels/`` folder shadows Hugging Face's ``kernels`` package,
which transformers imports when that distribution is installed. Import transformers'
model modules once with the checkout root hidden, so the real package is the one
cached in ``sys.modules``; installed mixstack never has this problem (it is
``mixstack.kernels`` there)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _shadows(entry: str) -> bool:
    try:
        return Path(entry or ".").resolve() == ROOT
    except OSError:
        return False


saved = list(sys.path)
sys.path[:] = [p for p in sys.path if not _shadows(p)]
try:
    with contextlib.suppress(ImportError):
        import transformers.integrations.hub_kernels
        import transformers.models.llama.modeling_llama
        import transformers.models.mamba.modeling_mamba
        import transformers.models.mamba2.modeling_mamba2  # noqa: F401
finally:
    sys.path[:] = saved
