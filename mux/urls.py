"""Where a node answers: its REST root and its WebSocket URL, from the URL a user gives."""

from __future__ import annotations

import urllib.parse

from .errors import BadRequest

__all__ = ["API_PREFIX", "api_url", "ws_url"]

API_PREFIX = "/api/mux"
"""Where a node mounts its routes (``NodeSettings.prefix``)."""


def _split_base(url: str) -> urllib.parse.SplitResult:
    parts = urllib.parse.urlsplit(url.strip())
    if not parts.scheme or not parts.netloc:
        raise BadRequest(f"not a node URL: {url!r} (expected e.g. http://127.0.0.1:8443)", code="bad_url")
    return parts


def _api_path(path: str) -> str:
    path = path.rstrip("/")
    if path.endswith("/ws"):
        path = path[: -len("/ws")]
    return path if path.endswith(API_PREFIX) else path + API_PREFIX


def api_url(base_url: str) -> str:
    """The REST root for a node URL: ``http://h:p`` -> ``http://h:p/api/mux`` (kept if present)."""
    parts = _split_base(base_url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    if scheme not in ("http", "https"):
        raise BadRequest(f"unsupported URL scheme {parts.scheme!r}", code="bad_url")
    return urllib.parse.urlunsplit((scheme, parts.netloc, _api_path(parts.path), "", ""))


def ws_url(url: str, agent: str) -> str:
    """The WebSocket URL for ``agent``: http(s) node URLs become ``ws(s)://.../api/mux/ws?agent=``.

    A ``ws(s)://`` URL keeps its path (``/api/mux/ws`` is added when it has none); the
    ``agent`` query parameter is set either way.
    """
    parts = _split_base(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss"):
        raise BadRequest(f"unsupported URL scheme {parts.scheme!r}", code="bad_url")
    path = parts.path.rstrip("/")
    if parts.scheme in ("http", "https") or not path:
        path = _api_path(path) + "/ws"
    query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query) if k != "agent"] + [("agent", agent)]
    return urllib.parse.urlunsplit((scheme, parts.netloc, path, urllib.parse.urlencode(query), ""))
