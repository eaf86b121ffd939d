"""The one error a request can end in: an HTTP status, a one-line message and optional headers (Retry-After)."""

from __future__ import annotations

from ..errors import PathoTuneError, one_line


class RequestError(PathoTuneError):
    """Answered as ``{"error": "<one line>"}`` with ``status``; the server carries on."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(one_line(message))
        self.status = status
        self.headers = headers or {}
