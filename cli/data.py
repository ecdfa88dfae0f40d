"""``mixstack tokenizer`` and ``mixstack data``: tokenizers and token shards for language
modelling (:mod:`mixstack.data`).

    tokenizer train FILES --vocab-size N --out DIR   byte-level BPE -> DIR/tokenizer.json
    data prepare SPEC --out DIR [--tokenizer TOK]    the spec's text task (files, or
                                                     sources with mixing weights and a
                                                     validation split), tokenised once
                                                     into memory-mapped shards

The commands import :mod:`mixstack.cli.main`'s helpers inside their functions (main
imports this module at its end).
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path
from typing import Annotated

import typer

tokenizer_app = typer.Typer(help="Train tokenizers (byte-level BPE).", no_args_is_help=True)
data_app = typer.Typer(help="Tokenise corpora into memory-mapped shards.", no_args_is_help=True)


@tokenizer_app.command("train")
def tokenizer_train(
    ctx: typer.Context,
    files: Annotated[list[Path], typer.Argument(help="UTF-8 text files", show_default=False)],
    vocab_size: Annotated[
        int, typer.Option("--vocab-size", help="ids in all: 3 specials + 256 bytes + merges")
    ],
    out: Annotated[Path, typer.Option("--out", help="folder for tokenizer.json")],
    min_frequency: Annotated[
        int, typer.Option("--min-frequency", help="a pair merges when seen this often")
    ] = 2,
) -> None:
    """Train a byte-level BPE (specials <pad>, <bos>, <eos> = ids 0, 1, 2) on local files."""
    from mixstack.cli.main import _handled
    from mixstack.data.bpe import train_bpe
    from mixstack.generation.tokenizers import HFTokenizer

    with _handled(ctx):
        path = train_bpe(files, vocab_size, out, min_frequency=min_frequency)
        size = HFTokenizer.from_file(path).vocab_size
        short = f"; the corpus ran out of merges before {vocab_size}" if size < vocab_size else ""
        typer.echo(f"wrote {path} ({size} ids{short})")


@data_app.command("prepare")
def data_prepare(
    ctx: typer.Context,
    spec: Annotated[str, typer.Argument(help="YAML path or zoo:NAME", show_default=False)],
    out: Annotated[
        Path | None, typer.Option("--out", help="folder for the shards [train.task.shards]")
    ] = None,
    tokenizer: Annotated[
        str | None,
        typer.Option(
            "--tokenizer",
            help="'byte', a tokenizer.json (or its folder), or a Hub id hf://ORG/NAME "
            "[train.task.tokenizer]",
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="replace an existing shard folder")
    ] = False,
    overrides: Annotated[
        list[str] | None, typer.Argument(help="dotted overrides", show_default=False)
    ] = None,
) -> None:
    """Tokenise the spec's text task (train.task.sources and val_sources, else
    train.task.files, or the bundled corpus when both are empty; train.task.documents)
    into token shards."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from mixstack.cli.main import _handled, _load, human
    from mixstack.data.shards import TokenShards, prepare_shards
    from mixstack.dsl.errors import MixstackError
    from mixstack.tasks.text import BUNDLED

    with _handled(ctx):
        loaded = _load(spec, overrides)
        task = loaded.train.task
        if task.type != "text":
            raise MixstackError(
                f"train.task: data prepare reads a text task, got type {task.type!r}"
            )
        if out is None and task.shards is None:
            raise MixstackError("data prepare: give --out DIR or set train.task.shards")
        began = time.perf_counter()
        with (
            resources.as_file(resources.files("mixstack.tasks") / BUNDLED) as bundled,
            Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total} documents"),
                TextColumn("{task.fields[rate]}"),
                TimeRemainingColumn(),
                transient=True,
            ) as bar,
        ):
            job = bar.add_task("tokenising", total=None, rate="")

            def progress(done: int, total: int, tokens: int) -> None:
                rate = tokens / max(time.perf_counter() - began, 1e-9)
                bar.update(job, completed=done, total=total, rate=f"{human(rate)} tokens/s")

            target = out if out is not None else task.shards
            chosen = tokenizer if tokenizer is not None else task.tokenizer
            if task.sources:  # mixed sources with a validation split: parts in the manifest
                from mixstack.data.corpus import prepare_corpus

                folder = prepare_corpus(
                    task,
                    target,
                    tokenizer=chosen,
                    special_ids=loaded.model.special_ids,
                    overwrite=overwrite,
                    progress=progress,
                )
            else:
                folder = prepare_shards(
                    task.files or [bundled],
                    target,
                    tokenizer=chosen,
                    special_ids=loaded.model.special_ids,
                    documents=task.documents,
                    overwrite=overwrite,
                    progress=progress,
                )
        shards = TokenShards(folder)
        seconds = time.perf_counter() - began
        typer.echo(
            f"wrote {folder}: {shards.num_documents} documents, {len(shards)} tokens "
            f"({shards.dtype.name}) in {len(shards.manifest['shards'])} shard(s), {seconds:.1f} s"
        )
