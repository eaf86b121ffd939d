"""``pathotune serve``: many prompt-tuned tasks behind one HTTP server, on one shared frozen backbone, with
dynamic batching across tasks. One module per concept: config (settings and limits), errors (the HTTP error),
images (upload checks and decoding), store (bundle registry and the LRU of task models), batcher (the queue and
the mixed forward), metrics (Prometheus), app (routes), server (uvicorn, socket, graceful shutdown)."""

from __future__ import annotations

from .app import create_app
from .batcher import Batcher, Prediction
from .config import TOKEN_ENV, ServeConfig, is_loopback
from .errors import RequestError
from .images import Upload, decode_rgb
from .metrics import ServeMetrics
from .server import run_server
from .store import BundleStore, Task

__all__ = [
    "TOKEN_ENV",
    "Batcher",
    "BundleStore",
    "Prediction",
    "RequestError",
    "ServeConfig",
    "ServeMetrics",
    "Task",
    "Upload",
    "create_app",
    "decode_rgb",
    "is_loopback",
    "run_server",
]
