"""The WebSocket under a node's session: through a Quart route, or straight on ASGI.

How this works: the socket handler (``mux.app``) needs little of a WebSocket: the query
arguments, the ``Authorization`` header, the offered subprotocols, the peer address, and
``accept``/``send``/``receive``/``close``. :class:`Socket` names that. :class:`QuartSocket`
gives it from Quart's ``websocket`` context (a blueprint mounted in someone's app).
:class:`AsgiSocket` gives it from the raw ASGI ``scope``/``receive``/``send`` of the server,
without Quart's per-message queue and context hop; :class:`FastSocketApp` routes the node's
WebSocket path to it and everything else (REST, lifespan) to the Quart app. A standalone
node (``mux.server.serve``, through ``mux.app.node_asgi``) serves its WebSocket that way:
the same protocol, a cheaper path.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Protocol
from urllib.parse import parse_qsl

from quart import websocket

__all__ = ["AsgiSocket", "Disconnected", "FastSocketApp", "QuartSocket", "Socket"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class Socket(Protocol):
    """What the socket handler uses of a WebSocket."""

    args: dict[str, str]
    """Query arguments (the first value of each)."""
    authorization: str | None
    """The ``Authorization`` header, if any."""
    subprotocols: list[str]
    """The subprotocols the client offered."""
    remote_addr: str | None
    """The peer's address (after a trusted proxy's ``X-Forwarded-For``)."""

    async def accept(self, subprotocol: str | None) -> None:
        """Complete the handshake."""

    async def send(self, message: str | bytes) -> None:
        """Send one message (text or binary)."""

    async def receive(self) -> str | bytes:
        """The next message; raises :class:`Disconnected` when the peer went away."""

    async def close(self, code: int, reason: str) -> None:
        """Close with ``code``."""


class Disconnected(Exception):
    """The peer closed the WebSocket (raw ASGI path; Quart cancels the handler instead)."""


class QuartSocket:
    """:class:`Socket` over Quart's ``websocket`` context (the blueprint's route)."""

    def __init__(self) -> None:
        self.args = {k: v for k, v in websocket.args.items()}
        self.authorization = websocket.headers.get("Authorization")
        self.subprotocols = list(websocket.requested_subprotocols or [])
        self.remote_addr = websocket.remote_addr

    async def accept(self, subprotocol: str | None) -> None:
        """Complete the handshake."""
        await websocket.accept(subprotocol=subprotocol)

    async def send(self, message: str | bytes) -> None:
        """Send one message."""
        await websocket.send(message)

    async def receive(self) -> str | bytes:
        """The next message (Quart hands an empty binary message over as None)."""
        message = await websocket.receive()
        return b"" if message is None else message

    async def close(self, code: int, reason: str) -> None:
        """Close with ``code``."""
        await websocket.close(code, reason)


class AsgiSocket:
    """:class:`Socket` straight over an ASGI ``websocket`` connection."""

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._receive = receive
        self._send = send
        query = scope.get("query_string", b"").decode("latin-1")
        self.args: dict[str, str] = {}
        for key, value in parse_qsl(query, keep_blank_values=True):
            self.args.setdefault(key, value)
        self.authorization: str | None = None
        for name, value in scope.get("headers", []):
            if name.lower() == b"authorization":
                self.authorization = value.decode("latin-1")
                break
        self.subprotocols = list(scope.get("subprotocols") or [])
        client = scope.get("client")
        self.remote_addr = str(client[0]) if client else None
        self.closed = False

    async def accept(self, subprotocol: str | None) -> None:
        """Wait for the client's connect event, then accept."""
        event = await self._receive()
        if event["type"] != "websocket.connect":
            self.closed = True
            raise Disconnected()
        await self._send({"type": "websocket.accept", "subprotocol": subprotocol, "headers": []})

    async def send(self, message: str | bytes) -> None:
        """Send one message (nothing once closed)."""
        if self.closed:
            return
        if isinstance(message, str):
            await self._send({"type": "websocket.send", "text": message})
        else:
            await self._send({"type": "websocket.send", "bytes": message})

    async def receive(self) -> str | bytes:
        """The next message; :class:`Disconnected` once the peer went away."""
        event = await self._receive()
        kind = event["type"]
        if kind == "websocket.receive":
            text = event.get("text")
            if text is not None:
                return str(text)
            return bytes(event.get("bytes") or b"")
        self.closed = True
        raise Disconnected()

    async def close(self, code: int, reason: str) -> None:
        """Close with ``code`` (once)."""
        if self.closed:
            return
        self.closed = True
        await self._send({"type": "websocket.close", "code": code, "reason": reason})


class FastSocketApp:
    """An ASGI app: WebSocket requests to ``path`` go to ``handler`` with an
    :class:`AsgiSocket`; everything else goes to ``app`` (the Quart app)."""

    def __init__(self, app: Any, path: str, handler: Callable[[AsgiSocket], Awaitable[None]]) -> None:
        self.app = app
        self.path = path
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Route one ASGI connection."""
        if scope["type"] == "websocket" and scope.get("path") == self.path:
            await self.handler(AsgiSocket(scope, receive, send))
            return
        await self.app(scope, receive, send)
