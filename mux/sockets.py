"""The WebSocket under a node's session: through a Quart route, or straight on ASGI.

How this works: the socket handler (``mux.connection``) needs little of a WebSocket: the query
arguments, the ``Authorization`` header, the offered subprotocols, the peer address, and
``accept``/``send``/``receive``/``close``. :class:`Socket` names that. :class:`QuartSocket`
gives it from Quart's ``websocket`` context (a blueprint mounted in someone's app).
:class:`AsgiSocket` gives it from the raw ASGI ``scope``/``receive``/``send`` of the server,
without Quart's per-message queue and context hop; :class:`FastSocketApp` routes the node's
WebSocket path to it and everything else (REST, lifespan) to the Quart app. A standalone
node (``mux.server.serve``, through ``mux.app.node_asgi``) serves its WebSocket that way:
the same protocol, a cheaper path.

Several messages, one write: :meth:`Socket.send_many` puts messages queued together on the
wire in one write. Over Hypercorn (0.18) :class:`AsgiSocket` encodes each message as its
own WebSocket frame and hands Hypercorn the joined bytes: one pass down its stack and one
``send`` system call for all of them instead of one each. The frames are built directly
(``mux.wsframes``) when the connection negotiated no extension and is open with no message
half sent; otherwise (permessage-deflate, say) through the connection's own wsproto
``Connection``. Under any other ASGI server, or before the handshake, it sends them one by
one.

On Hypercorn, :class:`AsgiSocket` also goes past Hypercorn's layers where it can, each in its
own module: it takes the client's messages apart itself and can handle them right in the
server's reader (``mux.fast_receive``), which the node's own read loop feeds
(``mux.lean_read``, under ``mux.server``), and writes the socket itself
(``mux.direct_writes``); ``mux.hypercorn_conn`` says which connections it knows well
enough to do so.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any, Protocol
from urllib.parse import parse_qsl

import trio
from hypercorn.protocol.events import Data as _HypercornData
from hypercorn.protocol.ws_stream import ASGIWebsocketState as _WSState
from hypercorn.protocol.ws_stream import WSStream as _WSStream
from quart import websocket
from wsproto.connection import Connection as _WSConnection
from wsproto.connection import ConnectionState as _WSConnectionState
from wsproto.events import BytesMessage, TextMessage
from wsproto.utilities import LocalProtocolError

from .direct_writes import UNSENT_BYTES, wire_under
from .fast_receive import INLINE_FAILED, FastReceive
from .wsframes import server_frames

__all__ = [
    "INLINE_BYTES",
    "INLINE_MOST",
    "UNSENT_BYTES",
    "AsgiSocket",
    "Disconnected",
    "FastSocketApp",
    "InlineHandler",
    "QuartSocket",
    "Socket",
]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
InlineHandler = Callable[[str | bytes], bool]
"""Handles one message in the server's reader; False leaves it to ``receive``."""
INLINE_MOST = 16
"""By default the server's reader hands at most this many messages of a read to the
inline handler (``handle_inline``)..."""
INLINE_BYTES = 4096
"""... and none after they add up to this many characters or bytes (None: no such bound);
the rest go through the app's task. A node passes None: what a reader's turn gives its
writers is written at the turn's end (``mux.outbox.WriteThrough``), so nothing waits for the
rest of the read to be handled, and a call's small frame behind a bulk one in the same read
is handled in that turn and written first, by urgency. With the bound it went to the app's
task and out after the bulk frame: voice p99 beside a flood was 1.47x its p99 alone, and
1.18 to 1.32x without the bound (interleaved runs; the relays' rates unchanged)."""


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

    async def send_many(self, messages: Sequence[str | bytes]) -> None:
        """Send ``messages`` in order, each its own WebSocket message, in as few writes as
        the server allows."""

    def direct_ready(self) -> bool:
        """True when :meth:`send_now` can put messages straight on the socket now."""

    def send_now(self, messages: Sequence[str | bytes]) -> bool:
        """Only when :meth:`direct_ready`: write ``messages`` without waiting; True when all
        of it went out, else the rest is kept and the next :meth:`send_many` writes it first."""

    async def receive(self) -> str | bytes:
        """The next message; raises :class:`Disconnected` when the peer went away."""

    def receive_ready(self) -> str | bytes | None:
        """The next message if the server already holds it, without waiting; else None
        (also when the peer has gone: the next :meth:`receive` says so)."""

    async def close(self, code: int, reason: str) -> None:
        """Close with ``code``."""

    def handle_inline(
        self,
        handler: InlineHandler | None,
        most: int = INLINE_MOST,
        most_bytes: int | None = INLINE_BYTES,
        done: Callable[[], None] | None = None,
    ) -> None:
        """While the app waits in :meth:`receive` with nothing queued, hand up to ``most``
        messages of each read to ``handler`` in the server's reader, none after ``most_bytes``
        of them (None: no byte bound), and call ``done`` after the last of a read, before the
        reader waits for anything; a ``handler`` of None stops it. A server that cannot does
        nothing, and every message arrives through ``receive``."""


