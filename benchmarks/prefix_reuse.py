"""Prefix reuse across slots: an agent's long system prompt sent again while the slot that holds it is busy.

    python benchmarks/prefix_reuse.py [--model qwen2.5-coder-0.5b] [-t 2] [--prefix 1500] [-r 3]

Each round makes a fresh system prompt of --prefix tokens (tool definitions, numbered so no round reuses
another's), then, on a `llamba serve -np 2`:
  first   the system prompt and a question, alone: the time to its first token (nothing cached);
  second  while the first still streams its answer in its slot, the same system prompt and another question:
          it lands in the other slot and shares the first's cached prefix;
  cold    the same again with a system prompt never seen (as long), beside the same running stream: what the
          second would cost without reuse under the same load.
Times are to the first streamed token, as a client sees it; the ratio asked of the server is second / first.
"""

from __future__ import annotations

import concurrent.futures
import statistics
import sys
import time
from pathlib import Path

import click
import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import _free_port, _start  # noqa: E402  (starting a server and waiting for it, as serve.py does)

from llamba.store import resolve_model  # noqa: E402


def _system_prompt(url: str, round_: int, n_tokens: int) -> str:
    """Tool definitions, as agents send them, until the text is n_tokens long."""
    tools, text = [], ""
    while True:
        i = len(tools)
        tools.append(f'{{"name": "tool_{round_}_{i}", "description": "Looks up record {i} of table {round_} and '
                     f'returns its fields", "parameters": {{"id": "integer", "fields": "list of strings"}}}}')
        text = "You are an agent. Call a tool when it helps. Tools:\n" + "\n".join(tools)
        if len(httpx.post(f"{url}/tokenize", json={"content": text}).json()["tokens"]) >= n_tokens:
            return text


def _first_token(client: openai.OpenAI, model: str, system: str, question: str, max_tokens: int,
                 hold: bool = False):
    """(seconds to the first token, cached prompt tokens, the stream if hold else None)."""
    t0 = time.perf_counter()
    stream = client.chat.completions.create(
        model=model, temperature=0, max_tokens=max_tokens, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "system", "content": system}, {"role": "user", "content": question}])
    chunks = iter(stream)
    for chunk in chunks:
        if chunk.choices and chunk.choices[0].delta.content:
            seconds = time.perf_counter() - t0
            break
    if hold:
        return seconds, None, chunks
    cached = None
    for chunk in chunks:
        if chunk.usage is not None:
            cached = chunk.usage.prompt_tokens_details.cached_tokens
    return seconds, cached, None


def _round(client, model: str, url: str, round_: int, n_tokens: int) -> tuple[float, float, float, int]:
    system, unseen = _system_prompt(url, 2 * round_, n_tokens), _system_prompt(url, 2 * round_ + 1, n_tokens)
    first, _, holder = _first_token(client, model, system, "Repeat every tool definition, one per line.", 400,
                                    hold=True)  # a long answer: it keeps its slot busy
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        draining = pool.submit(lambda: sum(1 for _ in holder))  # the first slot keeps decoding meanwhile
        second, cached, _ = _first_token(client, model, system, "Which tool reads record 5?", 8)
        cold, _, _ = _first_token(client, model, unseen, "Which tool reads record 5?", 8)
        busy = not draining.done()
        draining.result()
    if not busy:
        raise click.ClickException("the first answer ended before the others: raise its length")
    return first, second, cold, cached


@click.command()
@click.option("--model", default="qwen2.5-coder-0.5b", show_default=True)
@click.option("-t", "--threads", type=int, default=2, show_default=True)
@click.option("--prefix", "n_tokens", type=int, default=1500, show_default=True, help="System prompt tokens.")
@click.option("-r", "--rounds", type=int, default=3, show_default=True)
def main(model, threads, n_tokens, rounds) -> None:
    path = resolve_model(model)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "llamba", "serve", str(path), "-t", str(threads), "-np", "2", "-c", "4096"]
    process = _start([*command, "--port", str(port)], port)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
        _first_token(client, path.name, "Warm up.", "Hi.", 4)
        rows = [_round(client, path.name, url, r, n_tokens) for r in range(rounds)]
    finally:
        process.terminate()
        process.wait(timeout=30)
    click.echo(f"{model}, {n_tokens}-token system prompt, {threads} threads, -np 2 (times to first token)\n")
    click.echo("| round | first (alone, cold) | second (other slot, reused) | cold beside a stream | "
               "second / first | cached tokens |")
    click.echo("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for r, (first, second, cold, cached) in enumerate(rows):
        click.echo(f"| {r} | {first * 1000:.0f} ms | {second * 1000:.0f} ms | {cold * 1000:.0f} ms | "
                   f"{second / first:.2f}x | {cached} |")
    ratio = statistics.median(second / first for first, second, _, _ in rows)
    click.echo(f"\nmedian second / first: {ratio:.2f}x")


if __name__ == "__main__":
    main()
