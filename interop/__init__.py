"""Foreign formats (DESIGN §11 "Formats"; docs/interop.md).

:mod:`mixstack.interop.transformers` reads and writes transformers-format checkpoints
(``config.json`` with a ``model_type`` + safetensors) of the families ``llama``,
``mamba``, ``mamba2``, ``bamba`` and ``nemotron_h``: the configuration becomes a readable
spec (the pattern a person would write), the weights get our state-dict keys, and
whatever the mapping cannot express is refused with every such field named at once.
:mod:`mixstack.interop.export` turns a run directory or a model directory into a model
directory (``--to mixstack``) or a transformers checkpoint (``--to transformers``).
:mod:`mixstack.interop.lm_eval` scores a model directory for lm-evaluation-harness
(``mixstack lm-eval``; lm_eval is imported by its functions only).

Nothing here imports ``transformers``: both directions read and write the files
themselves, so the optional extra is needed only by the tests that compare with it.
"""

from __future__ import annotations

from mixstack.interop.export import convert, export, load_source
from mixstack.interop.transformers import (
    FAMILIES,
    export_transformers,
    is_transformers_dir,
    load_transformers,
    spec_from_transformers_config,
    transformers_config_of,
)

__all__ = [
    "FAMILIES",
    "convert",
    "export",
    "export_transformers",
    "is_transformers_dir",
    "load_source",
    "load_transformers",
    "spec_from_transformers_config",
    "transformers_config_of",
]
