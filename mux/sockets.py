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

Several messages, one write: :meth:`Socket.send_many` puts messages queued together on the
wire in one write. Over Hypercorn (0.18) :class:`AsgiSocket` encodes each message as its
own WebSocket frame and hands Hypercorn the joined bytes: one pass down its stack and one
``send`` system call for all of them instead of one each. The frames are built directly
(``mux.wsframes``) when the connection negotiated no extension and is open with no message
half sent; otherwise (permessage-deflate, say) through the connection's own wsproto
``Connection``. Under any other ASGI server, or before the handshake, it sends them one by
one.

Receiving, the same in reverse: on Hypercorn, unless ``fast_receive=False``,
:class:`AsgiSocket` puts its own handler in front of the stream's ``handle``. Once the
connection is open with no extension negotiated, it takes whole text and binary messages
out of the client's bytes itself (``mux.wsframes.ClientFrames``) and puts them on the
app's queue as Hypercorn would; pings and pongs, and from any other frame on every byte,
go to Hypercorn and wsproto, which answer as without it (tests/test_fast_receive.py; a
malformed payload is only found once its frame is whole).

Reading the socket: on HTTP/1.1 over plain TCP, once the connection is open and Hypercorn's
HTTP/1.1 protocol only passes bytes through, :class:`_LeanRead` takes the place of trio's
``receive_some`` on the socket: each read goes straight to the stream's ``handle``, past
Hypercorn's read loop (its timeout scope and events, the protocol's pass-through) and trio's
socket wrappers (a checkpoint before and a scheduler pass after every read that found data);
it lets other tasks run every ``LEAN_READS_PER_YIELD`` reads that did not wait, and hands
the end of the stream, errors and every read once the stream closes back to Hypercorn. Over
TLS (trio's ``SSLStream``), :class:`_LeanTLSRead` does the same with the connection's own
SSLObject: the socket's bytes go into its incoming BIO and what it decrypts to ``handle``;
anything but plain reading (the transport's end, a TLS error or close, the TLS layer having
something to send) goes on in trio's ``receive_some``, on the same SSLObject.

Handling in the reader: :meth:`AsgiSocket.handle_inline` gives the fast path a plain
function for messages. While the app's task waits in :meth:`~AsgiSocket.receive` with
nothing queued, each message the reader takes apart goes to that function at once (at most
``most`` of a read, and none after ``most_bytes`` of them) instead of through the queue and a
wake of the app's task; a message
it declines (False), and every message while the app's task is busy, is queued as before,
so the app sees every message once and in order. An exception in the function is raised
by the app's next ``receive``, as if the app had handled that message itself.

Writing straight to the socket: on HTTP/1.1, while Hypercorn is not writing itself,
:meth:`AsgiSocket.send_many` puts its bytes on the socket with one non-blocking ``write``
(:class:`_PlainWire`); over TLS it first encrypts them with the connection's own SSLObject,
while trio is not writing either, so the records stay in order (:class:`_TLSWire`). What
does not fit goes on under Hypercorn's lock, waiting for the socket, before anything else
(plain bytes down Hypercorn's own path, ciphertext as it is); every write over HTTP/2 goes
down Hypercorn's path, which meets a broken connection as it always does.

Writing without waiting: :meth:`AsgiSocket.send_now` is that one write from code that cannot
wait (the node's reader, at the end of its turn: ``mux.outbox.WriteThrough``), when
:meth:`~AsgiSocket.direct_ready` (on plain TCP only). What the socket does not take is kept and written before
anything else: by the next ``send_many`` or ``close``, or by the reader before it lets
Hypercorn answer a ping, so no other bytes ever land inside a frame begun.
"""

from __future__ import annotations

import math
import os
import socket
import ssl
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any, Protocol, cast
from urllib.parse import parse_qsl

import trio
from hypercorn.events import Closed as _Closed
from hypercorn.protocol.events import Data as _HypercornData
from hypercorn.protocol.h11 import H11Protocol as _H11Protocol
from hypercorn.protocol.h11 import H11WSConnection as _H11WSConnection
from hypercorn.protocol.ws_stream import ASGIWebsocketState as _WSState
from hypercorn.protocol.ws_stream import WSStream as _WSStream
from hypercorn.trio.tcp_server import TCPServer as _TCPServer
from quart import websocket
from wsproto.connection import Connection as _WSConnection
from wsproto.connection import ConnectionState as _WSConnectionState
from wsproto.events import BytesMessage, TextMessage
from wsproto.utilities import LocalProtocolError

from .wire import CHUNK_BYTES
from .wsframes import ClientFrames, Passed, server_frames

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
    ``fast_receive`` (the default), the client's plain frames are parsed directly (see the
    module)."""

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
        self._wire = _wire_under(self._stream) if self._stream is not None else None
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
            self._stream.handle = _FastReceive(self._stream, self)  # type: ignore[method-assign]
            _LeanRead.install(self._stream)
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
        is open (straight onto a plain TCP socket when it can: see the module); otherwise
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
        of them (None: no byte bound), then call ``done`` (fast receive only; see the module);
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
        if kind == _INLINE_FAILED:
            failure, self.inline_failure = self.inline_failure, None
            assert failure is not None
            raise failure
        self.closed = True
        raise Disconnected()

    async def close(self, code: int, reason: str) -> None:
        """Close with ``code`` (once)."""
        if self.closed:
            return
        if self._rest:
            await self.flush_rest()
        self.closed = True
        await self._send({"type": "websocket.close", "code": code, "reason": reason})


_INLINE_FAILED = "mux.inline_failed"
"""Queued for the app when its inline handler raised (``AsgiSocket.inline_failure``)."""


def _h11_under(stream: _WSStream) -> tuple[_H11Protocol, _TCPServer] | None:
    """Hypercorn's HTTP/1.1 protocol and TCP server under ``stream``, else None (HTTP/2)."""
    proto = getattr(stream.send, "__self__", None)
    if not isinstance(proto, _H11Protocol):
        return None
    tcp = getattr(proto.send, "__self__", None)
    return (proto, tcp) if isinstance(tcp, _TCPServer) else None


def _tls_known(tls: Any) -> bool:
    """True when ``tls`` is trio's ``SSLStream`` over a plain socket, as this module knows it:
    its SSLObject, memory BIOs, inner send lock, state and delayed handshake bytes."""
    return (
        isinstance(tls, trio.SSLStream)
        and isinstance(tls.transport_stream, trio.SocketStream)
        and isinstance(getattr(tls, "_ssl_object", None), ssl.SSLObject)
        and isinstance(getattr(tls, "_incoming", None), ssl.MemoryBIO)
        and isinstance(getattr(tls, "_outgoing", None), ssl.MemoryBIO)
        and isinstance(getattr(tls, "_inner_send_lock", None), trio.StrictFIFOLock)
        and hasattr(getattr(tls, "_state", None), "name")
        and hasattr(tls, "_delayed_outgoing")
    )


class _PlainWire:
    """Direct writes onto the plain TCP socket under a Hypercorn HTTP/1.1 connection."""

    __slots__ = ("lock", "sock", "stream")
    plain = True
    """What :meth:`write` leaves is the data's own tail (nothing is begun when it is all)."""
    broken = False

    def __init__(self, tcp: Any, stream: _WSStream) -> None:
        self.lock: trio.Lock = tcp.send_lock
        self.sock: trio.SocketStream = tcp.stream
        self.stream = stream

    def ready(self) -> bool:
        """True while Hypercorn is not writing."""
        return not self.lock.locked()

    def write(self, data: bytes) -> bytes:
        """Put ``data`` on the socket without waiting; what it did not take."""
        return data[_write_some(self.sock, data) :]

    async def write_rest(self, rest: bytes) -> None:
        """Write ``rest`` (of :meth:`write`) through Hypercorn: its lock, waiting for room."""
        stream = self.stream
        if not stream.closed:
            await stream.send(_HypercornData(stream_id=stream.stream_id, data=rest))


class _TLSWire:
    """Direct writes through the TLS under a Hypercorn HTTP/1.1 connection (trio's
    ``SSLStream``): the connection's own SSLObject encrypts, so its records stay in order,
    and the ciphertext goes onto the socket with one non-blocking write. Ready only while
    neither Hypercorn nor trio is writing (trio takes its ciphertext out of the BIO and its
    send lock in one step) and nothing of the handshake waits to be sent."""

    __slots__ = ("broken", "tcp", "tls")
    plain = False
    """What :meth:`write` leaves is ciphertext: it must follow, as it is."""

    def __init__(self, tcp: Any) -> None:
        self.tcp = tcp
        self.tls: Any = tcp.stream
        self.broken = False

    def ready(self) -> bool:
        """True while the TLS is open and nobody else writes."""
        tls = self.tls
        return (
            not self.broken
            and not self.tcp.send_lock.locked()
            and not tls._inner_send_lock.locked()
            and tls._delayed_outgoing is None
            and tls._state.name == "OK"
        )

    def write(self, data: bytes) -> bytes:
        """Encrypt ``data`` and put it on the socket without waiting; the ciphertext it did
        not take. When the TLS fails, nothing (and ``broken``: Hypercorn's path, which the
        caller takes then, meets the failure and closes)."""
        tls = self.tls
        try:
            tls._ssl_object.write(data)
        except ssl.SSLError:
            self.broken = True
            return b""
        wire: bytes = tls._outgoing.read()
        return wire[_write_some(tls.transport_stream, wire) :]

    async def write_rest(self, rest: bytes) -> None:
        """Write ciphertext ``rest`` (of :meth:`write`) as it is, under Hypercorn's and
        trio's send locks, waiting for room; a broken socket closes as Hypercorn's does."""
        tcp, tls = self.tcp, self.tls
        async with tcp.send_lock, tls._inner_send_lock:
            try:
                await tls.transport_stream.send_all(rest)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.broken = True
                await tcp.protocol.handle(_Closed())


UNSENT_BYTES = CHUNK_BYTES
"""A connection's socket takes more of what the node writes only while less than this much
of it waits there unsent (``TCP_NOTSENT_LOWAT``, where the system has it; one 16 KiB piece of
a large frame). The rest waits in the connection's outbox, still in urgency order, so a
call's frame to a slow reader waits behind about one piece in the socket, not behind the
megabytes a socket's send buffer grows to (measured with a reader taking 2 MB/s: 64 to 112
KB of bulk reached it ahead of the call's frames, 41 ms p50, against 3.3 to 3.9 MB and
1,700 ms with the bound lifted). trio sets 16 KiB on its sockets too; the node does not rely
on that."""


def _bound_unsent(stream: trio.SocketStream) -> None:
    """Set :data:`UNSENT_BYTES` on ``stream``'s socket (nothing where the system lacks it)."""
    option = getattr(socket, "TCP_NOTSENT_LOWAT", None)
    if option is None:
        return
    try:
        stream.setsockopt(socket.IPPROTO_TCP, option, UNSENT_BYTES)
    except OSError:  # not TCP after all, or already closed: nothing to bound
        pass


def _wire_under(stream: _WSStream) -> _PlainWire | _TLSWire | None:
    """How to write straight onto ``stream``'s connection: HTTP/1.1 on plain TCP or on TLS
    (its socket's unsent bytes bounded: :data:`UNSENT_BYTES`)."""
    under = _h11_under(stream)
    if under is None:
        return None
    tcp = under[1]
    if isinstance(tcp.stream, trio.SocketStream):
        _bound_unsent(tcp.stream)
        return _PlainWire(tcp, stream)
    if _tls_known(tcp.stream):
        _bound_unsent(tcp.stream.transport_stream)
        return _TLSWire(tcp)
    return None


def _write_some(stream: trio.SocketStream, data: bytes) -> int:
    """Write what the socket takes now of ``data`` without waiting; 0 when it takes nothing
    or is closed or broken (Hypercorn's own send then meets that and closes as it does)."""
    fd = stream.socket.fileno()
    if fd < 0:
        return 0
    try:
        return os.write(fd, data)
    except OSError:  # EAGAIN (full), EPIPE, ECONNRESET, ...
        return 0


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


class _FastReceive:
    """Hypercorn's ``WSStream.handle`` for one connection, parsing the client's plain data
    frames itself (``mux.wsframes.ClientFrames``) and putting each message on the app's
    queue as Hypercorn would; every other event, and every byte the parser hands on, goes
    to the stream's own ``handle`` (wsproto). A connection that negotiated an extension,
    or is no longer open, is left to Hypercorn entirely."""

    def __init__(self, stream: _WSStream, sock: AsgiSocket) -> None:
        self._stream = stream
        self._sock = sock
        self._stock = stream.handle
        self._frames: ClientFrames | None = None

    async def __call__(self, event: Any) -> None:
        stream = self._stream
        sock = self._sock
        if not isinstance(event, _HypercornData) or stream.closed or stream.state != _WSState.CONNECTED:
            await self._stock_after_rest(event)
            if stream.closed:  # the stream and this handler would hold each other until a GC pass
                stream.__dict__.pop("handle", None)
            return
        frames = self._frames
        if frames is None:
            proto = getattr(stream.connection, "_proto", None)
            if proto is None or proto.extensions or proto.client:
                del stream.handle  # Hypercorn's own from now on
                await self._stock_after_rest(event)
                return
            frames = self._frames = ClientFrames(stream.config.websocket_max_message_size)
        if frames.off:
            await self._stock_after_rest(event)
            return
        frames.feed(event.data)
        put = stream.app_put
        assert put is not None
        queue: trio.MemorySendChannel[Any] = put.__self__  # type: ignore[attr-defined]
        inline = sock.inline
        # Inline only while the app's task waits in receive() on an empty queue. Nothing
        # but this reader puts on that queue, and the handler never waits, so that holds
        # until this reader puts or waits itself: after that, the rest of the read queues.
        # inline_done runs after the last message handled here, before this reader waits.
        most = sock.inline_most if inline is not None and queue.statistics().tasks_waiting_receive else 0
        room = sock.inline_bytes if sock.inline_bytes is not None else math.inf
        handled = False  # messages went to inline since inline_done was last called
        try:
            while not stream.closed:
                if stream.connection.state is not _WSConnectionState.OPEN:  # closing: wsproto's part
                    if handled:
                        handled = False
                        await self._done(put)
                    rest = frames.stop()
                    if rest:
                        await self._stock_after_rest(_HypercornData(stream_id=stream.stream_id, data=rest))
                    return
                item = frames.next()
                if item is None:  # the read's end
                    if handled:
                        handled = False
                        await self._done(put)
                    return
                if most and not isinstance(item, Passed):
                    most -= 1
                    handled = True
                    try:
                        if inline(item):  # type: ignore[misc]
                            room -= len(item)
                            if room <= 0:  # past the byte bound: the rest of the read is the app's
                                most = 0
                            continue
                    except Exception as exc:
                        handled, most = False, 0
                        if sock.inline_failure is None:  # the handler's failure is the one raised
                            sock.inline_failure = exc
                        self._call_done()
                        await self._fail(exc, put)
                        continue
                most = 0
                if handled:
                    handled = False
                    await self._done(put)
                if isinstance(item, str):
                    await put({"type": "websocket.receive", "bytes": None, "text": item})
                elif isinstance(item, bytes):
                    await put({"type": "websocket.receive", "bytes": item, "text": None})
                else:
                    await self._stock_after_rest(_HypercornData(stream_id=stream.stream_id, data=item.raw))
        finally:
            if handled:  # never leave inline_done uncalled, however this ends
                self._call_done()

    def _call_done(self) -> Exception | None:
        """Call the socket's ``inline_done``; what it raised (then neither it nor ``inline``
        is called again: nothing is handled here that would need it)."""
        sock = self._sock
        done = sock.inline_done
        if done is None:
            return None
        try:
            done()
        except Exception as exc:
            sock.inline = sock.inline_done = None
            if sock.inline_failure is None:
                sock.inline_failure = exc
            return exc
        return None

    async def _done(self, put: Callable[[Any], Awaitable[None]]) -> None:
        """After the last message of a run handled inline: ``inline_done``, before this
        reader waits for anything; a failure ends the app as the handler's would."""
        exc = self._call_done()
        if exc is not None:
            await self._fail(exc, put)

    async def _fail(self, exc: Exception, put: Callable[[Any], Awaitable[None]]) -> None:
        """Stop handling inline; the app's next ``receive`` raises the first failure."""
        sock = self._sock
        sock.inline = None
        if sock.inline_failure is None or sock.inline_failure is exc:
            sock.inline_failure = exc
            await put({"type": _INLINE_FAILED})

    async def _stock_after_rest(self, event: Any) -> None:
        """Hypercorn's own handling of ``event`` (which may write: a pong, a close), after
        what is left of a direct write."""
        if self._sock._rest:
            await self._sock.flush_rest()
        await self._stock(event)


LEAN_READS_PER_YIELD = 4
"""The lean reader (:class:`_LeanRead`) lets other tasks run after this many reads in a row
that found data without waiting (a read that waits has let them run already)."""


class _LeanRead:
    """``receive_some`` of a WebSocket connection's plain TCP socket, in place of trio's,
    while Hypercorn's HTTP/1.1 protocol only passes bytes through to the WebSocket stream:
    each read goes straight to the stream's ``handle`` (the fast receive), skipping for
    every read Hypercorn's read loop (its timeout scope, its ``RawData`` and the HTTP/1.1
    protocol's pass-through) and trio's socket wrappers (their checkpoint before and
    scheduler pass after every read that found data). It returns to Hypercorn's loop only
    what that loop must see: the end of the stream, a read the stream no longer takes this
    way (before the handshake is done, once closed), or an error (then through trio's own
    ``receive_some``, which raises it as trio does). Not installed when Hypercorn has a read
    timeout."""

    def __init__(self, sock: trio.SocketStream, proto: _H11Protocol, stream: _WSStream) -> None:
        self._proto = proto
        self._stream = stream
        self._socket: Any = sock
        self._raw: socket.socket = sock.socket._sock  # type: ignore[attr-defined]

    @staticmethod
    def install(stream: _WSStream) -> None:
        """Read ``stream``'s connection this way when it is HTTP/1.1 on plain TCP or TLS (then
        :class:`_LeanTLSRead`) with no read timeout; else leave it to Hypercorn."""
        under = _h11_under(stream)
        if under is None or under[1].config.read_timeout:
            return
        proto, tcp = under
        sock: Any = tcp.stream
        if isinstance(sock, trio.SocketStream):
            sock.receive_some = _LeanRead(sock, proto, stream)  # type: ignore[method-assign]
        elif _tls_known(sock):
            sock.receive_some = _LeanTLSRead(sock, proto, stream)

    def _passing_through(self) -> bool:
        """True while Hypercorn would hand every read, as it is, to this stream's ``handle``."""
        proto, stream = self._proto, self._stream
        connection = proto.connection
        return (
            proto.stream is stream
            and isinstance(connection, _H11WSConnection)
            and not connection.buffer
            and not stream.closed
        )

    def _read(self, size: int) -> bytes | None:
        """One non-blocking read: its bytes (b"" at the end of the stream), ``_WAIT`` when
        there is nothing yet, or None when the read is trio's to make (an error)."""
        try:
            return self._raw.recv(size)
        except BlockingIOError:
            return _WAIT
        except OSError:
            self._drop()
            return None  # trio's receive_some meets it again and raises as it does

    async def _stock(self, max_bytes: int | None) -> bytes:
        """trio's own ``receive_some``."""
        return await trio.SocketStream.receive_some(self._socket, max_bytes)

    async def __call__(self, max_bytes: int | None = None) -> bytes:
        size = max_bytes or _LEAN_RECV
        raw = self._raw
        stream = self._stream
        in_a_row = 0
        try:
            while self._passing_through():
                await trio.lowlevel.checkpoint_if_cancelled()  # cancelled: no more reads, as trio's
                data = self._read(size)
                if data is _WAIT:
                    in_a_row = 0
                    await trio.lowlevel.wait_readable(raw)
                    continue
                if data is None:
                    break
                if not data:
                    self._drop()
                    return data  # the end: Hypercorn closes
                await stream.handle(_HypercornData(stream_id=stream.stream_id, data=data))
                in_a_row += 1
                if in_a_row >= LEAN_READS_PER_YIELD:
                    in_a_row = 0
                    await trio.lowlevel.checkpoint()
        except BaseException:
            self._drop()  # cancelled or failed: Hypercorn's read loop ends
            raise
        if stream.closed:
            self._drop()
        return await self._stock(max_bytes)

    def _drop(self) -> None:
        """Hypercorn's and trio's own reads from now on (and nothing left holding this
        connection's objects in a cycle)."""
        self._socket.__dict__.pop("receive_some", None)


_LEAN_RECV = 2**16
_WAIT = b"wait"
"""What a lean read step returns when the socket has nothing yet (compared by identity)."""


class _LeanTLSRead(_LeanRead):
    """:class:`_LeanRead` over TLS, in place of trio's ``SSLStream.receive_some``: the
    socket's bytes go into the stream's own SSLObject (its incoming BIO) and what it decrypts
    straight to the WebSocket stream's ``handle``. Whatever is not plain reading goes to
    trio's ``receive_some`` on the same SSLObject, which goes on from where this left off: the
    transport's end, a TLS error, a close, or the TLS layer having something to send (a key
    update: trio sends it)."""

    def __init__(self, sock: trio.SSLStream[Any], proto: _H11Protocol, stream: _WSStream) -> None:
        self._proto = proto
        self._stream = stream
        self._socket = sock
        self._raw = sock.transport_stream.socket._sock

    def _read(self, size: int) -> bytes | None:
        """Decrypted bytes, ``_WAIT`` when the socket has nothing yet, or None: trio's turn."""
        tls = self._socket
        obj: ssl.SSLObject = tls._ssl_object
        while tls._state.name == "OK":
            try:
                data = obj.read(size)
            except ssl.SSLWantReadError:
                if tls._outgoing.pending:
                    return None  # the TLS layer has something to send
                try:
                    received = self._raw.recv(size)
                except BlockingIOError:
                    return _WAIT
                except OSError:
                    return None  # trio's receive_some meets it again and raises as it does
                if not received:
                    return None  # the transport's end: trio's receive_some says what it means
                tls._incoming.write(received)
                continue
            except ssl.SSLError:
                return None  # as trio's receive_some finds it
            return data or None  # b"": the peer's close_notify, which trio's receive_some returns
        return None

    async def _stock(self, max_bytes: int | None) -> bytes:
        """trio's own ``SSLStream.receive_some``, on the same SSLObject."""
        return cast(bytes, await trio.SSLStream.receive_some(self._socket, max_bytes))  # SSLObject.read: bytes


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
