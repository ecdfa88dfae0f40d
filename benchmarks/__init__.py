"""``mixstack bench`` (suites, references, reports) and the kernel-scaling scripts.

Shipped in the wheel so users can measure their own machine; reference libraries
(transformers, matplotlib) are imported inside the functions that use them.
"""
