"""Text generation: ``generate()``, sampling processors, streaming and tokenizers.

``import mixstack.generation`` stays light (torch only); the ``tokenizers`` library is
imported when a ``tokenizer.json`` is loaded.
"""
