"""`mixstack schema --out` writes a file with the mode of any other new file."""

from __future__ import annotations

import json
import os
import stat

from typer.testing import CliRunner

from mixstack.cli.main import app


def test_schema_out_file_is_not_owner_only(tmp_path) -> None:
    old = os.umask(0o022)
    try:
        probe = tmp_path / "probe"
        probe.write_text("")
        expected = stat.S_IMODE(probe.stat().st_mode)  # 0o666 less the umask
        out = tmp_path / "schema.json"
        result = CliRunner().invoke(app, ["schema", "--out", str(out)])
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(out.stat().st_mode) == expected == 0o644
    assert "properties" in json.loads(out.read_text())
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
