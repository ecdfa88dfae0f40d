"""The `mixstack` command."""
