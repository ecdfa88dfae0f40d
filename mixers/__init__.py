"""One file per mixer; importing this package registers the built-in ones."""

from mixstack.mixers import (  # noqa: F401
    attention,
    hydra,
    hyena,
    long_conv,
    mamba,
    mamba2,
    mlp,
    orchid,
    s4d,
)