class Disconnected(Exception):
    """The peer went away (raw ASGI path; Quart cancels the handler instead). ``lost``: the
    connection ended without the client's close frame (its peer vanished, or the network
    between them failed), as far as the server can tell."""

    def __init__(self, *, lost: bool = False) -> None:
        super().__init__("connection lost" if lost else "closed by the client")
        self.lost = lost


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

    async def send_many(self, messages: Sequence[str | bytes]) -> None:
        """Send each message (Quart writes them one by one)."""
        for message in messages:
            await websocket.send(message)

    def direct_ready(self) -> bool:
        """False: Quart's socket is out of reach."""
        return False

    def send_now(self, messages: Sequence[str | bytes]) -> bool:
        """Never called (:meth:`direct_ready` is False)."""
        raise RuntimeError("QuartSocket cannot write without waiting")

    async def receive(self) -> str | bytes:
        """The next message (Quart hands an empty binary message over as None)."""
        message = await websocket.receive()
        return b"" if message is None else message

    def receive_ready(self) -> str | bytes | None:
        """None: Quart offers no look at its queue (each message is awaited)."""
        return None

    async def close(self, code: int, reason: str) -> None:
        """Close with ``code``."""
        await websocket.close(code, reason)

    def handle_inline(
        self,
        handler: InlineHandler | None,
        most: int = INLINE_MOST,
        most_bytes: int | None = INLINE_BYTES,
        done: Callable[[], None] | None = None,
    ) -> None:
        """Nothing: Quart's reader is out of reach (every message arrives through ``receive``)."""


