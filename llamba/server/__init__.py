"""`llamba serve`: an OpenAI-compatible HTTP server whose slots are decoded together (engine.py) behind
FastAPI endpoints (app.py).

It wires and prints: it may import the API, models, memory (Batch, cache, Sequence), generation (sampler,
decoders), text (TextStream) and errors, whose types it maps to HTTP statuses.
"""

from __future__ import annotations

import signal
import threading
import time

from ..errors import LlambaError
from .app import create_app
from .engine import GUESSING, Engine, Event, Job, Request

__all__ = ["Engine", "Event", "Job", "Request", "create_app", "run"]


def run(llm, host: str, port: int, parallel: int, max_queue: int, api_key: str | None, aliases=(),
        decoding: str = "greedy", on_ready=None, shutdown_timeout: float = 30.0,
        kv_budget: int | None = None) -> None:
    """Serve until interrupted: HTTP on a thread of its own, the engine (the kernels) on this one.

    SIGTERM stops gracefully: new requests get 503, running and queued ones finish (for at most
    shutdown_timeout seconds; those still running then end with an error), and run returns. A second SIGTERM,
    or Ctrl-C, stops at once."""
    import uvicorn

    engine = Engine(llm, parallel=parallel, max_queue=max_queue, draft=None if decoding in GUESSING else decoding,
                    kv_budget=kv_budget)
    model_id = llm.model_path.name
    app = create_app(engine, model_id, api_key=api_key, aliases=(llm.model_path.stem, *aliases),
                     default_decoding=decoding)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    http = threading.Thread(target=server.run, kwargs={"sockets": [_bind(host, port)]}, name="llamba-http", daemon=True)
    http.start()
    while http.is_alive() and not server.started:
        time.sleep(0.01)
    if not http.is_alive():
        raise LlambaError(f"the HTTP server on {host}:{port} did not start")
    if on_ready is not None:
        on_ready(f"http://{host}:{port}", model_id)
    stop = _GracefulStop(app, shutdown_timeout)
    try:
        engine.run(keep_running=lambda: http.is_alive() and not stop.done(engine))
        if not engine.idle():
            engine.end_all(f"the server stopped: requests still running after {shutdown_timeout:g} s were cut")
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        engine.stop()
        http.join(timeout=10)


class _GracefulStop:
    """SIGTERM's handler: the app refuses new work (app.state.stopping), the engine runs until it is idle or
    the time is up; a second SIGTERM interrupts at once."""

    def __init__(self, app, timeout: float):
        self.app, self.timeout, self.deadline = app, timeout, None
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if self.deadline is not None:
            raise KeyboardInterrupt
        self.deadline = time.monotonic() + self.timeout
        self.app.state.stopping = True

    def done(self, engine: Engine) -> bool:
        return self.deadline is not None and (engine.idle() or time.monotonic() >= self.deadline)


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
