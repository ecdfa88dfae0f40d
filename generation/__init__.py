"""Text generation: ``generate()``, score processors, streaming and tokenizers.

``import mixstack.generation`` stays light (torch only); the ``tokenizers`` library is
imported when a ``tokenizer.json`` is loaded. ``mixstack.generation.generate`` is the
function (defined in :mod:`mixstack.generation.decoding`).
"""

from mixstack.generation.decoding import GenerationOutput, Streamer, TextStreamer, generate

__all__ = ["GenerationOutput", "Streamer", "TextStreamer", "generate"]
