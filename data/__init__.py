"""Language-model data: byte-level BPE training (:mod:`mixstack.data.bpe`),
memory-mapped token shards (:mod:`mixstack.data.shards`), corpus sources with mixing
weights (:mod:`mixstack.data.corpus`) and tokenizers by path or Hub id
(:mod:`mixstack.data.tokenizer_ref`). See docs/data.md.

Nothing heavy is imported here: ``tokenizers`` and ``numpy`` load inside the functions
that use them (the ``data`` extra)."""
