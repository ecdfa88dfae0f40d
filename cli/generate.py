"""``mixstack generate MODEL --prompt TEXT``: stream a model's continuation of a prompt.

The text goes to stdout as it is produced (whole characters only); ``--verbose`` adds,
on stderr, the decode state's memory (and whether it is bounded), prefill time and
per-token decode time. Registered in ``cli/main.py``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer


def _load(source: str, device: str | None, dtype: str | None) -> tuple[Any, Any]:
    """(model, tokenizer or None): a model directory with its tokenizer, or whatever
    ``mixstack.from_pretrained`` accepts (byte-level tokenizer when the vocabulary is)."""
    import mixstack
    from mixstack.generation.tokenizers import tokenizer_for
    from mixstack.hub.modeldir import load_model_dir, load_tokenizer

    if Path(source).is_dir():
        return load_model_dir(source, device=device, dtype=dtype), load_tokenizer(source)
    model = mixstack.from_pretrained(source, device=device, dtype=dtype)
    return model, tokenizer_for(model.spec)


class _Timed:
    """A streamer writing text pieces and recording when each token arrived."""

    def __init__(self, tokenizer: Any, write: Any) -> None:
        from mixstack.generation.decoding import TextStreamer

        self.text = TextStreamer(tokenizer, write)
        self.times: list[float] = []

    def put(self, token_id: int) -> None:
        self.times.append(time.perf_counter())
        self.text.put(token_id)

    def end(self) -> None:
        self.text.end()


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def generate_command(
    ctx: typer.Context,
    model_dir: Annotated[
        str,
        typer.Argument(help="model directory (or a source mixstack.from_pretrained accepts)"),
    ],
    prompt: Annotated[str, typer.Option("--prompt", help="text to continue")],
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", min=1, help="tokens to generate at most")
    ] = 64,
    temperature: Annotated[
        float, typer.Option("--temperature", min=0.0, help="0 = greedy; > 0 samples")
    ] = 0.0,
    top_p: Annotated[
        float | None, typer.Option("--top-p", help="nucleus sampling mass in (0, 1]")
    ] = None,
    top_k: Annotated[
        int | None, typer.Option("--top-k", min=1, help="sample among the k best tokens")
    ] = None,
    repetition_penalty: Annotated[
        float | None, typer.Option("--repetition-penalty", help="> 1 discourages repeats")
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="sampling seed")] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda, ...")] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="fp32, bf16, ...")] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="state memory and timings on stderr")
    ] = False,
) -> None:
    """Continue PROMPT with a model, streaming tokens as they are produced."""
    from mixstack.cli.main import _handled

    with _handled(ctx):
        _generate(
            model_dir,
            prompt,
            dict(
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                repetition_penalty=repetition_penalty,
                seed=seed,
            ),
            device,
            dtype,
            verbose,
        )


def _generate(
    source: str,
    prompt: str,
    options: dict[str, Any],
    device: str | None,
    dtype: str | None,
    verbose: bool,
) -> None:
    import torch
    from rich.console import Console

    from mixstack.dsl.errors import MixstackError
    from mixstack.generation.decoding import generate

    model, tokenizer = _load(source, device, dtype)
    if tokenizer is None:
        raise MixstackError(
            f"{source} has no tokenizer.json and its vocabulary ({model.spec.vocab_size} ids) "
            "is not the 256 bytes; add the tokenizer.json it was trained with"
        )
    ids = tokenizer.encode(prompt)
    if not ids:
        raise MixstackError("the prompt is empty: give --prompt some text to continue")
    input_ids = torch.tensor([ids], device=model.embedding.weight.device)
    eos = tokenizer.eos_token_id
    streamer = _Timed(tokenizer, lambda piece: typer.echo(piece, nl=False))
    start = time.perf_counter()
    out = generate(
        model,
        input_ids,
        eos_token_id=[] if eos is None else eos,
        streamer=streamer,
        **options,
    )
    typer.echo("")
    if verbose:
        _report(Console(stderr=True, highlight=False), model, out, streamer.times, start)


def _report(console: Any, model: Any, out: Any, times: list[float], start: float) -> None:
    report = model.report(seq_len=out.sequences.shape[1], dtype=model.embedding.weight.dtype)
    grows = "bounded: constant in context length" if report.state_bounded else "grows with context"
    console.print(
        f"prompt {out.prompt_length} tokens, generated {int(out.lengths[0])} "
        f"(stop: {out.stop_reasons[0]}), seed {out.seed}"
    )
    console.print(f"decode state: {_human_bytes(out.state_nbytes)} ({grows})")
    for row in report.rows_by_type():
        console.print(f"  {row.type} x{row.count}: {_human_bytes(row.state_bytes)}")
    if times:
        console.print(f"prefill + first token: {1e3 * (times[0] - start):.1f} ms")
    if len(times) > 1:
        per_token = (times[-1] - times[0]) / (len(times) - 1)
        console.print(f"decode: {1e3 * per_token:.2f} ms/token ({1 / per_token:.1f} tokens/s)")
