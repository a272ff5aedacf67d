"""The overlay backend (``vpn:tunnel``) and the tunnel client, against a real node and real TCP.

Every destination is a real TCP server on 127.0.0.1 started in the test's nursery; the node
is a real in-process Hypercorn node whose overlay allow-list names those servers; the client
side is ``mux.tunnel`` over one WebSocket (``mux.client.connect``), or the ``python -m mux
tunnel`` subprocess.
"""

from __future__ import annotations

import hashlib
import math
import os
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

import mux
from backends.overlay import parse_hostport, tunnel_allowed
from mux.client import MuxConnection, connect
from mux.core import MuxConfig
from mux.errors import BadRequest, ChannelFull, MuxError
from mux.server import ServeInfo
from mux.tunnel import TunnelListener, TunnelResult, parse_address, serve_tunnel

from .nodes import serve_node

Handler = Callable[[trio.SocketStream], Awaitable[None]]


# ---- helpers ---------------------------------------------------------------------------------


async def start_node(nursery: trio.Nursery, allow: list[str], **overlay: Any) -> ServeInfo:
    """A real node whose overlay backend allows ``allow`` (plus ``overlay`` options)."""
    return await serve_node(nursery, mux=MuxConfig(backends={"overlay": {"allow": allow, **overlay}}))


async def start_tcp(nursery: trio.Nursery, handler: Handler, *, rcvbuf: int | None = None) -> int:
    """A real TCP server on 127.0.0.1 (a free port); returns the port."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    if rcvbuf is not None:  # inherited by accepted sockets: a small window, a slow receiver
        for listener in listeners:
            listener.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await nursery.start(trio.serve_listeners, handler, listeners)
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def echo(stream: trio.SocketStream) -> None:
    """Echo everything; close after the client's EOF."""
    async with stream:
        async for data in stream:
            await stream.send_all(data)


async def digest_after_eof(stream: trio.SocketStream) -> None:
    """Read until the client half-closes, then answer with the byte count and SHA-256."""
    async with stream:
        h = hashlib.sha256()
        n = 0
        async for data in stream:
            h.update(data)
            n += len(data)
        await stream.send_all(f"got {n} {h.hexdigest()}".encode())


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def start_tunnel(
    nursery: trio.Nursery, conn: MuxConnection, port: int
) -> tuple[TunnelListener, trio.MemoryReceiveChannel[TunnelResult]]:
    """``serve_tunnel`` on a free local port to 127.0.0.1:``port``; finished connections'
    results arrive on the returned channel."""
    send, recv = trio.open_memory_channel[TunnelResult](math.inf)
    listener: TunnelListener = await nursery.start(
        lambda task_status: serve_tunnel(
            conn, ("127.0.0.1", 0), ("127.0.0.1", port), on_connection=send.send_nowait, task_status=task_status
        )
    )
    return listener, recv


async def read_all(stream: trio.SocketStream) -> bytes:
    """Everything until EOF."""
    chunks = []
    async for data in stream:
        chunks.append(data)
    return b"".join(chunks)


async def exchange(port: int, data: bytes) -> bytes:
    """Connect to 127.0.0.1:port, send ``data`` then EOF while reading everything back."""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        received: list[bytes] = []

        async def reader() -> None:
            received.append(await read_all(stream))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            for i in range(0, len(data), 50_000):
                await stream.send_all(data[i : i + 50_000])
            await stream.send_eof()
        return received[0]


# ---- allow-list ------------------------------------------------------------------------------


def test_allow_list_matching() -> None:
    assert parse_hostport("LocalHost:80") == ("localhost", "80")
    assert parse_hostport("[::1]:*") == ("::1", "*")
    with pytest.raises(ValueError):
        parse_hostport("nohost")
    allow = ["127.0.0.1:8080", "db.internal:*", "[::1]:22", 5, "broken"]
    assert tunnel_allowed(allow, "127.0.0.1", 8080)
    assert not tunnel_allowed(allow, "127.0.0.1", 8081)
    assert tunnel_allowed(allow, "DB.internal", 5432)
    assert tunnel_allowed(allow, "::1", 22)
    assert not tunnel_allowed(allow, "localhost", 8080)  # literal host match, no resolution
    assert not tunnel_allowed([], "127.0.0.1", 8080)
    assert not tunnel_allowed(None, "127.0.0.1", 8080)  # deny by default
    assert parse_address("127.0.0.1:0") == ("127.0.0.1", 0)
    with pytest.raises(BadRequest):
        parse_address("127.0.0.1")


