"""The synchronous REST client of a node (:class:`MuxClient`).

How this works: :class:`MuxClient` wraps an :class:`httpx.Client` and speaks the REST half of
``docs/protocol.md``: every call names the calling agent (body ``agent`` for POSTs,
``?agent=`` for GETs), returns the node's JSON answer as a ``dict``, and turns an error
answer ``{"error": CODE, "detail": ..., "channel_id"?: ...}`` into the matching
:class:`~mux.errors.MuxError` subclass (:func:`~mux.errors.error_from_wire`). Transport
failures raise a ``MuxError`` with code ``unreachable``. ``frames(..., wait=S)`` is the
long-poll receive. ``mux.client`` exports it too, beside the WebSocket client.
"""

from __future__ import annotations

import ssl
import urllib.parse
from types import TracebackType
from typing import Any

import httpx
import orjson

from .errors import MuxError, describe_failure, error_from_wire
from .urls import api_url

__all__ = ["MuxClient"]


class MuxClient:
    """A synchronous REST client of one node, acting as ``agent``.

    ``base_url`` is the node URL (``http://127.0.0.1:8443``; a trailing ``/api/mux`` is
    fine). ``token`` is sent as ``Authorization: Bearer``; ``verify`` is ``True`` (system
    CAs), ``False``, a CA bundle path, or an :class:`ssl.SSLContext`. Every method returns
    the node's JSON answer; errors raise :class:`~mux.errors.MuxError` subclasses. Use as a
    context manager, or call :meth:`close_client` when done.
    """

    def __init__(
        self,
        base_url: str,
        agent: str,
        *,
        token: str | None = None,
        timeout: float = 10.0,
        verify: bool | str | ssl.SSLContext = True,
    ) -> None:
        self.base_url = api_url(base_url)
        self.agent = agent
        self.timeout = timeout
        headers = {"Accept": "application/json", "User-Agent": "mux-client"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if isinstance(verify, str):
            verify = ssl.create_default_context(cafile=verify)
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, verify=verify)

    def __repr__(self) -> str:
        return f"<MuxClient {self.agent} at {self.base_url}>"

    def _request(
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        try:
            response = self._http.request(
                method,
                path,
                content=orjson.dumps(body) if body is not None else None,
                headers={"Content-Type": "application/json"} if body is not None else None,
                params=params,
                timeout=timeout if timeout is not None else self.timeout,
            )
        except httpx.HTTPError as exc:
            raise MuxError(
                f"cannot reach the node at {self.base_url}: {describe_failure(exc)}",
                code="unreachable",
            ) from exc
        try:
            data = orjson.loads(response.content) if response.content else {}
        except orjson.JSONDecodeError:
            data = None
        if not response.is_success:
            if isinstance(data, dict) and "error" in data:
                raise error_from_wire(data, response.status_code)
            raise MuxError(
                f"HTTP {response.status_code} from {method} {path}: {response.text[:200]}",
                code=f"http_{response.status_code}",
            )
        if not isinstance(data, dict):
            raise MuxError(f"{method} {path}: the answer is not a JSON object", code="bad_response")
        return data

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._request("POST", path, body={"agent": self.agent, **body})

    def _get(self, path: str, **params: Any) -> dict[str, Any]:
        return self._request("GET", path, params={"agent": self.agent, **params})

    def open(self, target: str, intent: str = "stream", metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        """Open a channel to ``target``: ``{channel_id, intent, route, state, agent, target, ...}``."""
        return self._post("/open", {"target": target, "intent": intent, "metadata": metadata or {}})

    def send(self, channel_id: str, payload: Any) -> dict[str, Any]:
        """Send a JSON payload: ``{delivered, channel_id, seq, tbz_hash, sig, disposition, route}``."""
        return self._post("/send", {"channel_id": channel_id, "payload": payload})

    def close(self, channel_id: str, reason: str = "closed") -> dict[str, Any]:
        """Close a channel: ``{channel_id, state: "closed", reason, seq, tbz_hash}``."""
        return self._post("/close", {"channel_id": channel_id, "reason": reason})

    def ack(self, channel_id: str, seq: int) -> dict[str, Any]:
        """Acknowledge durable frames up to ``seq`` (cumulative): ``{channel_id, seq, removed}``."""
        return self._post("/ack", {"channel_id": channel_id, "seq": seq})

    def channels(self) -> dict[str, Any]:
        """This agent's open channels: ``{agent, channels: [...], count}``."""
        return self._get("/channels")

    def channel(self, channel_id: str) -> dict[str, Any]:
        """One channel's info (this agent must be one of its ends)."""
        return self._get(f"/channel/{urllib.parse.quote(channel_id, safe='')}")

    def frames(self, channel_id: str, after: int = 0, wait: float = 0.0, limit: int = 100) -> dict[str, Any]:
        """Frames addressed to this agent with ``seq > after``: ``{channel_id, frames, next_after, state}``.

        With ``wait`` > 0 the node holds the request until a frame arrives or ``wait``
        seconds pass (long poll; the node caps it, 30 s by default).
        """
        wait_s = max(0.0, float(wait))
        return self._request(
            "GET",
            f"/channel/{urllib.parse.quote(channel_id, safe='')}/frames",
            params={"agent": self.agent, "after": after, "wait": wait_s, "limit": limit},
            timeout=self.timeout + wait_s,
        )

    def chain(self, channel_id: str) -> list[dict[str, Any]]:
        """The channel's whole signed chain (exported frames, open to close), for
        :func:`mux.verify_chain`; this agent must be one of its ends."""
        try:
            response = self._http.get(
                f"/channel/{urllib.parse.quote(channel_id, safe='')}/chain", params={"agent": self.agent}
            )
        except httpx.HTTPError as exc:
            raise MuxError(
                f"cannot reach the node at {self.base_url}: {describe_failure(exc)}", code="unreachable"
            ) from exc
        if not response.is_success:
            raise error_from_wire(orjson.loads(response.content), response.status_code)
        return [orjson.loads(line) for line in response.content.splitlines() if line.strip()]

    def intents(self) -> dict[str, Any]:
        """The node's intent table: ``{intents: [...], count}``."""
        return self._get("/intents")

    def status(self) -> dict[str, Any]:
        """Node status: ``{agent, version, public_key, signing, tls, uptime_s, channels_open, ...}``."""
        return self._get("/status")

    def keys(self) -> dict[str, Any]:
        """The node's signing keys: ``{node, keys: [{kid, alg, public_key}]}``."""
        return self._get("/keys")

    def close_client(self) -> None:
        """Close the HTTP connection pool."""
        self._http.close()

    def __enter__(self) -> MuxClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close_client()
