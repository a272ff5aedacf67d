"""Once a plain-TCP WebSocket is open, ``AsgiSocket`` reads its socket itself
(``mux.lean_read.LeanRead``) and hands each read straight to the stream, past Hypercorn's
read loop and trio's socket wrappers: on a real Hypercorn server, the HTTP/1.1 protocol sees
no more than the handshake, every message and ping is answered as before, a read timeout
keeps Hypercorn's own loop, and a connection whose reads never wait still lets the others
run; on a socket pair, it reads to the end and stops when cancelled, as trio's own."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import types
import urllib.parse
from typing import Any

import h11
import pytest
import trio
from hypercorn.events import RawData
from hypercorn.protocol.h11 import H11Protocol, H11WSConnection
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request
from wsproto.frame_protocol import FrameProtocol

import mux.lean_read
from mux.direct_writes import PlainWire
from mux.lean_read import LeanRead
from mux.sockets import AsgiSocket, Disconnected

from .wsutil import raw_client, serve_raw


class _Echo:
    """Echoes every message; remembers whether its socket was read by the lean reader."""

    def __init__(self, fast: bool = True) -> None:
        self.fast = fast
        self.lean: list[bool] = []
        self.sockets: list[trio.SocketStream] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send_: Any) -> None:
        sock = AsgiSocket(scope, receive, send_, fast_receive=self.fast)
        await sock.accept(None)
        assert isinstance(sock._wire, PlainWire)
        self.sockets.append(sock._wire.sock)
        with contextlib.suppress(Disconnected):
            while True:
                message = await sock.receive()
                self.lean.append(isinstance(sock._wire.sock.__dict__.get("receive_some"), LeanRead))
                await sock.send(message)


def _count_protocol_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the bytes of every read Hypercorn's HTTP/1.1 protocol is handed."""
    reads: list[int] = []
    stock = H11Protocol.handle

    async def handle(self: H11Protocol, event: Any) -> None:
        if isinstance(event, RawData) and event.data:
            reads.append(len(event.data))
        await stock(self, event)

    monkeypatch.setattr(H11Protocol, "handle", handle)
    return reads


@pytest.mark.parametrize("fast", [True, False], ids=["lean", "stock"])
async def test_once_open_reads_go_straight_to_the_stream(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, fast: bool
) -> None:
    """With the fast receive, Hypercorn's protocol is handed only the handshake; every
    message, a ping among them, and a message split across reads are answered as on the
    stock path, and the lean reader is gone once the connection is."""
    reads = _count_protocol_reads(monkeypatch)
    app = _Echo(fast)
    async with raw_client(await serve_raw(nursery, app)) as client:
        got: list[str | bytes] = []
        for i in range(10):
            await client.burst(f"a{i}", None, f"b{i}" * 50)
            got += await client.messages(2)
        whole = bytes(client.frames.send_data(b"x" * 3000))
        await client.stream.send_all(whole[:1000])  # one message, two reads
        await trio.sleep(0.05)
        await client.stream.send_all(whole[1000:])
        got += await client.messages(1)
        pongs = client.pongs
    await trio.sleep(0.2)  # the server meets the end of the stream
    assert [s.__dict__.get("receive_some") for s in app.sockets] == [None]
    assert got == [m for i in range(10) for m in (f"a{i}", f"b{i}" * 50)] + [b"x" * 3000]
    assert pongs == 10
    assert app.lean == [fast] * 21
    if fast:  # the upgrade request, and the read Hypercorn may have been waiting in when the app began
        assert len(reads) <= 2
    else:
        assert len(reads) >= 12


async def test_with_a_read_timeout_hypercorn_reads_as_before(nursery: trio.Nursery) -> None:
    """Hypercorn enforces its ``read_timeout`` in its own loop: the lean reader stays out."""
    app = _Echo()
    async with raw_client(await serve_raw(nursery, app, read_timeout=30)) as client:
        await client.burst("one", "two")
        assert await client.messages(2) == ["one", "two"]
    assert app.lean == [False, False]


def _blocking_client(url: str) -> socket.socket:
    """A WebSocket client on a blocking socket (for a thread), its handshake done."""
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    ws = WSConnection(ConnectionType.CLIENT)
    sock.sendall(ws.send(Request(host=parts.netloc, target="/")))
    while not any(isinstance(e, AcceptConnection) for e in ws.events()):
        data = sock.recv(1 << 16)
        assert data, "the server closed the connection"
        ws.receive_data(data)
    return sock


