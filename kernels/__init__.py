"""Shared compute with a reference, a torch fast path and optional accelerated backends."""
