"""One file per mixer; importing this package registers the built-in ones."""

from mixstack.mixers import attention, mamba2, mlp  # noqa: F401
