"""Make the lm_stdlib example's data from the Python standard library's own sources.

Every Python install has them (``sysconfig.get_paths()["stdlib"]``), so the example
needs no download. The top-level ``*.py`` modules, in name order, are split by position:
every 8th module is held out, the others train (up to ``--train-kb``). Writes, under
``--out`` (default ``runs/lm_stdlib``, the folder the example's specs name):

- ``train.txt``: the training modules, one after another (a blank line between);
- ``heldout.txt``: the held-out modules (up to ``--heldout-kb``), for bits per byte;
- ``tasks/``: a local lm-eval task, ``stdlib_next_line`` (four-way multiple choice):
  six lines of a held-out module, then its next line against three re-orderings of
  that line's words (same characters, same length: chance 0.25, and no length bias).

The numbers depend on the Python version (its stdlib is the corpus): the run reports it.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONTEXT_LINES = 6


def modules() -> list[Path]:
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):  # a few test modules are not UTF-8
        return None


def take(texts: list[str], budget_kb: int) -> list[str]:
    out, size = [], 0
    for text in texts:
        if size >= budget_kb * 1024:
            break
        out.append(text)
        size += len(text.encode("utf-8"))
    return out


def shuffled(line: str, rng: random.Random, k: int) -> list[str] | None:
    """``k`` distinct re-orderings of the words of ``line`` (indentation kept, each unlike
    the line itself), or None when it has too few distinct orders."""
    indent, words = line[: len(line) - len(line.lstrip())], line.split()
    seen, out = {line}, []
    for _ in range(50):
        order = rng.sample(words, len(words))
        candidate = indent + " ".join(order)
        if candidate not in seen:
            seen.add(candidate)
            out.append(candidate)
            if len(out) == k:
                return out
    return None


def questions(held: list[str], n: int, seed: int) -> list[dict]:
    """``n`` questions from the held-out modules (see the module docstring)."""
    rng = random.Random(seed)
    lines = [text.splitlines() for text in held]

    def usable(line: str) -> bool:
        text = line.strip()
        return 12 <= len(text) <= 80 and len(text.split()) >= 4 and not text.startswith("#")

    spots = [
        (m, i)
        for m, module in enumerate(lines)
        for i in range(CONTEXT_LINES, len(module))
        if usable(module[i]) and " ".join(module[i].split()) == module[i].strip()
    ]
    out: list[dict] = []
    for m, i in rng.sample(spots, len(spots)):
        right = lines[m][i]
        wrong = shuffled(right, rng, 3)
        if wrong is None:
            continue
        label = rng.randrange(4)
        context = "\n".join(lines[m][i - CONTEXT_LINES : i]) + "\n"
        choices = [*wrong[:label], right, *wrong[label:]]
        out.append({"context": context, "choices": choices, "label": label})
        if len(out) == n:
            break
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/lm_stdlib"))
    parser.add_argument("--train-kb", type=int, default=1500, help="training text, KiB")
    parser.add_argument("--heldout-kb", type=int, default=200, help="held-out text, KiB")
    parser.add_argument("--questions", type=int, default=300, help="lm-eval documents")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    texts = [(i, read(p)) for i, p in enumerate(modules())]
    train = take([t for i, t in texts if t and i % 8 != 7], args.train_kb)
    held = take([t for i, t in texts if t and i % 8 == 7], args.heldout_kb)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train.txt").write_text("\n\n".join(train), encoding="utf-8")
    (args.out / "heldout.txt").write_text("\n\n".join(held), encoding="utf-8")
    tasks = args.out / "tasks"
    tasks.mkdir(exist_ok=True)
    for name in ("stdlib_next_line.yaml", "stdlib_next_line.py"):
        shutil.copyfile(HERE / "tasks" / name, tasks / name)
    docs = questions(held, args.questions, args.seed)
    (tasks / "next_line.json").write_text(json.dumps(docs, indent=1), encoding="utf-8")
    kb = [sum(len(t.encode("utf-8")) for t in part) // 1024 for part in (train, held)]
    print(
        f"Python {sys.version.split()[0]} stdlib: {len(train)} training modules ({kb[0]} KiB), "
        f"{len(held)} held out ({kb[1]} KiB), {len(docs)} lm-eval questions -> {args.out}"
    )


if __name__ == "__main__":
    main()
