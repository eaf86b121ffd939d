"""The HTTP face of the server: FastAPI routes, the bearer token, the body limit, health and Prometheus metrics.

FastAPI on uvicorn rather than LitServe (0.2.x), because what makes this server worth having does not fit
LitServe's model: its batch is a list of *requests* for one ``LitAPI`` route, formed in spawned worker processes
fed by an unbounded multiprocessing queue. Here a batch is counted in *images* of any task (a request may carry
many), formed in the process that holds the shared backbone and the LRU of task models, behind a bounded queue
that answers 429 at admission; the task is a path parameter; one bad request fails alone instead of its whole
batch; and the cache and batch metrics live in the registry ``/metrics`` serves. In one process with asyncio,
the collector, the futures and the cache are plain objects (``batcher.py``, ``store.py``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Awaitable
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import one_line
from ..version import __version__
from .batcher import Batcher, Prediction
from .config import ServeConfig
from .errors import RequestError
from .images import CONTENT_TYPES, Upload, from_base64, prepare
from .metrics import ServeMetrics
from .store import BundleStore, Task

log = logging.getLogger("pathotune.serve")

PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                },
                "encoding": {"files": {"contentType": "image/png, image/jpeg, image/tiff"}},
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["images"],
                    "properties": {
                        "images": {
                            "type": "array",
                            "items": {"type": "string", "description": "base64 bytes, or a data: URL"},
                        }
                    },
                }
            },
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/tiff": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"description": text, "content": {"application/json": {"example": {"error": "one line saying why"}}}}
    for code, text in {
        400: "malformed body",
        401: "missing or wrong bearer token",
        404: "no such task",
        409: "the bundle needs another backbone",
        413: "too many bytes, images or pixels",
        415: "not PNG, JPEG or TIFF",
        422: "an image that cannot be decoded",
        429: "queue full (Retry-After)",
        503: "timed out, shutting down, or the bundle cannot be loaded (Retry-After when retrying may help)",
    }.items()
}


class BodyTooLarge(Exception):
    """Raised from ``receive`` once a request body passes the limit."""


class BodyLimit:
    """Refuse a request body over ``limit`` bytes: at once by its Content-Length, else while it streams in."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await error_response(413, too_large(self.limit))(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge
            return message

        await self.app(scope, limited, send)


def too_large(limit: int) -> str:
    return f"the request body is over {limit:,} bytes (--max-upload-mb); send fewer or smaller images"


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": one_line(message)}, status_code=status, headers=headers)


