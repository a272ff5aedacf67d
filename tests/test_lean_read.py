"""The node's own read loop for each TCP connection (``mux.lean_read.LeanTCPServer``, under
``mux.hypercorn_serve.serve``) and the waits it makes (``mux.readiness``): on a real server,
Hypercorn's HTTP/1.1 protocol sees no more than the handshake, every message and ping is
answered as before, a read timeout keeps Hypercorn's own loop, a connection whose reads never
wait still lets the others run, idle connections hold no objects made for their waits, and a
connection the server closes while its reader waits ends; on a socket pair, the reader reads
to the end and stops when cancelled, and a park wakes, cancels, shuts and refuses a second
waiter."""

from __future__ import annotations

import contextlib
import gc
import socket
import threading
import time
import tracemalloc
import types
import urllib.parse
from typing import Any

import pytest
import trio
from hypercorn.events import Closed, RawData
from hypercorn.protocol.h11 import H11Protocol
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request
from wsproto.frame_protocol import FrameProtocol

import mux.lean_read
from mux import hypercorn_conn
from mux.direct_writes import PlainWire
from mux.lean_read import LeanReader, LeanTCPServer
from mux.readiness import Park, wait
from mux.sockets import AsgiSocket, Disconnected

from .wsutil import raw_client, serve_raw


class _Echo:
    """Echoes every message; remembers each connection's TCP server."""

    def __init__(self, fast: bool = True) -> None:
        self.fast = fast
        self.servers: list[Any] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send_: Any) -> None:
        sock = AsgiSocket(scope, receive, send_, fast_receive=self.fast)
        await sock.accept(None)
        assert isinstance(sock._wire, PlainWire) and sock._stream is not None
        under = hypercorn_conn.h11_under(sock._stream)
        assert under is not None
        self.servers.append(under[1])
        with contextlib.suppress(Disconnected):
            while True:
                await sock.send(await sock.receive())


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


@pytest.mark.parametrize("fast", [True, False], ids=["fast-receive", "stock-receive"])
async def test_once_open_reads_go_straight_to_the_stream(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, fast: bool
) -> None:
    """Hypercorn's protocol is handed only the upgrade request; every message, a ping among
    them, and a message split across reads are answered as on Hypercorn's own loop (through
    the fast receive or Hypercorn's stream)."""
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
        [tcp] = app.servers
        assert isinstance(tcp, LeanTCPServer)
    assert got == [m for i in range(10) for m in (f"a{i}", f"b{i}" * 50)] + [b"x" * 3000]
    assert pongs == 10
    assert len(reads) == 1  # the upgrade request


