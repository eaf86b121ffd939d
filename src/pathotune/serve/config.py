"""The settings of one server: where bundles come from, how requests are batched, and every limit, checked once."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import ConfigError
from ..listen import is_loopback

TOKEN_ENV = "PATHOTUNE_SERVE_TOKEN"  # the bearer token, when not given as --token (keeps it out of `ps`)


@dataclass(frozen=True)
class ServeConfig:
    """``bundles``: folders of bundle sub-folders (each a task named by its folder), single bundle or run folders,
    or ``hf-hub:owner/repo[@revision]`` repos holding one bundle (a task named by the repo)."""

    bundles: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    weights: str | None = None  # backbone weights, if not where the bundles say
    reference: str | None = None  # the task whose backbone is served; default: the first task by name
    device: str = "cpu"
    max_batch: int = 32  # images per forward
    max_wait_ms: float = 10.0  # how long the first image of a batch waits for others
    max_queue: int = 256  # images admitted and not yet in a running forward; beyond it: 429
    max_images: int = 64  # images per request
    max_upload_bytes: int = 32 * 2**20  # request body
    max_pixels: int = 4096 * 4096  # decoded pixels per image, read from the header before decoding
    request_timeout_s: float = 30.0
    cache_bytes: int = 512 * 2**20  # the task models' own tensors (never the shared backbone)
    decode_threads: int = 2
    threads: int | None = None  # torch threads of the inference thread (default: torch's)

    def __post_init__(self) -> None:
        if not self.bundles:
            raise ConfigError("serve needs --bundles: a folder of bundle folders, a bundle, or hf-hub:owner/repo")
        positive = {
            "--max-batch": self.max_batch,
            "--max-queue": self.max_queue,
            "--max-images": self.max_images,
            "--max-upload-mb": self.max_upload_bytes,
            "--max-pixels": self.max_pixels,
            "--request-timeout": self.request_timeout_s,
            "--cache-mb": self.cache_bytes,
            "--decode-threads": self.decode_threads,
            "--threads": 1 if self.threads is None else self.threads,
        }
        for flag, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{flag} must be positive, got {value}")
        if self.max_wait_ms < 0:
            raise ConfigError(f"--max-wait-ms must be 0 or more, got {self.max_wait_ms}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port {self.port} is outside 0..65535")
        if self.max_images > self.max_queue:
            raise ConfigError(
                f"--max-images {self.max_images} exceeds --max-queue {self.max_queue}: such a request could never "
                "be admitted; raise --max-queue or lower --max-images"
            )
        if self.token is not None and not self.token.strip():
            raise ConfigError(f"the bearer token is empty; pass a non-empty --token or {TOKEN_ENV}")
        if self.token is None and not is_loopback(self.host):
            raise ConfigError(
                f"--host {self.host} is reachable from other machines, so requests must carry a bearer token: pass "
                f"--token or set {TOKEN_ENV} (or bind 127.0.0.1)"
            )

    @staticmethod
    def token_from_env(token: str | None) -> str | None:
        """``--token`` if given, else the environment's token, else None."""
        return token if token is not None else (os.environ.get(TOKEN_ENV) or None)