def create_app(config: ServeConfig, store: BundleStore, metrics: ServeMetrics) -> FastAPI:
    """The app for one store; its lifespan starts the batcher and drains it on shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        wait_s = config.max_wait_ms / 1000
        batcher = Batcher(config.max_batch, wait_s, config.max_queue, store.device, metrics, config.threads)
        batcher.start()
        app.state.batcher = batcher
        yield
        await batcher.drain()

    app = FastAPI(
        title="PathoTune",
        version=__version__,
        summary="Prompt-tuned pathology tasks on one shared frozen backbone, batched across tasks.",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, limit=config.max_upload_bytes)
    decode_limiter = anyio.CapacityLimiter(config.decode_threads)
    bearer = HTTPBearer(auto_error=False, description="Required when the server was started with a token.")

    def authorised(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if config.token is None:
            return
        given = b"" if credentials is None else credentials.credentials.encode()
        if not secrets.compare_digest(given, config.token.encode()):
            raise RequestError(
                401,
                "missing or wrong bearer token; send 'Authorization: Bearer <token>'",
                {"WWW-Authenticate": "Bearer"},
            )

    guarded = [Depends(authorised)]

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, e: RequestError) -> JSONResponse:
        return error_response(e.status, str(e), e.headers)

    @app.exception_handler(BodyTooLarge)
    async def _body_too_large(request: Request, e: BodyTooLarge) -> JSONResponse:
        return error_response(413, too_large(config.max_upload_bytes), {"Connection": "close"})

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error serving %s", request.url.path)
        return error_response(500, f"internal error ({type(e).__name__}: {one_line(e, 200)}); the server carries on")

    def batcher_of(request: Request) -> Batcher:
        return request.app.state.batcher

    @app.get("/livez", tags=["health"], summary="Liveness: the process answers")
    async def livez() -> dict:
        return {"status": "alive"}

    @app.get("/readyz", tags=["health"], summary="Readiness: the backbone is loaded and the batcher runs")
    async def readyz(request: Request) -> JSONResponse:
        batcher = getattr(request.app.state, "batcher", None)
        if batcher is None or not batcher.ready:
            reason = "shutting down" if batcher is not None and batcher.draining else "starting"
            return error_response(503, f"not ready: {reason}", {"Retry-After": "5"})
        return JSONResponse({"status": "ready", "tasks": len(store.tasks), "queue_images": batcher.pending})

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics", dependencies=guarded)
    async def prometheus() -> Response:
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.get(
        "/v1/tasks",
        tags=["tasks"],
        summary="Every task: classes, backbone fingerprint, card metrics",
        dependencies=guarded,
    )
    async def tasks() -> dict:
        found = await anyio.to_thread.run_sync(store.rescan)
        return {"backbone": store.describe_backbone(), "tasks": [t.describe() for t in found]}

    @app.get("/v1/tasks/{task}", tags=["tasks"], summary="One task", responses=ERROR_RESPONSES, dependencies=guarded)
    async def one_task(task: str) -> dict:
        try:
            return store.task(task).describe()
        except RequestError as e:
            if e.status == 404:
                raise
            return store.tasks[task].describe()  # registered but not servable: say why

    @app.post(
        "/v1/tasks/{task}/predict",
        tags=["tasks"],
        summary="Class probabilities of one or many images (multipart, JSON base64, or one raw image)",
        openapi_extra=PREDICT_BODY,
        responses=ERROR_RESPONSES,
        dependencies=guarded,
    )
    async def predict(task: str, request: Request) -> JSONResponse:
        start = time.perf_counter()
        label, status = "-", 500
        metrics.in_flight.inc()
        try:
            known = store.task(task)
            label = known.name
            response = await with_timeout(serve_predict(known, request), config.request_timeout_s, batcher_of(request))
            status = 200
            return response
        except RequestError as e:
            status = e.status
            raise
        except BodyTooLarge:
            status = 413
            raise
        finally:
            metrics.in_flight.dec()
            metrics.requests.labels(label, str(status)).inc()
            metrics.latency.observe(time.perf_counter() - start)

    async def serve_predict(known: Task, request: Request) -> JSONResponse:
        batcher = batcher_of(request)
        batcher.check_room(1)
        uploads = await read_uploads(request, config)
        batcher.check_room(len(uploads))
        xs = await asyncio.gather(
            *(
                anyio.to_thread.run_sync(prepare, u, config.max_pixels, store.transform, limiter=decode_limiter)
                for u in uploads
            )
        )
        loaded = store.cached(known) or await anyio.to_thread.run_sync(store.model, known)
        predictions: list[Prediction] = await asyncio.gather(*batcher.submit(xs, loaded))
        classes = loaded.model.class_names
        rows = [
            {
                "name": u.name,
                "pred": classes[max(range(len(p.probs)), key=p.probs.__getitem__)],
                "probs": dict(zip(classes, p.probs, strict=True)),
                "logits": p.logits,
                "batch": {"id": p.batch, "images": p.batch_images, "tasks": p.batch_tasks},
            }
            for u, p in zip(uploads, predictions, strict=True)
        ]
        batches = sorted({p.batch for p in predictions})
        body = {"task": known.name, "classes": classes, "bundle_sha256": known.sha256}
        body["predictions"] = rows
        return JSONResponse(body, headers={"X-Pathotune-Batches": ",".join(map(str, batches))})

    return app


async def with_timeout(work: Awaitable[JSONResponse], seconds: float, batcher: Batcher) -> JSONResponse:
    """``work``, or 503 with Retry-After once it has taken ``seconds`` (its queued images are then dropped)."""
    try:
        return await asyncio.wait_for(work, seconds)
    except asyncio.TimeoutError:
        raise RequestError(
            503,
            f"the request took longer than {seconds:g} s (--request-timeout); retry later",
            {"Retry-After": str(batcher.retry_after())},
        ) from None


async def read_uploads(request: Request, config: ServeConfig) -> list[Upload]:
    """The images of a request: multipart file parts, JSON ``{"images": [base64, ...]}``, or one raw image body."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        uploads = await _multipart(request, config.max_images)
    elif kind == "application/json":
        try:
            body = json.loads(await request.body())
        except ValueError:
            raise RequestError(400, 'the body is not valid JSON; send {"images": ["<base64>", ...]}') from None
        if not isinstance(body, dict) or not isinstance(body.get("images"), list):
            raise RequestError(422, 'the JSON body needs a list under \'images\': {"images": ["<base64>", ...]}')
        images = body["images"]
        _count(len(images), config.max_images)
        uploads = [from_base64(text, i) for i, text in enumerate(images)]
    elif kind in CONTENT_TYPES:
        uploads = [Upload("image 0", await request.body(), kind)]
    else:
        raise RequestError(
            415,
            f"content type '{kind or 'none'}' is not accepted; send multipart/form-data, application/json "
            "(base64 images) or one image/png, image/jpeg or image/tiff body",
        )
    _count(len(uploads), config.max_images)
    return uploads


def _count(n: int, limit: int) -> None:
    if n == 0:
        raise RequestError(422, "the request holds no image; send at least one")
    if n > limit:
        raise RequestError(413, f"the request holds {n} images, over the limit of {limit} (--max-images)")


async def _multipart(request: Request, max_images: int) -> list[Upload]:
    try:
        form = await request.form(max_files=max_images + 1, max_fields=16)
    except StarletteHTTPException as e:  # python-multipart's complaints: malformed, too many parts
        status = 413 if "too many" in str(e.detail).lower() else 400
        raise RequestError(status, f"the multipart body was refused: {e.detail}") from None
    try:
        files = [(key, value) for key, value in form.multi_items() if isinstance(value, UploadFile)]
        fields = [key for key, value in form.multi_items() if not isinstance(value, UploadFile)]
        if fields:
            raise RequestError(422, f"form field '{fields[0]}' is not a file; send every image as a file part")
        _count(len(files), max_images)
        return [
            Upload(f.filename or f"image {i}", await f.read(), f.content_type or "") for i, (_, f) in enumerate(files)
        ]
    finally:
        await form.close()