async def test_with_a_read_timeout_hypercorn_reads_as_before(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hypercorn enforces its ``read_timeout`` in its own loop: every read goes through its
    protocol."""
    reads = _count_protocol_reads(monkeypatch)
    app = _Echo()
    async with raw_client(await serve_raw(nursery, app, read_timeout=30)) as client:
        for word in ("one", "two"):
            await client.burst(word)
            assert await client.messages(1) == [word]
    assert len(reads) == 3


async def test_idle_connections_hold_no_objects_made_for_their_waits(nursery: trio.Nursery) -> None:
    """Forty connections, each having sent and been answered, wait for their next message:
    trio's epoll manager holds what it made for a few waits (the listener's, the test's),
    fewer blocks than there are connections; trio's own ``wait_readable`` makes a record, a
    closure and its cells, and coroutines for every wait, five blocks or more per waiting
    connection."""
    app = _Echo()
    url = await serve_raw(nursery, app)
    tracemalloc.start(8)
    try:
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(raw_client(url)) for _ in range(40)]
            for i, client in enumerate(clients):
                await client.burst(f"m{i}")
                assert await client.messages(1) == [f"m{i}"]
            await trio.sleep(0.1)
            snapshot = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    epoll = snapshot.filter_traces([tracemalloc.Filter(True, "*trio/_core/_io_epoll.py")])
    made = sum(stat.count for stat in epoll.statistics("filename"))
    assert made < 40, f"{made} blocks made by trio's epoll waits: one or more per idle connection"


async def test_a_connection_the_server_closes_while_its_reader_waits_ends(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The app closes the WebSocket while the connection's reader waits for the client: the
    reader wakes (trio's ``notify_closing`` reaches its wait) and the connection ends."""
    closed = trio.Event()
    ended = trio.Event()
    stock = LeanTCPServer._read_data

    async def read_data(self: LeanTCPServer) -> None:
        try:
            await stock(self)
        finally:
            ended.set()

    monkeypatch.setattr(LeanTCPServer, "_read_data", read_data)

    async def app(scope: dict[str, Any], receive: Any, send_: Any) -> None:
        sock = AsgiSocket(scope, receive, send_)
        await sock.accept(None)
        await sock.receive()
        await trio.sleep(0.05)  # the reader is waiting again
        await sock.close(1000, "done")
        closed.set()

    async with raw_client(await serve_raw(nursery, app)) as client:
        await client.burst("hello")
        with trio.fail_after(5):
            await closed.wait()
            while (await client.stream.receive_some(1 << 16)) != b"":
                pass  # the close frame, then the server's end of the stream
            await ended.wait()


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


class _Protocol:
    """What the reader hands reads to when no WebSocket is open: it records them."""

    def __init__(self) -> None:
        self.protocol = None
        self.reads: list[bytes] = []
        self.closed = False
        self.arrived = trio.Event()

    async def handle(self, event: Any) -> None:
        if isinstance(event, Closed):
            self.closed = True
        else:
            self.reads.append(bytes(event.data))
            self.arrived.set()


def _reader_pair() -> tuple[socket.socket, trio.SocketStream, _Protocol, LeanReader]:
    """A socket pair: the client's end, and a reader of the server's end."""
    client, server = socket.socketpair()
    sock = trio.SocketStream(trio.socket.from_stdlib_socket(server))
    protocol = _Protocol()
    tcp: Any = types.SimpleNamespace(stream=sock, protocol=protocol)
    reader = LeanReader.over(tcp)
    assert reader is not None
    return client, sock, protocol, reader


def _watched(sock: trio.SocketStream) -> bool:
    """Whether trio's epoll manager has a waiter for the socket."""
    from trio._core._run import GLOBAL_RUN_CONTEXT

    return sock.socket.fileno() in GLOBAL_RUN_CONTEXT.runner.io_manager._registered  # type: ignore[attr-defined]


async def test_the_reader_reads_until_the_end_and_stops_when_cancelled() -> None:
    """The reader hands on every read up to the peer's end (b""), then says the connection
    closed; a cancelled reader reads nothing more, as trio's own would not, and leaves no
    wait behind."""
    client, sock, protocol, reader = _reader_pair()
    assert reader._park is not None  # on Linux: trio's epoll manager, known
    with client, trio.fail_after(5):
        async with trio.open_nursery() as readers:
            readers.start_soon(reader.run)
            for part in (b"one", b"two"):
                client.sendall(part)
                await protocol.arrived.wait()
                protocol.arrived = trio.Event()
            client.shutdown(socket.SHUT_WR)
    assert (protocol.reads, protocol.closed, _watched(sock)) == ([b"one", b"two", b""], True, False)
    await sock.aclose()

    client, sock, protocol, reader = _reader_pair()
    with client:
        async with trio.open_nursery() as readers:
            readers.start_soon(reader.run)
            await trio.sleep(0.05)
            assert _watched(sock)  # waiting
            readers.cancel_scope.cancel()
        assert not _watched(sock)
        client.sendall(b"never")
        with trio.CancelScope() as scope:
            scope.cancel()
            await reader.run()
        assert protocol.reads == []
        assert await sock.receive_some(1024) == b"never"  # still there, for trio's own read
    await sock.aclose()


async def test_a_park_wakes_cancels_is_closed_and_takes_one_waiter() -> None:
    """A parked task wakes when its socket gets data (and again for later data), leaves on
    cancellation and can park again, gets ``ClosedResourceError`` when the socket is closed
    (trio's ``notify_closing``), and a second waiter is refused."""
    client, server = socket.socketpair()
    server.setblocking(False)
    with client, server:
        park = Park.open(server.fileno())
        assert park is not None
        woken: list[bytes] = []

        async def waiter() -> None:
            for _ in range(2):
                await wait(park)
                woken.append(server.recv(100))

        with trio.fail_after(5):
            async with trio.open_nursery() as inner:
                inner.start_soon(waiter)
                for data in (b"a", b"b"):
                    await trio.sleep(0.02)
                    client.sendall(data)
        assert woken == [b"a", b"b"]

        with trio.move_on_after(0.05) as scope:
            await wait(park)
        assert scope.cancelled_caught

        async def second() -> None:
            with pytest.raises(trio.BusyResourceError):
                await wait(park)

        async def close_soon() -> None:
            await trio.sleep(0.05)
            await second()
            trio.lowlevel.notify_closing(server)

        with trio.fail_after(5):
            async with trio.open_nursery() as inner:
                inner.start_soon(close_soon)
                with pytest.raises(trio.ClosedResourceError):
                    await wait(park)


async def test_a_readers_waits_and_wakes_make_no_frame_objects(nursery: trio.Nursery) -> None:
    """Woken many times, the reader's coroutines never get frame objects: CPython makes one
    for the frame an exception returns into (a ``StopIteration`` ending an ``await`` on an
    iterator would), and one made mid-burst outlives the burst with the connection."""
    client, sock, protocol, reader = _reader_pair()
    run = reader.run()

    async def drive() -> None:
        await run

    def frames() -> list[object]:
        held = [run, run.cr_await]
        return [ref for obj in held for ref in gc.get_referents(obj) if type(ref).__name__ == "frame"]

    with client:
        nursery.start_soon(drive)
        with trio.fail_after(5):
            for i in range(20):
                client.sendall(b"x%d" % i)
                await protocol.arrived.wait()
                protocol.arrived = trio.Event()
        assert run.cr_await is not None and frames() == []
        client.shutdown(socket.SHUT_WR)
        for _ in range(500):
            if protocol.closed:
                break
            await trio.sleep(0.01)
        assert protocol.closed
    await sock.aclose()
