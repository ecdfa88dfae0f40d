"""The data of memorised.yaml: memorised.json beside this file, as an in-memory dataset
(no download, no cache folder)."""

import json
from pathlib import Path
from typing import Any


def load(**kwargs: Any) -> Any:
    import datasets

    rows = json.loads((Path(__file__).parent / "memorised.json").read_text(encoding="utf-8"))
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
