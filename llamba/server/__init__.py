"""`llamba serve`: an OpenAI-compatible HTTP server whose slots are decoded together (engine.py) behind
FastAPI endpoints (app.py)."""

from __future__ import annotations

from .app import create_app
from .engine import Engine, Event, QueueFull, Request

__all__ = ["Engine", "Event", "QueueFull", "Request", "create_app", "run"]


def run(llm, host: str, port: int, parallel: int, max_queue: int, api_key: str | None, aliases=(),
        decoding: str = "greedy", on_ready=None) -> None:
    """Serve until interrupted."""
    import uvicorn

    engine = Engine(llm, parallel=parallel, max_queue=max_queue)
    model_id = llm.model_path.name
    app = create_app(engine, model_id, api_key=api_key, aliases=(llm.model_path.stem, *aliases),
                     default_decoding=decoding)
    engine.start()
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    if on_ready is not None:
        on_ready(f"http://{host}:{port}", model_id)
    try:
        server.run()
    finally:
        engine.stop()
