"""The documents of stdlib_next_line.yaml: next_line.json beside this file, as an
in-memory dataset (no download, no cache folder)."""

import json
from pathlib import Path
from typing import Any


def load(**kwargs: Any) -> Any:
    import datasets

    path = Path(__file__).parent / "next_line.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: run examples/lm_stdlib/make_corpus.py first")
    rows = json.loads(path.read_text(encoding="utf-8"))
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
