"""`llamba serve`: an OpenAI-compatible HTTP server whose slots are decoded together (engine.py) behind
FastAPI endpoints (app.py).

It wires and prints: it may import the API, models, memory (Batch, cache, Sequence), generation (sampler,
decoders), text (TextStream) and errors, whose types it maps to HTTP statuses.
"""

from __future__ import annotations

from ..errors import LlambaError
from .app import create_app
from .engine import GUESSING, Engine, Event, Request

__all__ = ["Engine", "Event", "Request", "create_app", "run"]


def run(llm, host: str, port: int, parallel: int, max_queue: int, api_key: str | None, aliases=(),
        decoding: str = "greedy", on_ready=None, kv_budget: int | None = None) -> None:
    """Serve until interrupted: HTTP on a thread of its own, the engine (the kernels) on this one."""
    import signal
    import threading
    import time

    import uvicorn

    engine = Engine(llm, parallel=parallel, max_queue=max_queue, draft=None if decoding in GUESSING else decoding,
                    kv_budget=kv_budget)
    model_id = llm.model_path.name
    app = create_app(engine, model_id, api_key=api_key, aliases=(llm.model_path.stem, *aliases),
                     default_decoding=decoding)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    http = threading.Thread(target=server.run, kwargs={"sockets": [_bind(host, port)]}, name="llamba-http", daemon=True)
    http.start()
    while http.is_alive() and not server.started:
        time.sleep(0.01)
    if not http.is_alive():
        raise LlambaError(f"the HTTP server on {host}:{port} did not start")
    if on_ready is not None:
        on_ready(f"http://{host}:{port}", model_id)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        engine.run(keep_running=http.is_alive)
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        engine.stop()
        http.join(timeout=10)


def _bind(host: str, port: int):
    """The listening socket, bound here so that a taken port is one clear line."""
    import socket

    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise LlambaError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None
    return sock


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