# ---- through the tunnel ----------------------------------------------------------------------


async def test_concurrent_tunnels_one_websocket_byte_exact(nursery: trio.Nursery) -> None:
    """Four connections at once through one WebSocket, each on its own channel, 1 MiB each way."""
    with trio.fail_after(20):
        echo_port = await start_tcp(nursery, echo)
        info = await start_node(nursery, [f"127.0.0.1:{echo_port}"])
        m = info.node.require()
        async with connect(info.url, "alice") as conn:
            listener, done = await start_tunnel(nursery, conn, echo_port)
            blobs = [os.urandom(1 << 20) for _ in range(4)]
            back: dict[int, bytes] = {}

            async def one(i: int) -> None:
                back[i] = await exchange(listener.port, blobs[i])

            async with trio.open_nursery() as clients:
                for i in range(4):
                    clients.start_soon(one, i)
            for i in range(4):
                assert back[i] == blobs[i]
            results = [await done.receive() for _ in range(4)]
            assert sorted(map(id, listener.stats.results)) == sorted(map(id, results))
            assert len({r.channel_id for r in results}) == 4
            assert all(r.reason == "tunnel_closed" for r in results), [r.to_dict() for r in results]
            assert all(r.bytes_sent == r.bytes_received == 1 << 20 for r in results)
            assert listener.stats.failed == 0
            assert info.node.status()["connections"] == 1  # one WebSocket carried all four
            for r in results:
                assert r.channel_id is not None
                state = m.channel_state(r.channel_id)
                assert (state.agent, state.target, state.close_reason) == ("alice", "node", "tunnel_closed")
                extra = state.extra
                assert extra["destination"] == f"127.0.0.1:{echo_port}"
                assert extra["bytes_in"] == extra["bytes_out"] == 1 << 20
                assert extra["eof_in"] and extra["eof_out"]
            # the whole tunnel is a signed, intact chain
            first = results[0].channel_id
            assert first is not None
            frames = [f.to_dict() for f in await m.export(first)]
            report = mux.verify_chain(frames, m.public_key)
            assert report.closed and frames[-1]["payload"]["reason"] == "tunnel_closed"
            assert {f["sender"] for f in frames if f["kind"] == "data"} == {"alice", "node"}


async def test_tunnels_beside_a_call_are_shaped_not_broken(nursery: trio.Nursery) -> None:
    """While the connection holds a call, its tunnels share the bulk budget beside it: a
    tunnel frame over its share is refused ``throttled`` with ``retry_after_ms``, and the
    tunnel client sends it again after that wait instead of giving up on the connection.
    Three at once, 512 KiB each way, come through byte-exact; the call's frames are never
    refused."""
    with trio.fail_after(30):
        echo_port = await start_tcp(nursery, echo)
        info = await start_node(nursery, [f"127.0.0.1:{echo_port}"])
        async with connect(info.url, "alice") as conn, connect(info.url, "bob") as bob:
            call = await conn.open("bob", "call:voice")
            heard = await bob.accept()
            listener, done = await start_tunnel(nursery, conn, echo_port)
            blobs = [os.urandom(512 << 10) for _ in range(3)]
            back: dict[int, bytes] = {}
            frames = 0

            async def one(i: int) -> None:
                back[i] = await exchange(listener.port, blobs[i])

            async def talk() -> None:
                nonlocal frames
                for i in range(1000):  # a 200-byte frame every 20 ms while the tunnels run
                    await call.send(i.to_bytes(4, "big") + bytes(196))
                    assert (await heard.receive())["payload"][:4] == i.to_bytes(4, "big")
                    frames += 1
                    await trio.sleep(0.020)

            async with trio.open_nursery() as both:
                both.start_soon(talk)
                await trio.sleep(0.1)  # the call is on: the tunnels are shaped from their first frame
                async with trio.open_nursery() as clients:
                    for i in range(3):
                        clients.start_soon(one, i)
                both.cancel_scope.cancel()
            results = [await done.receive() for _ in range(3)]
            assert all(r.reason == "tunnel_closed" for r in results), [r.to_dict() for r in results]
            assert [back[i] == blobs[i] for i in range(3)] == [True] * 3
            assert sum(r.retries for r in results) > 0  # some were refused, and sent again
            assert frames > 5


