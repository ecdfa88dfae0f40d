"""References into docs/ resolve: every ``docs/<page>.md#anchor`` named in the code, the
README or the docs themselves exists as a page with that heading, and every relative
link of the docs and the README points at a file of the checkout."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
# `docs/math.md#mamba-2`, and the short form `#hydra` that continues a list after it
REFERENCE = re.compile(r"docs/([\w-]+\.md)((?:#[\w-]+)?(?:, #[\w-]+)*)")
SKIPPED = {"build", "dist", "__pycache__", "mixstack.egg-info"}
LINK = re.compile(r"\]\(([^)#\s]*)(#[\w-]*)?\)")


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    out = set()
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def checkout_text_files() -> list[Path]:
    """Sources, docs and configs of the checkout (no virtual env, build or hidden folder)."""
    out = []
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [d for d in subfolders if not d.startswith(".") and d not in SKIPPED]
        out += [Path(folder, f) for f in files if f.endswith((".py", ".md", ".yaml", ".toml"))]
    return out


def test_every_docs_reference_names_an_existing_heading() -> None:
    problems = []
    for path in checkout_text_files():
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for page, tail in REFERENCE.findall(line):
                target = DOCS / page
                if not target.is_file():
                    problems.append(f"{path.relative_to(ROOT)}:{n}: no page docs/{page}")
                    continue
                for anchor in re.findall(r"#([\w-]+)", tail):
                    if anchor not in anchors(target):
                        problems.append(f"{path.relative_to(ROOT)}:{n}: no #{anchor} in {page}")
    assert not problems, "\n".join(problems)


def test_no_reference_to_a_math_file_outside_the_repository() -> None:
    stale = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in checkout_text_files()
        if path.name != "test_docs.py"
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"MATH(\.md)? ?§|`MATH\.md`", line)
    ]
    assert not stale, f"point these at docs/math.md: {stale}"


def test_relative_links_of_the_docs_and_readme_resolve() -> None:
    problems = []
    for page in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        for target, anchor in LINK.findall(page.read_text(encoding="utf-8")):
            if target.startswith(("http://", "https://")):
                continue
            resolved = (page.parent / target).resolve() if target else page
            if not resolved.exists():
                problems.append(f"{page.name}: {target} does not exist")
            elif anchor and resolved.suffix == ".md" and anchor[1:] not in anchors(resolved):
                problems.append(f"{page.name}: {target}{anchor} names no heading")
    assert not problems, "\n".join(problems)
