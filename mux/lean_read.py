"""The node's own read loop for each TCP connection, in place of Hypercorn's.

How this works: :class:`LeanTCPServer` is Hypercorn's ``TCPServer`` (the task that serves one
TCP connection) with its read loop replaced by :class:`LeanReader`'s. The reader reads the
socket itself without blocking, past trio's socket wrappers (over TLS, through the
connection's own SSLObject), and when the socket has nothing waits on its
:class:`~mux.readiness.Park`, so a wait makes no objects (``mux.readiness`` says why that
matters). Once the connection is an open WebSocket (Hypercorn's HTTP/1.1 protocol only passes
bytes through to the stream), each read goes straight to the stream's ``handle`` (the fast
receive, ``mux.fast_receive``); before that (the handshake, plain HTTP requests) and on any
other protocol, to Hypercorn's protocol, as its own loop would. Unlike Hypercorn's loop it
makes no timeout scope per read, and it makes nothing at a connection's first message that
outlives the read. It lets other tasks run every :data:`LEAN_READS_PER_YIELD` reads that did
not wait. Anything but plain reading (an error, the TLS layer having something to send, a
peer's close over TLS) goes to trio's own ``receive_some``, which raises as it does. Where
trio's I/O manager is not the epoll manager ``mux.readiness`` knows, the reader waits with
trio's ``wait_readable``; a read timeout (``read_timeout``) or a stream this module does not
know keeps Hypercorn's loop.
"""

from __future__ import annotations

import socket
import ssl
import types
from collections.abc import Callable, Generator
from typing import Any, cast

import trio
from hypercorn.events import Closed, RawData
from hypercorn.protocol.events import Data
from hypercorn.protocol.h11 import H11Protocol, H11WSConnection
from hypercorn.protocol.ws_stream import WSStream
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer

from . import hypercorn_conn
from .readiness import Park

__all__ = ["LEAN_READS_PER_YIELD", "LeanReader", "LeanTCPServer"]

LEAN_READS_PER_YIELD = 4
"""A reader lets other tasks run after this many reads in a row that found data without
waiting (a read that waits has let them run already)."""

_WAIT = b"wait"
"""What a read step returns when the socket has nothing yet (compared by identity)."""


class LeanTCPServer(TCPServer):
    """Hypercorn's ``TCPServer`` read by a :class:`LeanReader` when its stream is a plain
    trio socket or trio's TLS over one, and Hypercorn has no read timeout."""

    async def _read_data(self) -> None:
        reader = LeanReader.over(self) if not self.config.read_timeout else None
        if reader is None:
            await super()._read_data()
        else:
            await reader.run()


class LeanReader:
    """Reads one connection's socket until its end and hands on every read (the module's
    docstring says where). Made when the connection starts; :meth:`run` is the whole loop."""

    def __init__(self, tcp: TCPServer, raw: socket.socket) -> None:
        self._tcp = tcp
        self._raw = raw
        self._park: Park | None = Park.open(raw.fileno())
        """None where trio's I/O manager is not one ``mux.readiness`` knows: trio's own waits."""
        self._read: Callable[[], bytes | None] = self._read_plain
        self._tls: trio.SSLStream[Any] | None = None

    @classmethod
    def over(cls, tcp: TCPServer) -> LeanReader | None:
        """A reader for ``tcp``'s stream when this module knows it (plain or TLS), else None."""
        stream: Any = tcp.stream
        if isinstance(stream, trio.SocketStream):
            return cls(tcp, stream.socket._sock)  # type: ignore[attr-defined]
        if hypercorn_conn.tls_known(stream):
            reader = cls(tcp, stream.transport_stream.socket._sock)
            reader._tls = stream
            reader._read = reader._read_tls
            return reader
        return None

    def _target(self) -> WSStream | None:
        """The WebSocket stream a read goes straight to, while Hypercorn's HTTP/1.1 protocol
        would only pass it through (else None: Hypercorn's protocol takes it)."""
        proto = getattr(self._tcp.protocol, "protocol", None)
        if not isinstance(proto, H11Protocol):
            return None
        stream = proto.stream
        connection = proto.connection
        if (
            isinstance(stream, WSStream)
            and isinstance(connection, H11WSConnection)
            and not connection.buffer
            and not stream.closed
        ):
            return stream
        return None

    def _read_plain(self) -> bytes | None:
        """One non-blocking read: its bytes (b"" at the end of the stream), ``_WAIT`` when
        there is nothing yet, or None when the read is trio's to make (an error)."""
        try:
            return self._raw.recv(MAX_RECV)
        except BlockingIOError:
            return _WAIT
        except OSError:
            return None  # trio's receive_some meets it again and raises as it does

    def _read_tls(self) -> bytes | None:
        """Decrypted bytes, ``_WAIT`` when the socket has nothing yet, or None: trio's turn
        (the transport's end, a TLS error or close, the TLS layer having something to send)."""
        tls: Any = self._tls
        obj: ssl.SSLObject = tls._ssl_object
        while tls._state.name == "OK":
            try:
                data = obj.read(MAX_RECV)
            except ssl.SSLWantReadError:
                if tls._outgoing.pending:
                    return None  # the TLS layer has something to send
                try:
                    received = self._raw.recv(MAX_RECV)
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

    async def _stock(self) -> bytes:
        """trio's own ``receive_some`` on the stream (it raises what it meets)."""
        stream: Any = self._tcp.stream
        if self._tls is not None:
            return cast(bytes, await trio.SSLStream.receive_some(stream, MAX_RECV))
        return await trio.SocketStream.receive_some(stream, MAX_RECV)

    async def run(self) -> None:
        """Read and hand on until the end of the stream, an error or a close; then tell
        Hypercorn's protocol the connection closed, as its loop does."""
        await self._loop()

    @types.coroutine
    def _loop(self) -> Generator[Any, Any, None]:
        """:meth:`run`'s loop, a generator-based coroutine so that it can yield the park's
        trap to trio itself (``mux.readiness`` says why)."""
        tcp = self._tcp
        park = self._park
        read = self._read
        in_a_row = 0
        try:
            while True:
                yield from trio.lowlevel.checkpoint_if_cancelled()  # noqa: ASYNC105  (awaited: yield from)
                data = read()
                if data is _WAIT:
                    in_a_row = 0
                    if park is not None:  # outside any except block: a waiting task holds no exception
                        (yield park.arm()).unwrap()
                    else:
                        yield from trio.lowlevel.wait_readable(self._raw)  # noqa: ASYNC105  (awaited: yield from)
                    continue
                if data is None:
                    data = yield from self._stock()
                stream = self._target() if data else None
                if stream is not None:
                    yield from stream.handle(Data(stream_id=stream.stream_id, data=data))
                else:
                    yield from tcp.protocol.handle(RawData(data))
                    if not data:
                        break
                in_a_row += 1
                if in_a_row >= LEAN_READS_PER_YIELD:
                    in_a_row = 0
                    yield from trio.lowlevel.checkpoint()  # noqa: ASYNC105  (awaited: yield from)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # as Hypercorn's loop: the connection is over
        yield from tcp.protocol.handle(Closed())