async def test_half_close_server_answers_after_client_eof(nursery: trio.Nursery) -> None:
    with trio.fail_after(15):
        port = await start_tcp(nursery, digest_after_eof)
        info = await start_node(nursery, [f"127.0.0.1:{port}"])
        async with connect(info.url, "alice") as conn:
            listener, done = await start_tunnel(nursery, conn, port)
            data = os.urandom(300_000)
            async with await trio.open_tcp_stream("127.0.0.1", listener.port) as stream:
                await stream.send_all(data)
                await stream.send_eof()  # half-close: we can still read
                answer = await read_all(stream)
            assert answer == f"got {len(data)} {hashlib.sha256(data).hexdigest()}".encode()
            r = await done.receive()
            assert r.reason == "tunnel_closed" and r.bytes_sent == len(data) and r.bytes_received == len(answer)

            # the same at the wire level: eof frames both ways, then tunnel_closed
            ch = await conn.open("node", "vpn:tunnel", {"host": "127.0.0.1", "port": port})
            await ch.send(b"abc")
            await ch.send({"eof": True})
            frames = [f async for f in ch]
            assert [f["payload"] for f in frames] == [
                f"got 3 {hashlib.sha256(b'abc').hexdigest()}".encode(),
                {"eof": True},
            ]
            assert all(f["sender"] == "node" for f in frames)
            for f in frames:
                conn.verify(f)
            assert ch.closed_reason == "tunnel_closed"


async def test_denied_then_allowed_on_same_connection(nursery: trio.Nursery) -> None:
    with trio.fail_after(15):
        echo_port = await start_tcp(nursery, echo)
        other_port = await start_tcp(nursery, echo)
        info = await start_node(nursery, [f"127.0.0.1:{echo_port}"])
        async with connect(info.url, "alice") as conn:
            with pytest.raises(MuxError) as denied:
                await conn.open("node", "vpn:tunnel", {"host": "127.0.0.1", "port": other_port})
            assert denied.value.code == "tunnel_denied"
            with pytest.raises(MuxError) as by_name:  # allow-list hosts match literally
                await conn.open("node", "vpn:tunnel", {"host": "localhost", "port": echo_port})
            assert by_name.value.code == "tunnel_denied"
            with pytest.raises(MuxError) as bad:
                await conn.open("node", "vpn:tunnel", {"host": "127.0.0.1"})
            assert bad.value.code == "bad_metadata"
            with pytest.raises(MuxError) as not_node:
                await conn.open("bob", "vpn:tunnel", {"host": "127.0.0.1", "port": echo_port})
            assert not_node.value.code == "bad_target"
            assert not conn.closed

            ch = await conn.open("node", "vpn:tunnel", {"host": "127.0.0.1", "port": echo_port})
            await ch.send(b"hello through the tunnel")
            frame = await ch.receive()
            assert frame["payload"] == b"hello through the tunnel" and frame["sender"] == "node"
            conn.verify(frame)
            await ch.close("done")

            # the tunnel client reports a refused open and closes the local connection
            listener, done = await start_tunnel(nursery, conn, other_port)
            async with await trio.open_tcp_stream("127.0.0.1", listener.port) as stream:
                assert await read_all(stream) == b""
            refused = await done.receive()
            assert refused.channel_id is None and refused.reason == "tunnel_denied"


async def test_unreachable_destination_closes_only_its_channel(nursery: trio.Nursery) -> None:
    with trio.fail_after(15):
        echo_port = await start_tcp(nursery, echo)
        dead = closed_port()
        info = await start_node(nursery, [f"127.0.0.1:{echo_port}", f"127.0.0.1:{dead}"])
        async with connect(info.url, "alice") as conn:
            good = await conn.open("node", "vpn:tunnel", {"host": "127.0.0.1", "port": echo_port})
            bad = await conn.open("node", "vpn:tunnel", {"host": "127.0.0.1", "port": dead})
            assert [f async for f in bad] == []
            assert bad.closed_reason == "destination_unreachable"
            assert bad.closed_event is not None and bad.closed_event.get("by") == "node"
            state = info.node.require().channel_state(bad.id)
            assert state.close_frame is not None and "cannot connect" in state.close_frame.payload["detail"]
            # the other tunnel and the connection carry on
            await good.send(b"still here")
            assert (await good.receive())["payload"] == b"still here"
            assert good.is_open and not conn.closed
            assert await conn.ping() > 0


