"""`llamba tokenize`: token ids of a text, like llama.cpp's llama-tokenize."""

from __future__ import annotations

import json
import sys

import click

from ..formats.gguf import open_gguf
from ..store import resolve_model
from ..text.tokenizer import Tokenizer
from .common import read_text_option


@click.command(name="tokenize")
@click.argument("model")
@click.option("-p", "--prompt", help="Text to tokenize.")
@click.option("-f", "--file", "path", type=click.Path(dir_okay=False), help="Read the text from a file.")
@click.option("--no-bos", is_flag=True, help="Leave out the BOS/EOS tokens the model would add.")
@click.option("--parse-special", is_flag=True, help="Recognise special-token text such as <|im_start|>.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of ids.")
@click.option("--show-pieces", is_flag=True, help="Print each id with its text piece.")
def tokenize(model: str, prompt: str | None, path: str | None, no_bos: bool, parse_special: bool,
             as_json: bool, show_pieces: bool) -> None:
    """Print the token ids of a text (-p TEXT, -f FILE, or standard input). Vocabulary-only files work."""
    text = read_text_option(prompt, path)
    g = open_gguf(resolve_model(model, say=lambda m: click.echo(m, err=True)))
    tok = Tokenizer(g.metadata, g.path)
    ids = tok.encode(text, add_special=not no_bos, parse_special=parse_special)
    if as_json:
        click.echo(json.dumps(ids))
    elif show_pieces:
        for i in ids:
            click.echo(f"{i:>8} -> {tok.piece_bytes(i).decode('utf-8', errors='replace')!r}")
    else:
        click.echo(" ".join(map(str, ids)))
    sys.stdout.flush()


COMMANDS = [tokenize]
