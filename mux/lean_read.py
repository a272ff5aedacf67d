"""Reading a WebSocket connection's socket straight into the stream, past Hypercorn's read loop.

On HTTP/1.1 over plain TCP, once the connection is open and Hypercorn's HTTP/1.1 protocol
only passes bytes through, :class:`LeanRead` takes the place of trio's ``receive_some`` on
the socket: each read goes straight to the stream's ``handle``, past Hypercorn's read loop
(its timeout scope and events, the protocol's pass-through) and trio's socket wrappers (a
checkpoint before and a scheduler pass after every read that found data); it lets other tasks
run every :data:`LEAN_READS_PER_YIELD` reads that did not wait, and hands the end of the
stream, errors and every read once the stream closes back to Hypercorn. Over TLS (trio's
``SSLStream``), :class:`LeanTLSRead` does the same with the connection's own SSLObject: the
socket's bytes go into its incoming BIO and what it decrypts to ``handle``; anything but
plain reading (the transport's end, a TLS error or close, the TLS layer having something to
send) goes on in trio's ``receive_some``, on the same SSLObject.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any, cast

import trio
from hypercorn.protocol.events import Data as _HypercornData
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.h11 import H11WSConnection as _H11WSConnection
from hypercorn.protocol.ws_stream import WSStream

from . import hypercorn_conn

__all__ = ["LEAN_READS_PER_YIELD", "LeanRead", "LeanTLSRead"]

LEAN_READS_PER_YIELD = 4
"""The lean reader (:class:`LeanRead`) lets other tasks run after this many reads in a row
that found data without waiting (a read that waits has let them run already)."""


class LeanRead:
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

    def __init__(self, sock: trio.SocketStream, proto: H11Protocol, stream: WSStream) -> None:
        self._proto = proto
        self._stream = stream
        self._socket: Any = sock
        self._raw: socket.socket = sock.socket._sock  # type: ignore[attr-defined]

    @staticmethod
    def install(stream: WSStream) -> None:
        """Read ``stream``'s connection this way when it is HTTP/1.1 on plain TCP or TLS (then
        :class:`LeanTLSRead`) with no read timeout; else leave it to Hypercorn."""
        under = hypercorn_conn.h11_under(stream)
        if under is None or under[1].config.read_timeout:
            return
        proto, tcp = under
        sock: Any = tcp.stream
        if isinstance(sock, trio.SocketStream):
            sock.receive_some = LeanRead(sock, proto, stream)  # type: ignore[method-assign]
        elif hypercorn_conn.tls_known(sock):
            sock.receive_some = LeanTLSRead(sock, proto, stream)

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


class LeanTLSRead(LeanRead):
    """:class:`LeanRead` over TLS, in place of trio's ``SSLStream.receive_some``: the
    socket's bytes go into the stream's own SSLObject (its incoming BIO) and what it decrypts
    straight to the WebSocket stream's ``handle``. Whatever is not plain reading goes to
    trio's ``receive_some`` on the same SSLObject, which goes on from where this left off: the
    transport's end, a TLS error, a close, or the TLS layer having something to send (a key
    update: trio sends it)."""

    def __init__(self, sock: trio.SSLStream[Any], proto: H11Protocol, stream: WSStream) -> None:
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
