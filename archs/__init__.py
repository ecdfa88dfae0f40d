"""Whole models: causal LM, bidirectional encoder (MLM), sequence classifier."""
