"""One file per mixer; importing this package registers the built-in ones."""

from mixstack.mixers import attention, mlp  # noqa: F401
