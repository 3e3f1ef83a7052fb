"""`llamba serve`: the OpenAI-compatible HTTP server."""

from __future__ import annotations

import click

from .common import decoding_option, model_options, open_llama


@click.command()
@model_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback unless told).")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option("-np", "--parallel", type=click.IntRange(1, 64), default=4, show_default=True, help="Requests decoded together.")
@click.option("--queue", "max_queue", type=click.IntRange(min=0), default=16, show_default=True,
              help="Requests that may wait for a slot; past it the server answers 503.")
@click.option("--api-key", default=None, help="Require this bearer token on /v1 requests.")
@click.option("--shutdown-timeout", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="On SIGTERM, seconds running requests may take to finish (new ones get 503).")
@decoding_option(default="greedy", note="requests may choose their own; draft:MODEL loads that model for every slot",
                 with_draft=False)
def serve(model, ctx_size, threads, chat_template, kv_type, host, port, parallel, max_queue, api_key, shutdown_timeout,
          decoding) -> None:
    """Serve a model over HTTP with OpenAI's API (chat, completions, streaming), several users at once."""
    from ..server import run

    llm = open_llama(model, ctx_size, threads, chat_template, kv_type=kv_type)
    aliases = (model,) if model else ()
    ready = lambda url, name: click.echo(f"llamba: serving {name} at {url}/v1 ({parallel} slots)", err=True)  # noqa: E731
    run(llm, host, port, parallel, max_queue, api_key, aliases=aliases, decoding=decoding, on_ready=ready,
        shutdown_timeout=shutdown_timeout)


COMMANDS = [serve]
