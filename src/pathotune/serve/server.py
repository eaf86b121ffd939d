"""Running the app: the listening socket bound first (a port in use fails at once, on one line), the bundles and
the backbone loaded, then uvicorn. On SIGTERM or Ctrl-C the server stops accepting connections, readiness turns
503, the batcher stops waiting for fuller batches, and every admitted request is answered before the process
exits (uvicorn waits for requests in flight, then the app's lifespan drains the batcher)."""

from __future__ import annotations

import socket
import sys
import warnings

import uvicorn
from fastapi import FastAPI
from PIL import Image

from ..listen import bind
from .app import create_app
from .config import ServeConfig
from .metrics import ServeMetrics
from .store import BundleStore


class DrainingServer(uvicorn.Server):
    """uvicorn's server, telling the batcher to drain as soon as a shutdown signal arrives."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, url: str, tasks: int) -> None:
        super().__init__(config)
        self.app, self.url, self.tasks = app, url, tasks

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            print(f"pathotune serve: {self.tasks} task(s) on {self.url} (API docs: {self.url}/docs)", flush=True)

    def handle_exit(self, sig: int, frame) -> None:
        batcher = getattr(self.app.state, "batcher", None)
        if batcher is not None:
            batcher.draining = True
        super().handle_exit(sig, frame)


def run_server(config: ServeConfig, access_log: bool = True, log_level: str = "info") -> None:
    """Serve until SIGTERM or Ctrl-C."""
    # Pillow's own bomb check at our limit (refusal above twice it); our header check refuses anything above it.
    Image.MAX_IMAGE_PIXELS = config.max_pixels
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    sock = bind(config.host, config.port)
    try:
        metrics = ServeMetrics()
        store = BundleStore(
            config.bundles, config.cache_bytes, metrics, config.weights, config.reference, config.device
        )
        app = create_app(config, store, metrics)
        port = sock.getsockname()[1]
        host = f"[{config.host.strip('[]')}]" if ":" in config.host else config.host
        server = DrainingServer(
            uvicorn.Config(
                app,
                log_level=log_level,
                access_log=access_log,
                timeout_graceful_shutdown=int(config.request_timeout_s) + 5,
                lifespan="on",
            ),
            app,
            url=f"http://{host}:{port}",
            tasks=len(store.tasks),
        )
        server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:
        sys.exit(1)
