"""`llamba serve`: the OpenAI-compatible HTTP server."""

from __future__ import annotations

import click

from .common import decoding_option, model_options, open_llama

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


class ByteSize(click.ParamType):
    """A size like 2GiB, 512MiB, 1.5G (binary units) or 3GB (decimal), in bytes."""

    name = "size"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        text = str(value).strip().lower().replace(" ", "")
        number = text.rstrip("kmgtib")
        unit = text[len(number):]
        try:
            size = int(float(number) * _UNITS[unit])
        except (ValueError, KeyError, OverflowError):
            self.fail(f"{value!r} is not a size (write it like 2GiB, 512MiB or 1.5G)", param, ctx)
        if size < 1:
            self.fail(f"{value!r} is not a positive size", param, ctx)
        return size


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
@click.option("--kv-budget", type=ByteSize(), default=None,
              help="KV cache memory of all slots together, allocated at start, e.g. 2GiB [default: -c x -np].")
@decoding_option(default="greedy", note="requests may choose their own; draft:MODEL loads that model for every slot",
                 with_draft=False)
def serve(model, ctx_size, threads, chat_template, kv_type, host, port, parallel, max_queue, api_key, shutdown_timeout,
          kv_budget, decoding) -> None:
    """Serve a model over HTTP with OpenAI's API (chat, completions, streaming), several users at once."""
    from ..server import run

    llm = open_llama(model, ctx_size, threads, chat_template, kv_type=kv_type)
    aliases = (model,) if model else ()
    ready = lambda url, name: click.echo(f"llamba: serving {name} at {url}/v1 ({parallel} slots)", err=True)  # noqa: E731
    run(llm, host, port, parallel, max_queue, api_key, aliases=aliases, decoding=decoding, on_ready=ready,
        shutdown_timeout=shutdown_timeout, kv_budget=kv_budget)


COMMANDS = [serve]
