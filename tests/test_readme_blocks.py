"""Every shell and Python block of README.md runs as written on a CPU.

The README's ```bash and ```python blocks are extracted and run in groups (each shell
block starts one, named after its heading; a Python block joins the group before it in
its section, whose files it reads), each group in a fresh temporary
directory that stands for the repository root: ``examples/`` is linked into it, and
the ```yaml blocks whose first line names a file (``# my_arch.yaml``, or
``# my_arch.yaml (continued)`` to append) are written there first. ``mixstack`` in a
shell line is ``python -m mixstack`` with this interpreter and the checkout on
``PYTHONPATH``; the Hub is offline. Each block must exit 0.

A line that cannot run on a CPU machine without an account or the network ends with a
visible marker, ``# needs: REASON (...)``; the test leaves out exactly those lines
(not a pytest skip) and checks that each reason is one of :data:`REASONS`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mixstack
from mixstack.dsl import registry

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# the directory that makes ``import mixstack`` find this checkout (not resolved: the
# package directory may be a link named mixstack)
IMPORT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(mixstack.__file__)))

REASONS = {
    "gpu": "needs a CUDA GPU",
    "network": "downloads packages",
    "hub": "needs the Hugging Face Hub (an account, the network)",
    "long": "takes more than a few minutes on a CPU",
}
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.DOTALL | re.MULTILINE)
HEADING = re.compile(r"^#{2,3} (.+)$", re.MULTILINE)
MARKER = re.compile(r"#\s*needs:\s*(.*)$")
FILE_HEADER = re.compile(r"^# ([\w./-]+\.ya?ml)( \(continued\))?$")


def blocks() -> list[tuple[str, str, str]]:
    """(section heading, language, body) of every fenced block, in order."""
    text = README.read_text(encoding="utf-8")
    headings = [(m.start(), m.group(1).strip()) for m in HEADING.finditer(text)]
    found = []
    for m in FENCE.finditer(text):
        section = [h for pos, h in headings if pos < m.start()]
        found.append((section[-1] if section else "", m.group(1), m.group(2)))
    return found


def marker_reasons(line: str) -> list[str] | None:
    """The reasons of a ``# needs:`` marker (None: the line has none)."""
    m = MARKER.search(line)
    if m is None:
        return None
    # "gpu (8 GPUs)", "network (...), long (...)": the words before each explanation
    without_notes = re.sub(r"\([^)]*\)", "", m.group(1))
    return [r.strip() for r in without_notes.split(",") if r.strip()]


def runnable(body: str, lang: str) -> str:
    """The block with its marked lines left out: a no-op in their place (``pass`` at the
    same indentation in Python, ``:`` in bash) keeps line numbers and blocks intact."""
    out = []
    for line in body.splitlines():
        if marker_reasons(line) is None:
            out.append(line)
        elif lang == "python":
            out.append(line[: len(line) - len(line.lstrip())] + "pass")
        else:
            out.append(":")
    return "\n".join(out) + "\n"


def units() -> dict[str, list[tuple[str, str]]]:
    """The runnable blocks grouped into tests: each shell block starts a group (named
    after its section, numbered from the second on), and a Python block joins the
    section's group before it, whose files it reads (or starts one of its own)."""
    groups: dict[str, list[tuple[str, str]]] = {}
    last: tuple[str, str] | None = None  # (section, group name)
    for section, lang, body in blocks():
        if lang not in ("bash", "python"):
            continue
        if lang == "python" and last is not None and last[0] == section:
            groups[last[1]].append((lang, body))
            continue
        n = sum(1 for g in groups if g == section or g.startswith(section + " #"))
        name = section if n == 0 else f"{section} #{n + 1}"
        groups[name] = [(lang, body)]
        last = (section, name)
    return groups


def write_files(tmp: Path) -> None:
    """The named YAML blocks as files; ``examples/`` linked in."""
    (tmp / "examples").symlink_to(ROOT / "examples", target_is_directory=True)
    for _, lang, body in blocks():
        header = FILE_HEADER.match(body.splitlines()[0]) if lang == "yaml" else None
        if header is not None:
            with open(tmp / header.group(1), "a" if header.group(2) else "w") as f:
                f.write(body)


