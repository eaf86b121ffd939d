"""Where a server of the project listens: whether an address is loopback, and the socket bound before any work.

Both servers (``pathotune serve`` and the slide viewer) bind first, so a port in use is one clear error before
models or slides load, and both ask for a token on any address but loopback.
"""

from __future__ import annotations

import ipaddress
import socket

from .errors import ConfigError, describe_os_error

__all__ = ["bind", "is_loopback"]


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """The socket bound to ``host:port`` (port 0: any free one), or a one-line ConfigError naming the flags."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port} is outside 0..65535")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as e:
        sock.close()
        raise ConfigError(
            f"cannot listen on {host}:{port}: {describe_os_error(e)}; pick another --port or --host"
        ) from e
    sock.set_inheritable(True)
    return sock
