"""Writing straight onto a WebSocket connection's socket, past Hypercorn's send path.

On HTTP/1.1, while Hypercorn is not writing itself, :meth:`mux.sockets.AsgiSocket.send_many`
puts its bytes on the socket with one non-blocking ``write`` (:class:`PlainWire`); over TLS
it first encrypts them with the connection's own SSLObject, while trio is not writing either,
so the records stay in order (:class:`TLSWire`). What does not fit goes on under Hypercorn's
lock, waiting for the socket, before anything else (plain bytes down Hypercorn's own path,
ciphertext as it is); every write over HTTP/2 goes down Hypercorn's path, which meets a
broken connection as it always does.

:meth:`~mux.sockets.AsgiSocket.send_now` is that one write from code that cannot wait (the
node's reader, at the end of its turn: ``mux.outbox.WriteThrough``). What the socket does not
take is kept and written before anything else, so no other bytes ever land inside a frame
begun. Every such socket's unsent bytes are bounded (:data:`UNSENT_BYTES`).
"""

from __future__ import annotations

import os
import socket
import ssl
from typing import Any

import trio
from hypercorn.events import Closed as _Closed
from hypercorn.protocol.events import Data as _HypercornData
from hypercorn.protocol.ws_stream import WSStream

from . import hypercorn_conn
from .wire import CHUNK_BYTES

__all__ = ["UNSENT_BYTES", "PlainWire", "TLSWire", "Wire", "bound_unsent", "wire_under", "write_some"]


class PlainWire:
    """Direct writes onto the plain TCP socket under a Hypercorn HTTP/1.1 connection."""

    __slots__ = ("lock", "sock", "stream")
    plain = True
    """What :meth:`write` leaves is the data's own tail (nothing is begun when it is all)."""
    broken = False

    def __init__(self, tcp: Any, stream: WSStream) -> None:
        self.lock: trio.Lock = tcp.send_lock
        self.sock: trio.SocketStream = tcp.stream
        self.stream = stream

    def ready(self) -> bool:
        """True while Hypercorn is not writing."""
        return not self.lock.locked()

    def write(self, data: bytes) -> bytes:
        """Put ``data`` on the socket without waiting; what it did not take."""
        return data[write_some(self.sock, data) :]

    async def write_rest(self, rest: bytes) -> None:
        """Write ``rest`` (of :meth:`write`) through Hypercorn: its lock, waiting for room."""
        stream = self.stream
        if not stream.closed:
            await stream.send(_HypercornData(stream_id=stream.stream_id, data=rest))


class TLSWire:
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
        return wire[write_some(tls.transport_stream, wire) :]

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


Wire = PlainWire | TLSWire
"""A connection's direct writes."""


UNSENT_BYTES = CHUNK_BYTES
"""A connection's socket takes more of what the node writes only while less than this much
of it waits there unsent (``TCP_NOTSENT_LOWAT``, where the system has it; one 16 KiB piece of
a large frame). The rest waits in the connection's outbox, still in urgency order, so a
call's frame to a slow reader waits behind about one piece in the socket, not behind the
megabytes a socket's send buffer grows to (measured with a reader taking 2 MB/s: 64 to 112
KB of bulk reached it ahead of the call's frames, 41 ms p50, against 3.3 to 3.9 MB and
1,700 ms with the bound lifted). trio sets 16 KiB on its sockets too; the node does not rely
on that."""


def bound_unsent(stream: trio.SocketStream) -> None:
    """Set :data:`UNSENT_BYTES` on ``stream``'s socket (nothing where the system lacks it)."""
    option = getattr(socket, "TCP_NOTSENT_LOWAT", None)
    if option is None:
        return
    try:
        stream.setsockopt(socket.IPPROTO_TCP, option, UNSENT_BYTES)
    except OSError:  # not TCP after all, or already closed: nothing to bound
        pass


def wire_under(stream: WSStream) -> Wire | None:
    """How to write straight onto ``stream``'s connection: HTTP/1.1 on plain TCP or on TLS
    (its socket's unsent bytes bounded: :data:`UNSENT_BYTES`)."""
    under = hypercorn_conn.h11_under(stream)
    if under is None:
        return None
    tcp = under[1]
    if isinstance(tcp.stream, trio.SocketStream):
        bound_unsent(tcp.stream)
        return PlainWire(tcp, stream)
    if hypercorn_conn.tls_known(tcp.stream):
        bound_unsent(tcp.stream.transport_stream)
        return TLSWire(tcp)
    return None


def write_some(stream: trio.SocketStream, data: bytes) -> int:
    """Write what the socket takes now of ``data`` without waiting; 0 when it takes nothing
    or is closed or broken (Hypercorn's own send then meets that and closes as it does)."""
    fd = stream.socket.fileno()
    if fd < 0:
        return 0
    try:
        return os.write(fd, data)
    except OSError:  # EAGAIN (full), EPIPE, ECONNRESET, ...
        return 0
