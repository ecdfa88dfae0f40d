"""Residual blocks, norms, embeddings, RoPE and composites."""
