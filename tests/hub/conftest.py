"""The local Hub server fixture (tests/hub/hubserver.py), with huggingface_hub isolated
from the machine: no token from the environment or a login file, its own cache, and
Xet switched off so uploads take the plain LFS path the server implements."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

TOKEN = "hf_FAKEmixstackTOKEN0123456789secret"  # recognisable: must never appear anywhere
OTHER_TOKEN = "hf_FAKEotherUSERtoken9876543210"


def _load_server_module() -> Any:
    name = "mixstack_tests_hubserver"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, Path(__file__).with_name("hubserver.py")
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    import huggingface_hub.constants as constants

    # huggingface_hub decides per call (utils._runtime.is_xet_available reads this
    # constant), so patching it sends uploads through preupload + LFS batch + PUT.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    server_module = _load_server_module()
    with server_module.HubServer({TOKEN: "me", OTHER_TOKEN: "other"}) as server:
        server.token = TOKEN
        server.other_token = OTHER_TOKEN
        server.cache = tmp_path / "hf-cache"
        yield server