async def test_flow_control_bounds_node_buffer(nursery: trio.Nursery) -> None:
    """8 MiB into a destination that reads slowly: the node's queue toward it stays within
    ``buffer_bytes`` because ``admit`` refuses frames (receiver_full) and the client waits."""
    buffer_bytes = 64 << 10

    async def slow_reader(stream: trio.SocketStream) -> None:
        async with stream:
            await trio.sleep(0.3)  # not reading at all: everything piles up before us
            h = hashlib.sha256()
            n = 0
            while True:
                data = await stream.receive_some(64 << 10)
                if not data:
                    break
                h.update(data)
                n += len(data)
                await trio.sleep(0.001)
            await stream.send_all(f"got {n} {h.hexdigest()}".encode())

    with trio.fail_after(25):
        port = await start_tcp(nursery, slow_reader, rcvbuf=8192)
        info = await start_node(nursery, [f"127.0.0.1:{port}"], buffer_bytes=buffer_bytes)
        m = info.node.require()
        async with connect(info.url, "alice") as conn:
            listener, done = await start_tunnel(nursery, conn, port)
            data = os.urandom(8 << 20)
            answer = await exchange(listener.port, data)
            assert answer == f"got {len(data)} {hashlib.sha256(data).hexdigest()}".encode()
            r = await done.receive()
            assert r.reason == "tunnel_closed" and r.bytes_sent == len(data)
            assert r.retries > 0  # the client was told to wait (receiver_full) and retried
            assert r.channel_id is not None
            extra = m.channel_state(r.channel_id).extra
            assert extra["refused_full"] > 0
            assert 0 < extra["queued_peak"] <= buffer_bytes
            assert extra["bytes_in"] == len(data)


async def test_in_process_sender_waits_for_room(nursery: trio.Nursery) -> None:
    """An in-process opener gets ChannelFull with ``wait_room``; ``Channel.send`` waits on it."""
    release, finished = trio.Event(), trio.Event()
    got: list[int] = []

    async def gated(stream: trio.SocketStream) -> None:
        async with stream:
            await release.wait()
            got.append(len(await read_all(stream)))
            finished.set()

    with trio.fail_after(15):
        port = await start_tcp(nursery, gated, rcvbuf=4096)
        info = await start_node(nursery, [f"127.0.0.1:{port}"], buffer_bytes=32 << 10, buffer_frames=4)
        m = info.node.require()
        async with m.attach("local") as ep:
            ch = await ep.open("node", "vpn:tunnel", {"host": "127.0.0.1", "port": port})
            refused = None
            for _ in range(2000):  # fill kernel buffers and the node queue until refused
                try:
                    ch.post_nowait(b"x" * 8192)
                except ChannelFull as exc:
                    refused = exc
                    break
                await trio.lowlevel.checkpoint()
            assert refused is not None and refused.wait_room is not None
            assert ch._state.extra["queued_bytes"] <= 32 << 10
            release.set()
            await ch.send(b"y" * 8192)  # waits for room instead of failing
            await ch.send({"eof": True})
            await finished.wait()
            assert got[0] == ch._state.extra["bytes_in"]


# ---- the CLI ---------------------------------------------------------------------------------


async def test_cli_tunnel_subprocess(nursery: trio.Nursery) -> None:
    with trio.fail_after(25):
        echo_port = await start_tcp(nursery, echo)
        info = await start_node(nursery, [f"127.0.0.1:{echo_port}"])
        args = [sys.executable, "-m", "mux", "tunnel", "--url", info.url, "--agent", "tun"]
        args += ["--local", "127.0.0.1:0", "--remote", f"127.0.0.1:{echo_port}"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        process = await trio.lowlevel.open_process(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        assert process.stdout is not None and process.stderr is not None
        try:
            buf = b""
            while b"\n" not in buf:
                chunk = await process.stdout.receive_some(4096)
                assert chunk, (await process.stderr.receive_some(65536)).decode()
                buf += chunk
            first = buf.decode().splitlines()[0]
            assert first.startswith("tunnel listening on 127.0.0.1:") and f"-> 127.0.0.1:{echo_port}" in first
            local_port = int(first.split()[3].rsplit(":", 1)[1])
            data = os.urandom(200_000)
            assert await exchange(local_port, data) == data
            while b"connection 1 " not in buf:
                buf += await process.stdout.receive_some(4096)
            process.terminate()  # SIGTERM: graceful, prints the summary
            while True:
                chunk = await process.stdout.receive_some(4096)
                if not chunk:
                    break
                buf += chunk
            assert await process.wait() == 0
            text = buf.decode()
            assert f"{len(data)} B sent, {len(data)} B received" in text and "closed (tunnel_closed)" in text
            assert "tunnel done: 1 connection(s), 0 not closed cleanly" in text
        finally:
            if process.returncode is None:
                process.kill()
            with trio.move_on_after(5):
                await process.wait()
            await process.stdout.aclose()
            await process.stderr.aclose()