class AsgiSocket:
    """:class:`Socket` straight over an ASGI ``websocket`` connection; on Hypercorn, with
    ``fast_receive`` (the default), the client's plain frames are parsed directly
    (``mux.fast_receive``)."""

    def __init__(self, scope: Scope, receive: Receive, send: Send, *, fast_receive: bool = True) -> None:
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
        stream = getattr(send, "__self__", None)
        self._stream = stream if isinstance(stream, _WSStream) else None
        """Hypercorn's stream behind ``send`` (for :meth:`send_many`), else None."""
        self._wire = wire_under(self._stream) if self._stream is not None else None
        """Direct writes when the stream is HTTP/1.1 on plain TCP or on TLS."""
        self.inline: InlineHandler | None = None
        """Set by :meth:`handle_inline`."""
        self.inline_most = INLINE_MOST
        """At most this many messages of one read go to ``inline``..."""
        self.inline_bytes: int | None = INLINE_BYTES
        """... and none after this many characters or bytes of them (None: no bound)."""
        self.inline_done: Callable[[], None] | None = None
        """Called after the last message of a read that went to ``inline``."""
        self.inline_failure: Exception | None = None
        """What ``inline`` (or ``inline_done``) raised, for the app's next ``receive``."""
        self._rest = b""
        """The part of a :meth:`send_now` write the socket did not take: written before anything else."""
        if self._stream is not None and fast_receive:
            self._stream.handle = FastReceive(self._stream, self)  # type: ignore[method-assign]
        queue = getattr(receive, "__self__", None)
        self._receive_nowait = queue.receive_nowait if isinstance(queue, trio.MemoryReceiveChannel) else None
        """The server's queue of received events behind ``receive`` (Hypercorn's is a trio
        memory channel; for :meth:`receive_ready`), else None."""
        self._held: MutableMapping[str, Any] | None = None
        """An event other than a message that ``receive_ready`` took: ``receive`` reports it."""

    async def accept(self, subprotocol: str | None) -> None:
        """Wait for the client's connect event, then accept."""
        event = await self._receive()
        if event["type"] != "websocket.connect":
            self.closed = True
            raise Disconnected()
        await self._send({"type": "websocket.accept", "subprotocol": subprotocol, "headers": []})
        handle = getattr(self._stream, "handle", None)
        if isinstance(handle, FastReceive):
            handle.prepare()

    async def send(self, message: str | bytes) -> None:
        """Send one message (nothing once closed)."""
        await self.send_many((message,))

    async def _send_asgi(self, message: str | bytes) -> None:
        if isinstance(message, str):
            await self._send({"type": "websocket.send", "text": message})
        else:
            await self._send({"type": "websocket.send", "bytes": message})

    async def send_many(self, messages: Sequence[str | bytes]) -> None:
        """Send ``messages`` in one write through Hypercorn's stream when there is one and it
        is open (straight onto the socket when it can: ``mux.direct_writes``); otherwise
        one by one (nothing once closed)."""
        if self.closed:
            self._rest = b""
            return
        if self._rest:
            await self.flush_rest()
        if not messages:
            return
        stream = self._stream
        if stream is None or stream.closed or stream.state != _WSState.CONNECTED:
            for message in messages:
                await self._send_asgi(message)
            return
        connection = stream.connection
        if _plain(connection):
            data = server_frames(messages)
        else:
            encode = connection.send
            try:
                data = b"".join(
                    encode(TextMessage(data=m) if isinstance(m, str) else BytesMessage(data=m)) for m in messages
                )
            except LocalProtocolError:  # the connection is closing: as Hypercorn's own send does
                return
        wire = self._wire
        if wire is not None and wire.ready():
            await trio.lowlevel.checkpoint_if_cancelled()  # cancelled: nothing is written (as trio's send)
            rest = wire.write(data)
            if not rest and not wire.broken:
                await trio.lowlevel.cancel_shielded_checkpoint()  # others' turn; written is written
                return
            if rest and not (wire.plain and len(rest) == len(data)):  # begun, or encrypted:
                self._rest = rest  # it follows, cancelled or not
                await self.flush_rest()
                return
        # nothing went out (or the TLS failed): Hypercorn's path, waiting for the socket
        await stream.send(_HypercornData(stream_id=stream.stream_id, data=data))

    def direct_ready(self) -> bool:
        """True on HTTP/1.1 over plain TCP while the connection is open with no extension,
        nothing is left of an earlier :meth:`send_now` and Hypercorn is not writing. Never
        over TLS: a write in each reader's turn there cuts the stream into more, smaller
        records than the connection's writer makes, and a client pays per record (a Python
        client relaying acknowledged frames, 64 in flight: about a fifth fewer frames a
        second); the writer's own writes still go straight through the TLS (``send_many``)."""
        stream, wire = self._stream, self._wire
        return (
            wire is not None
            and wire.plain
            and stream is not None
            and not self.closed
            and not self._rest
            and wire.ready()
            and not stream.closed
            and stream.state == _WSState.CONNECTED
            and _plain(stream.connection)
        )

    def send_now(self, messages: Sequence[str | bytes]) -> bool:
        """Only when :meth:`direct_ready`: one non-blocking write of ``messages``; True when
        the socket took it all. Else what it did not take is kept: :meth:`send_many`,
        :meth:`close` and the reader (before it lets Hypercorn write a pong) write it first,
        so no other bytes get into a frame begun."""
        assert self._wire is not None
        self._rest = self._wire.write(server_frames(messages))
        return not self._rest

    async def flush_rest(self) -> None:
        """Write what a direct write left (under Hypercorn's lock, waiting for the socket),
        shielded: a frame begun is never left half sent."""
        rest, self._rest = self._rest, b""
        if rest and self._wire is not None:
            with trio.CancelScope(shield=True):
                await self._wire.write_rest(rest)

    async def receive(self) -> str | bytes:
        """The next message; :class:`Disconnected` once the peer went away."""
        event, self._held = self._held, None
        return self._message(event if event is not None else await self._receive())

    def handle_inline(
        self,
        handler: InlineHandler | None,
        most: int = INLINE_MOST,
        most_bytes: int | None = INLINE_BYTES,
        done: Callable[[], None] | None = None,
    ) -> None:
        """While this app waits in :meth:`receive` with nothing queued, hand up to ``most``
        messages of each read to ``handler`` in Hypercorn's reader, none after ``most_bytes``
        of them (None: no byte bound), then call ``done`` (fast receive only: ``mux.fast_receive``);
        a ``handler`` of None stops it."""
        self.inline = handler
        self.inline_most = most
        self.inline_bytes = most_bytes
        self.inline_done = done

    def receive_ready(self) -> str | bytes | None:
        """The next message if the server has already queued it for us, else None (a
        disconnect is kept for the next :meth:`receive`)."""
        if self._receive_nowait is None or self._held is not None or self.closed:
            return None
        try:
            event = self._receive_nowait()
        except trio.WouldBlock:
            return None
        if event["type"] != "websocket.receive":
            self._held = event
            return None
        return self._message(event)

    def _message(self, event: MutableMapping[str, Any]) -> str | bytes:
        kind = event["type"]
        if kind == "websocket.receive":
            text = event.get("text")
            if text is not None:
                return str(text)
            return bytes(event.get("bytes") or b"")
        if kind == INLINE_FAILED:
            failure, self.inline_failure = self.inline_failure, None
            assert failure is not None
            raise failure
        self.closed = True
        stream = self._stream  # its WebSocket still open: no close frame came before the end
        raise Disconnected(lost=stream is not None and stream.connection.state is _WSConnectionState.OPEN)

    async def close(self, code: int, reason: str) -> None:
        """Close with ``code`` (once)."""
        if self.closed:
            return
        if self._rest:
            await self.flush_rest()
        self.closed = True
        await self._send({"type": "websocket.close", "code": code, "reason": reason})


def _plain(connection: _WSConnection) -> bool:
    """True when ``connection`` (wsproto, server side) would frame a whole message exactly as
    :func:`server_frames` does: open, no extension negotiated, no message half sent."""
    proto = getattr(connection, "_proto", None)
    return (
        connection.state is _WSConnectionState.OPEN
        and proto is not None
        and not proto.extensions
        and not proto.client
        and proto._outbound_opcode is None
    )


class FastSocketApp:
    """An ASGI app: WebSocket requests to ``path`` go to ``handler`` with an
    :class:`AsgiSocket`; everything else goes to ``app`` (the Quart app)."""

    def __init__(
        self, app: Any, path: str, handler: Callable[[AsgiSocket], Awaitable[None]], *, fast_receive: bool = True
    ) -> None:
        self.app = app
        self.path = path
        self.handler = handler
        self.fast_receive = fast_receive
        """Parse clients' plain data frames directly (``AsgiSocket(fast_receive=...)``)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Route one ASGI connection."""
        if scope["type"] == "websocket" and scope.get("path") == self.path:
            await self.handler(AsgiSocket(scope, receive, send, fast_receive=self.fast_receive))
            return
        await self.app(scope, receive, send)