def run_bash(body: str, cwd: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": IMPORT_ROOT,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(cwd / ".hf"),
    }
    script = f'set -euo pipefail\nmixstack() {{ "{sys.executable}" -m mixstack "$@"; }}\n{body}'
    proc = subprocess.run(
        ["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, (
        f"README block failed (exit {proc.returncode}):\n{body}\n"
        f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    )


def test_markers_name_known_reasons() -> None:
    """Every ``# needs:`` marker names reasons from the known set, and the lines that
    need a GPU are the multi-GPU ones (the README's own ``run:`` runs on the CPU)."""
    marked = []
    for _, lang, body in blocks():
        for line in body.splitlines():
            reasons = marker_reasons(line)
            if reasons is not None:
                unknown = [r for r in reasons if r not in REASONS]
                assert reasons and not unknown, f"unknown reason {unknown} in: {line}"
                marked.append((lang, line, reasons))
    assert any("gpu" in r and "strategy=ddp" in line for _, line, r in marked)
    # a plain `needs:` without the leading `#` would run; check none slipped through
    text = README.read_text(encoding="utf-8")
    assert len(re.findall(r"needs:", text)) == len(marked) + text.count("`# needs:")


def test_marked_lines_and_only_they_are_left_out() -> None:
    """The filter itself: marked lines become no-ops, every other line stays as written."""
    assert marker_reasons("make test  # needs: network (pip), long (the suite)") == [
        "network",
        "long",
    ]
    assert marker_reasons("mixstack eval runs/x  # the metrics") is None
    bash = "mixstack a\nmixstack b  # needs: gpu (8 GPUs)\nmixstack c\n"
    assert runnable(bash, "bash") == "mixstack a\n:\nmixstack c\n"
    python = "if x:\n    y = f()  # needs: hub\nz = 1\n"
    assert runnable(python, "python") == "if x:\n    pass\nz = 1\n"


def test_yaml_blocks_name_their_file() -> None:
    """The spec the Python and shell blocks use is the README's, as written."""
    names = []
    for _, lang, body in blocks():
        if lang == "yaml":
            header = FILE_HEADER.match(body.splitlines()[0])
            assert header is not None, f"a yaml block without a '# FILE.yaml' line:\n{body}"
            names.append(header.group(1))
    assert names.count("my_arch.yaml") >= 2


def test_ratio_sentence_matches_the_allocator() -> None:
    """The README's worked ratio example: 56 sub-layers, 4 attention, 28 MLP, 24 Mamba-2."""
    text = README.read_text(encoding="utf-8")
    assert "4 attention, 28 MLP and 24\nMamba-2 sub-layers" in text
    spec = mixstack.load_spec(
        {
            "model": {
                "vocab_size": 256,
                "d_model": 64,
                "layers": {
                    "n_layers": 56,
                    "ratios": {"*": 0.08, "-": 0.5},
                    "fill": "M",
                    "symbols": {
                        "*": {"type": "attention"},
                        "-": {"type": "mlp"},
                        "M": {"type": "mamba2"},
                    },
                },
            }
        }
    )
    pattern = spec.model.layers.pattern
    assert (len(pattern), pattern.count("*"), pattern.count("-"), pattern.count("M")) == (
        56,
        4,
        28,
        24,
    )


@pytest.mark.slow(budget_s=90)
@pytest.mark.parametrize("unit", list(units()))
def test_readme_blocks_run(unit: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The blocks of one group run in order in a fresh directory; every command exits 0."""
    write_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__readme__"}
    with registry.scoped():
        for lang, body in units()[unit]:
            if lang == "bash":
                run_bash(runnable(body, "bash"), tmp_path)
            elif lang == "python":
                exec(compile(runnable(body, "python"), f"README.md ({unit})", "exec"), namespace)
