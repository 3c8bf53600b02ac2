"""A small client for the running daemon's HTTP API (standard library only)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from daemon.config import Config
from daemon.errors import EditdError


class DaemonUnreachableError(EditdError):
    """No daemon answers on the configured address."""


def base_url(cfg: Config) -> str:
    host = cfg.api.host
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{cfg.api.port}"


def call(cfg: Config, method: str, path: str, body: Any = None, *, timeout: float = 600.0) -> Any:
    """``method path`` on the daemon; the decoded JSON answer. Errors become EditdError
    with the server's message; no daemon listening raises DaemonUnreachableError."""
    data = None if body is None else json.dumps(body).encode("utf-8")
    request = urllib.request.Request(base_url(cfg) + path, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if cfg.api.token:
        request.add_header("Authorization", f"Bearer {cfg.api.token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        raise EditdError(f"the daemon answered {exc.code}: {_message(exc.read())}") from exc
    except (urllib.error.URLError, ConnectionError) as exc:
        raise DaemonUnreachableError(
            f"no daemon answers at {base_url(cfg)} ({getattr(exc, 'reason', exc)})"
        ) from exc


def _message(raw: bytes) -> str:
    try:
        body = json.loads(raw)
        return str(body["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return raw.decode("utf-8", "replace")[:200]
