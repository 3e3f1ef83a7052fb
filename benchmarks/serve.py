"""Serving several users: aggregate generated tokens per second with 1, 2, 4 and 8 concurrent streams, and
the time to first token under that load, for `llamba serve` and llama-cpp-python's server on the same file,
in the same run (machines are noisy: compare the ratios).

    python benchmarks/serve.py [--model smollm2-135m --model gemma3-270m] [-t 2] [-n 64]

Each stream sends two streamed completions one after the other (temperature 0, -n tokens); tokens are
counted as streamed chunks with text, for both servers alike. Needs `pip install 'llama-cpp-python[server]'`.
"""

from __future__ import annotations

import concurrent.futures
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import click
import httpx
import openai

from llamba.store import resolve_model

PROMPTS = ["Once upon a time, in a village by the sea,", "The history of the printing press begins",
           "Here is a recipe for a simple tomato soup:", "Dear diary, today I learned"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(command: list[str], port: int) -> subprocess.Popen:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    raise click.ClickException(f"server did not start: {' '.join(command)}")


def _one_stream(client: openai.OpenAI, model: str, prompt: str, n: int) -> tuple[int, float]:
    t0 = time.perf_counter()
    first, tokens = None, 0
    for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0, stream=True):
        if chunk.choices and chunk.choices[0].text:
            tokens += 1
            first = first or time.perf_counter() - t0
    return tokens, first or 0.0


def _load(url: str, model: str, streams: int, n: int) -> tuple[float, float]:
    """(aggregate tokens per second, median time to first token) with `streams` concurrent clients."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    _one_stream(client, model, PROMPTS[0], 4)  # warm

    def stream(i: int):
        return [_one_stream(client, model, PROMPTS[(i + k) % len(PROMPTS)], n) for k in range(2)]

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
        results = [r for rs in pool.map(stream, range(streams)) for r in rs]
    wall = time.perf_counter() - t0
    return sum(t for t, _ in results) / wall, statistics.median(f for _, f in results)


@click.command()
@click.option("--model", "models", multiple=True, default=["smollm2-135m", "gemma3-270m"])
@click.option("-t", "--threads", type=int, default=2)
@click.option("-n", "--n-tokens", type=int, default=64)
def main(models, threads, n_tokens) -> None:
    rows = []
    for name in models:
        path = str(resolve_model(name))
        servers = {
            "llamba": [sys.executable, "-m", "llamba", "serve", path, "-t", str(threads), "-np", "8", "-c", "1024"],
            "llama-cpp-python": [sys.executable, "-m", "llama_cpp.server", "--model", path, "--n_threads",
                                 str(threads), "--n_ctx", "1024"],
        }
        for server, command in servers.items():
            port = _free_port()
            process = _start([*command, "--port", str(port)], port)
            try:
                single = None
                for streams in (1, 2, 4, 8):
                    rate, ttft = _load(f"http://127.0.0.1:{port}", Path(path).name, streams, n_tokens)
                    single = single or rate
                    rows.append((name, server, streams, rate, rate / single, ttft))
            finally:
                process.terminate()
                process.wait(timeout=30)
    click.echo("| model | server | streams | tokens/s (all streams) | vs 1 stream | median time to first token |")
    click.echo("| --- | --- | ---: | ---: | ---: | ---: |")
    for name, server, streams, rate, ratio, ttft in rows:
        click.echo(f"| {name} | {server} | {streams} | {rate:.1f} | {ratio:.2f}x | {ttft * 1000:.0f} ms |")


if __name__ == "__main__":
    main()
