"""The viewer's HTTP server: FastAPI routes over a fixed catalog, served by uvicorn.

URLs mirror the exported folder (:mod:`.export`), so one page works in both:

- ``/`` the page, ``/static/...`` its script, style and OpenSeadragon;
- ``/data/catalog.js`` and ``/data/slides/<slide_id>.js``: the slide list and a slide's overlays;
- ``/slides/<slide_id>.dzi`` and ``/slides/<slide_id>_files/<level>/<col>_<row>.jpeg``: Deep Zoom tiles, made on
  demand behind an LRU cache.

A slide id is looked up in the catalog's dict and nothing else; no part of a URL is joined onto a path (static
files go through Starlette's ``StaticFiles``, which refuses to leave its folder). Unknown slides, levels and
tiles answer 404. On loopback no token is needed; with a token, every request must carry it as
``Authorization: Bearer``, ``?token=`` (how the page is first opened) or the cookie that answer sets.
"""

from __future__ import annotations

import hmac
import re
import secrets
import socket
from collections.abc import Callable
from functools import lru_cache

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from ..errors import ConfigError, DataError, one_line
from ..listen import is_loopback
from .catalog import Catalog
from .deepzoom import PyramidPool, TileNotFound
from .page import static_dir

__all__ = ["TOKEN_COOKIE", "create_app", "resolve_token", "serve"]

TOKEN_COOKIE = "pathotune_viewer_token"
_TILE_NAME = re.compile(r"(\d{1,9})_(\d{1,9})\.jpeg")
_SCRIPT = "text/javascript; charset=utf-8"


def resolve_token(host: str, token: str | None) -> str | None:
    """The access token: the one given, or a fresh one for any address but loopback (which needs none)."""
    if token is not None and len(token) < 16:
        raise ConfigError("--token must have at least 16 characters; leave it out to have one generated")
    if token is None and not is_loopback(host):
        return secrets.token_urlsafe(24)
    return token


def create_app(catalog: Catalog, pool: PyramidPool, token: str | None = None) -> FastAPI:
    """The FastAPI app over ``catalog``'s slides, whose tiles ``pool`` makes."""
    app = FastAPI(title="PathoTune viewer", docs_url=None, redoc_url=None, openapi_url=None)
    page = (static_dir() / "index.html").read_bytes()
    catalog_js = catalog.catalog_script().encode()
    slide_js = lru_cache(maxsize=16)(lambda sid: catalog.slide_script(sid).encode())

    @app.exception_handler(TileNotFound)
    async def not_found(request: Request, e: TileNotFound) -> JSONResponse:
        return JSONResponse({"detail": one_line(e)}, status_code=404)

    @app.exception_handler(DataError)
    async def unreadable(request: Request, e: DataError) -> JSONResponse:
        return JSONResponse({"detail": one_line(e)}, status_code=500)

    if token is not None:

        @app.middleware("http")
        async def require_token(request: Request, call_next: Callable) -> Response:
            header = request.headers.get("authorization", "")
            offered = [
                header[7:] if header.lower().startswith("bearer ") else "",
                request.query_params.get("token", ""),
                request.cookies.get(TOKEN_COOKIE, ""),
            ]
            if not any(hmac.compare_digest(o.encode(), token.encode()) for o in offered if o):
                return JSONResponse(
                    {"detail": "this viewer needs its access token: open the URL it printed (with ?token=...)"},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
            response = await call_next(request)
            if offered[1]:
                response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
            return response

    @app.middleware("http")
    async def no_sniffing(request: Request, call_next: Callable) -> Response:
        response = await call_next(request)
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    @app.get("/")
    def index() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})

    @app.get("/data/catalog.js")
    def catalog_script() -> Response:
        return Response(catalog_js, media_type=_SCRIPT, headers={"Cache-Control": "no-cache"})

    @app.get("/data/slides/{sid}.js")
    def slide_script(sid: str) -> Response:
        if sid not in catalog.entries:
            raise TileNotFound(f"no slide '{sid}'")
        return Response(slide_js(sid), media_type=_SCRIPT, headers={"Cache-Control": "no-cache"})

    @app.get("/slides/{sid}.dzi")
    def dzi(sid: str) -> Response:
        return Response(pool.dzi(sid), media_type="application/xml")

    @app.get("/slides/{sid}_files/{level}/{name}")
    def tile(sid: str, level: str, name: str) -> Response:
        m = _TILE_NAME.fullmatch(name)
        if m is None or not level.isdigit() or len(level) > 3:
            raise TileNotFound(f"no tile {level}/{name}: tiles are named <level>/<col>_<row>.jpeg")
        data = pool.tile(sid, int(level), int(m[1]), int(m[2]))
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=static_dir()), name="static")
    return app


def serve(
    catalog: Catalog,
    sock: socket.socket,
    token: str | None = None,
    quality: int = 75,
    cache_tiles: int = 1024,
    max_open: int = 8,
) -> None:
    """Serve the viewer on a bound socket (:func:`pathotune.listen.bind`) until Ctrl-C (then return) or SIGTERM,
    each after a graceful shutdown."""
    pool = PyramidPool(catalog.sources, quality=quality, cache_tiles=cache_tiles, max_open=max_open)
    app = create_app(catalog, pool, token)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a viewer ends: uvicorn has shut down gracefully and raised it again
    finally:
        pool.close()
        sock.close()
