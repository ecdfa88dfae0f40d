"""transformers' model modules imported once with the checkout root hidden from
``sys.path`` (see tests/support/hf_transformers.py), before the benchmark tests import
``mixstack.benchmarks.references``."""

from tests.support.hf_transformers import import_transformers

import_transformers()
