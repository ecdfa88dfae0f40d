"""Default symbol bindings: what an unbound symbol in a pattern means.

The one table of defaults (DESIGN §3). A spec may rebind any of them; a symbol that
is neither bound nor listed here is an error at load.
"""

from __future__ import annotations

from typing import Any

from mixstack.dsl import registry

DEFAULT_SYMBOLS: dict[str, dict[str, Any]] = {
    "M": {"type": "mamba2"},  # Megatron hybrid convention
    "*": {"type": "attention"},
    "-": {"type": "mlp"},
}

registry.set_default_bindings(DEFAULT_SYMBOLS)
