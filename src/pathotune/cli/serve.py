"""`pathotune serve`: the multi-task inference server (FastAPI on uvicorn; see pathotune.serve.app for why).

The library is imported inside the command, so `pathotune --help` loads neither torch nor FastAPI.
"""

from __future__ import annotations

from typing import Annotated

import typer

SERVE_EXTRA = ("fastapi", "starlette", "uvicorn", "multipart", "python_multipart", "prometheus_client")


def serve(
    bundles: Annotated[
        list[str],
        typer.Option(
            "--bundles",
            help="A folder of bundle folders (each a task named by its folder; rescanned, so new bundles are served "
            "without a restart), one bundle or run folder, or hf-hub:owner/repo (optionally @revision). Repeatable.",
        ),
    ],
    host: Annotated[str, typer.Option(help="Address to bind; anything but loopback needs a token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind (0: any free port, printed at start).")] = 8000,
    token: Annotated[
        str | None,
        typer.Option(help="Bearer token every request must carry (or set PATHOTUNE_SERVE_TOKEN)."),
    ] = None,
    weights: Annotated[
        str | None, typer.Option(help="Backbone weights (a local path or hf-hub:...), if not where the bundles say.")
    ] = None,
    reference: Annotated[
        str | None, typer.Option(help="The task whose backbone is served (default: the first task by name).")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1...")] = "cpu",
    max_batch: Annotated[int, typer.Option(help="Most images in one mixed forward.")] = 32,
    max_wait_ms: Annotated[float, typer.Option(help="Longest wait of a batch's first image for others.")] = 10.0,
    max_queue: Annotated[int, typer.Option(help="Images admitted and waiting; beyond it requests get 429.")] = 256,
    max_images: Annotated[int, typer.Option(help="Images per request.")] = 64,
    max_upload_mb: Annotated[float, typer.Option(help="Request body limit (MiB); larger bodies get 413.")] = 32.0,
    max_pixels: Annotated[
        int, typer.Option(help="Decoded pixels per image, read from the header before decoding; more: 413.")
    ] = 4096 * 4096,
    request_timeout: Annotated[float, typer.Option(help="Seconds a request may take; then 503.")] = 30.0,
    cache_mb: Annotated[
        float, typer.Option(help="LRU bound on the loaded task models' own tensors (MiB; not the backbone).")
    ] = 512.0,
    decode_threads: Annotated[int, typer.Option(help="Threads decoding uploads.")] = 2,
    threads: Annotated[int | None, typer.Option(help="Torch threads of the forward (default: torch's).")] = None,
    access_log: Annotated[bool, typer.Option("--access-log/--no-access-log", help="Log every request.")] = True,
    log_level: Annotated[str, typer.Option(help="uvicorn's log level.")] = "info",
) -> None:
    """Serve bundles over HTTP, batching requests of different tasks into one forward on one shared backbone."""
    from ..errors import ConfigError

    try:
        from ..serve import ServeConfig, run_server
    except ModuleNotFoundError as e:  # the optional [serve] extra
        if (e.name or "").split(".")[0] not in SERVE_EXTRA:
            raise
        raise ConfigError(f"pathotune serve needs {e.name}: pip install 'pathotune[serve]'") from e

    config = ServeConfig(
        bundles=tuple(bundles),
        host=host,
        port=port,
        token=ServeConfig.token_from_env(token),
        weights=weights,
        reference=reference,
        device=device,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_queue=max_queue,
        max_images=max_images,
        max_upload_bytes=int(max_upload_mb * 2**20),
        max_pixels=max_pixels,
        request_timeout_s=request_timeout,
        cache_bytes=int(cache_mb * 2**20),
        decode_threads=decode_threads,
        threads=threads,
    )
    run_server(config, access_log=access_log, log_level=log_level)