@pytest.mark.parametrize("per_yield", [mux.lean_read.LEAN_READS_PER_YIELD, 1])
async def test_a_connection_whose_reads_never_wait_lets_others_run(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, per_yield: int
) -> None:
    """A client floods 256 messages of 16 KiB that take 1 ms each to handle, from a thread,
    so its socket never runs dry; another client's message sent once the flood has begun
    is handled long before the flood's end (each reader lets others run every
    ``LEAN_READS_PER_YIELD`` reads)."""
    monkeypatch.setattr(mux.lean_read, "LEAN_READS_PER_YIELD", per_yield)
    flood = [bytes([i]) * 16384 for i in range(256)]
    log: list[str | bytes] = []
    begun = threading.Event()
    everything = trio.Event()

    def inline(message: str | bytes) -> bool:
        if isinstance(message, bytes):
            begun.set()
            time.sleep(0.001)
        log.append(message[:1])
        if len(log) == len(flood) + 1:
            everything.set()
        return True

    async def app(scope: dict[str, Any], receive: Any, send_: Any) -> None:
        sock = AsgiSocket(scope, receive, send_)
        await sock.accept(None)
        sock.handle_inline(inline, 16, None)
        with contextlib.suppress(Disconnected):
            while True:
                log.append(await sock.receive())  # nothing comes here: all is handled inline

    url = await serve_raw(nursery, app)
    flooder = await trio.to_thread.run_sync(_blocking_client, url)
    other = await trio.to_thread.run_sync(_blocking_client, url)
    frames = FrameProtocol(client=True, extensions=[])

    def send_flood() -> None:
        flooder.sendall(b"".join(bytes(frames.send_data(m)) for m in flood))

    def send_other() -> None:
        assert begun.wait(10)
        other.sendall(bytes(FrameProtocol(client=True, extensions=[]).send_data("other")))

    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as clients:
                clients.start_soon(trio.to_thread.run_sync, send_flood)
                clients.start_soon(trio.to_thread.run_sync, send_other)
            await everything.wait()
    finally:
        flooder.close()
        other.close()
    where = log.index("o")
    assert log[:where] == [m[:1] for m in flood[:where]]  # the flood in order around it
    assert where < len(flood) // 2, f"handled after {where} of the flood's {len(flood)} messages"
    nursery.cancel_scope.cancel()


class _Stream:
    """What the lean reader uses of Hypercorn's WebSocket stream: it records each read."""

    def __init__(self) -> None:
        self.closed = False
        self.stream_id = 1
        self.reads: list[bytes] = []
        self.arrived = trio.Event()

    async def handle(self, event: Any) -> None:
        self.reads.append(bytes(event.data))
        self.arrived.set()


def _lean_pair() -> tuple[socket.socket, trio.SocketStream, _Stream, LeanRead]:
    """A socket pair: the client's end, and the server's with a lean reader installed on it."""
    client, server = socket.socketpair()
    sock = trio.SocketStream(trio.socket.from_stdlib_socket(server))
    stream = _Stream()
    proto = types.SimpleNamespace(stream=stream, connection=H11WSConnection(h11.Connection(h11.SERVER)))
    lean = LeanRead(sock, proto, stream)  # type: ignore[arg-type]
    sock.receive_some = lean  # type: ignore[method-assign]
    return client, sock, stream, lean


async def test_the_lean_reader_reads_until_the_end_and_stops_when_cancelled() -> None:
    """One call reads and hands on everything up to the peer's end, which it returns (b"")
    with the lean reader gone; a cancelled reader reads nothing more, as trio's own would
    not, and leaves the socket to trio."""
    client, sock, stream, _ = _lean_pair()
    ended: list[bytes] = []

    async def read() -> None:
        ended.append(await sock.receive_some(1024))

    with client, trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            for part in (b"one", b"two"):
                client.sendall(part)
                await stream.arrived.wait()
                stream.arrived = trio.Event()
            client.shutdown(socket.SHUT_WR)
    assert (stream.reads, ended) == ([b"one", b"two"], [b""])
    assert "receive_some" not in sock.__dict__
    await sock.aclose()

    client, sock, stream, _ = _lean_pair()
    with client:
        client.sendall(b"never")
        with trio.CancelScope() as scope:
            scope.cancel()
            await sock.receive_some(1024)
        assert stream.reads == []
        assert "receive_some" not in sock.__dict__
        assert await sock.receive_some(1024) == b"never"  # trio's own
    await sock.aclose()
