"""Language-model data: byte-level BPE training (:mod:`mixstack.data.bpe`) and
memory-mapped token shards (:mod:`mixstack.data.shards`). See docs/data.md.

Nothing heavy is imported here: ``tokenizers`` and ``numpy`` load inside the functions
that use them (the ``data`` extra)."""
