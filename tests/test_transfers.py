"""Tunnel and file transfer at issue scale, against a real node and real servers on 127.0.0.1.

How this works: every test starts a real in-process node (Hypercorn, ``serve``) whose overlay
allow-list names the test's own servers, and talks to it over real WebSockets
(``mux.client.connect``).

- Tunnel: a real HTTP server (Hypercorn serving a small ASGI app) and real TCP servers (a
  hashing sink, a source) are reached through ``mux.tunnel.serve_tunnel`` (the client-side
  forwarder, in-process) with real clients (``httpx``, ``trio`` TCP streams).
- File transfer: ``send_file`` / ``receive_files`` over the node. The sender's WebSocket runs
  through :class:`TcpProxy`, a real TCP relay between the sender and the node that can
  *kill* the connection (both sockets reset with ``SO_LINGER`` 0: no WebSocket close
  handshake, the node sees the socket drop) or *corrupt* one chunk in flight (it parses the
  client->node WebSocket frames and flips one bit of one chunk's bytes; masking is an XOR, so
  the node receives, signs and relays the flipped bit and only the receiver's chunk hash can
  notice).

The ``file:sync`` intent's default budget (1 MB/s per channel) is lifted on these nodes
(``Mux.register_intent``) so 20 MB take seconds, not 20 s; throttling itself is covered by
``tests/test_filesync.py``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

import mux
from mux.client import connect
from mux.core import MuxConfig
from mux.errors import MuxError
from mux.filesync import PARTIAL_DIR, FileSyncError, Progress, SyncResult, receive_files, send_file
from mux.intents import BandwidthPolicy
from mux.server import ServeInfo

from .nodes import serve_node
from .test_filesync import agent
from .test_overlay import start_tunnel

Handler = Callable[[trio.SocketStream], Awaitable[None]]
MB = 1 << 20


# ---- the node ----------------------------------------------------------------------------------


async def start_node(nursery: trio.Nursery, allow: list[str]) -> ServeInfo:
    """A real node allowing tunnels to ``allow``, with the ``file:sync`` budget lifted."""
    info = await serve_node(nursery, mux=MuxConfig(backends={"overlay": {"allow": allow}}))
    m = info.node.require()
    builtin = m.resolve("file:sync")
    m.register_intent(
        "file:sync",
        builtin.backend,
        builtin.route.description,
        policy=BandwidthPolicy(builtin.policy.priority, 0, 0, builtin.policy.preemptible),
    )
    return info


# ---- real servers --------------------------------------------------------------------------------


async def http_app(scope: dict[str, Any], receive: Callable[[], Awaitable[Any]], send: Any) -> None:
    """A tiny ASGI app: answers every request with its method, path, query and ``x-probe``."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    probe = dict(scope["headers"]).get(b"x-probe", b"").decode()
    text = f"{scope['method']} {scope['path']}?{scope['query_string'].decode()} probe={probe} body={len(body)}"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": text.encode()})


async def start_http(nursery: trio.Nursery) -> int:
    """A real HTTP server (Hypercorn, the ASGI app above) on a free loopback port."""
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None
    # a closed local connection reaches the server as a half-close (TCP cannot tell them
    # apart); Hypercorn then closes after its keep-alive timeout, which ends the tunnel
    config.keep_alive_timeout = 0.5
    app: Any = http_app
    urls: list[str] = await nursery.start(lambda task_status: hypercorn_serve(app, config, task_status=task_status))
    return int(urls[0].rsplit(":", 1)[1])


async def start_tcp(nursery: trio.Nursery, handler: Handler) -> int:
    """A real TCP server on 127.0.0.1 (a free port); returns the port."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    await nursery.start(trio.serve_listeners, handler, listeners)
    port: int = listeners[0].socket.getsockname()[1]
    return port


# ---- a TCP relay that can kill or corrupt the sender's connection -------------------------------


@attrs.define(eq=False)
class WsCorrupter:
    """Follows the client->server bytes of one WebSocket connection and flips one bit of the
    last payload byte of the ``nth`` (0-based) binary frame of at least ``min_bytes``."""

    nth: int
    min_bytes: int
    seen: int = 0
    done: bool = False
    _handshake: bool = True
    _buf: bytearray = attrs.field(factory=bytearray)

    def feed(self, data: bytes | bytearray) -> bytes:
        """Take bytes read from the client; return the bytes to pass on (whole frames only)."""
        if self.done and not self._buf:
            return bytes(data)
        self._buf += data
        out = bytearray()
        if self._handshake:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return b""
            out += self._buf[: end + 4]
            del self._buf[: end + 4]
            self._handshake = False
        while len(self._buf) >= 2:
            opcode, masked, length = self._buf[0] & 0x0F, self._buf[1] & 0x80, self._buf[1] & 0x7F
            head = 2
            if length == 126:
                head, length = 4, struct.unpack_from("!H", self._buf, 2)[0] if len(self._buf) >= 4 else -1
            elif length == 127:
                head, length = 10, struct.unpack_from("!Q", self._buf, 2)[0] if len(self._buf) >= 10 else -1
            head += 4 if masked else 0
            if length < 0 or len(self._buf) < head + length:
                break
            frame = self._buf[: head + length]
            del self._buf[: head + length]
            if not self.done and opcode == 0x2 and length >= self.min_bytes:
                if self.seen == self.nth:
                    frame[-1] ^= 0x01  # masked or not, the receiver's byte flips too
                    self.done = True
                self.seen += 1
            out += frame
        return bytes(out)


def _reset(stream: trio.SocketStream) -> None:
    """Make closing ``stream`` send a TCP RST (SO_LINGER 0) instead of a FIN."""
    try:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


@attrs.define(eq=False)
class TcpProxy:
    """A real TCP relay from a local port to the node; ``kill()`` resets every connection."""

    upstream_port: int
    corrupter: WsCorrupter | None = None
    port: int = 0
    _live: list[tuple[trio.CancelScope, trio.SocketStream, trio.SocketStream]] = attrs.field(factory=list)

    @property
    def url(self) -> str:
        """The node URL as seen through the relay."""
        return f"http://127.0.0.1:{self.port}"

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and relay until cancelled (use with ``nursery.start``)."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started()

    async def _handle(self, client: trio.SocketStream) -> None:
        upstream = await trio.open_tcp_stream("127.0.0.1", self.upstream_port)
        with trio.CancelScope() as scope:
            entry = (scope, client, upstream)
            self._live.append(entry)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, client, upstream, self.corrupter, nursery.cancel_scope)
                    nursery.start_soon(self._pump, upstream, client, None, nursery.cancel_scope)
            finally:
                self._live.remove(entry)
        await trio.aclose_forcefully(client)
        await trio.aclose_forcefully(upstream)

    @staticmethod
    async def _pump(
        src: trio.SocketStream, dst: trio.SocketStream, corrupter: WsCorrupter | None, done: trio.CancelScope
    ) -> None:
        try:
            async for data in src:
                await dst.send_all(corrupter.feed(data) if corrupter is not None else data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        done.cancel()

    async def kill(self) -> int:
        """Reset both sockets of every relayed connection (no FIN, no WebSocket close)."""
        killed = list(self._live)
        for scope, client, upstream in killed:
            _reset(client)
            _reset(upstream)
            scope.cancel()
            await trio.aclose_forcefully(client)
            await trio.aclose_forcefully(upstream)
        return len(killed)


def make_file(path: Path, size: int) -> str:
    """Write ``size`` random bytes to ``path``; return their SHA-256."""
    data = os.urandom(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def file_digest(path: Path) -> str:
    """SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(MB):
            h.update(block)
    return h.hexdigest()


# ---- tunnel ----------------------------------------------------------------------------------------


async def test_http_get_through_tunnel_and_other_port_denied(nursery: trio.Nursery) -> None:
    """A real HTTP GET (httpx) through the client forwarder to a real HTTP server; another
    real HTTP server on the same host, not on the allow-list, is refused (``tunnel_denied``)
    on the same WebSocket, which then still carries requests."""
    with trio.fail_after(20):
        web = await start_http(nursery)
        other = await start_http(nursery)  # listening, reachable, but not allowed
        info = await start_node(nursery, [f"127.0.0.1:{web}"])
        m = info.node.require()
        async with connect(info.url, "alice") as conn:
            listener, done = await start_tunnel(nursery, conn, web)
            async with httpx.AsyncClient(timeout=10) as http:
                r = await http.get(f"http://127.0.0.1:{listener.port}/hello?x=1", headers={"x-probe": "tunnelled"})
            assert r.status_code == 200
            assert r.text == "GET /hello?x=1 probe=tunnelled body=0"
            ok = await done.receive()
            assert ok.reason == "tunnel_closed" and ok.bytes_sent > 0 and ok.bytes_received > 0
            assert ok.channel_id is not None
            state = m.channel_state(ok.channel_id)
            assert state.extra["destination"] == f"127.0.0.1:{web}" and state.close_reason == "tunnel_closed"

            # the other port: refused at open, on the same connection
            with pytest.raises(MuxError) as denied:
                await conn.open("node", "vpn:tunnel", {"host": "127.0.0.1", "port": other})
            assert denied.value.code == "tunnel_denied"
            # and through the forwarder: the HTTP client sees the connection end, no response
            bad_listener, bad_done = await start_tunnel(nursery, conn, other)
            async with httpx.AsyncClient(timeout=10) as http:
                with pytest.raises(httpx.TransportError):
                    await http.get(f"http://127.0.0.1:{bad_listener.port}/secret")
            refused = await bad_done.receive()
            assert refused.reason == "tunnel_denied" and refused.channel_id is None

            # the connection carries on: a POST with a body through the allowed tunnel
            assert not conn.closed
            async with httpx.AsyncClient(timeout=10) as http:
                r = await http.post(f"http://127.0.0.1:{listener.port}/again", content=b"z" * 100_000)
            assert r.status_code == 200 and r.text == "POST /again? probe= body=100000"
            assert info.node.status()["connections"] == 1


async def test_bulk_10mb_each_way_through_tunnel_byte_exact(nursery: trio.Nursery) -> None:
    """10 MiB up to a real hashing sink and 10 MiB down from a real source, through one
    WebSocket: the SHA-256 on the far side equals the SHA-256 of what was sent."""
    up = os.urandom(10 * MB)
    down = os.urandom(10 * MB)

    async def sink(stream: trio.SocketStream) -> None:
        async with stream:
            h, n = hashlib.sha256(), 0
            async for data in stream:
                h.update(data)
                n += len(data)
            await stream.send_all(f"{n} {h.hexdigest()}".encode())

    async def source(stream: trio.SocketStream) -> None:
        async with stream:
            for i in range(0, len(down), 256 << 10):
                await stream.send_all(down[i : i + (256 << 10)])

    with trio.fail_after(30):
        sink_port = await start_tcp(nursery, sink)
        source_port = await start_tcp(nursery, source)
        info = await start_node(nursery, [f"127.0.0.1:{sink_port}", f"127.0.0.1:{source_port}"])
        m = info.node.require()
        async with connect(info.url, "alice") as conn:
            to_sink, sink_done = await start_tunnel(nursery, conn, sink_port)
            from_source, source_done = await start_tunnel(nursery, conn, source_port)
            answer = bytearray()
            got = hashlib.sha256()
            got_n = 0

            async def upload() -> None:
                async with await trio.open_tcp_stream("127.0.0.1", to_sink.port) as stream:
                    for i in range(0, len(up), 128 << 10):
                        await stream.send_all(up[i : i + (128 << 10)])
                    await stream.send_eof()
                    async for data in stream:
                        answer.extend(data)

            async def download() -> None:
                nonlocal got_n
                async with await trio.open_tcp_stream("127.0.0.1", from_source.port) as stream:
                    async for data in stream:
                        got.update(data)
                        got_n += len(data)

            async with trio.open_nursery() as both:  # at the same time, on the same WebSocket
                both.start_soon(upload)
                both.start_soon(download)
            assert answer.decode() == f"{len(up)} {hashlib.sha256(up).hexdigest()}"
            assert got_n == len(down) and got.hexdigest() == hashlib.sha256(down).hexdigest()
            r_up, r_down = await sink_done.receive(), await source_done.receive()
            assert (r_up.reason, r_up.bytes_sent) == ("tunnel_closed", len(up))
            assert (r_down.reason, r_down.bytes_received) == ("tunnel_closed", len(down))
            assert r_up.channel_id is not None and r_down.channel_id is not None
            assert m.channel_state(r_up.channel_id).extra["bytes_in"] == len(up)
            assert m.channel_state(r_down.channel_id).extra["bytes_out"] == len(down)


# ---- file transfer ---------------------------------------------------------------------------------


async def test_20mb_file_killed_connection_resumes_byte_identical(nursery: trio.Nursery, tmp_path: Path) -> None:
    """The sender's TCP connection is reset mid-transfer; the node sees the socket drop and
    closes the channel (``ws_disconnect``); a new connection resumes at the receiver's last
    verified chunk, sends only the rest, and the received file is byte-identical."""
    size, chunk = 20 * MB, 64 << 10
    total = size // chunk
    src = tmp_path / "big.bin"
    digest = make_file(src, size)
    dest = tmp_path / "inbox"
    results: list[SyncResult] = []
    with trio.fail_after(35):
        info = await start_node(nursery, [])
        m = info.node.require()
        proxy = TcpProxy(int(info.url.rsplit(":", 1)[1]))
        await nursery.start(proxy.run)
        async with agent(info.url, "bob") as bob, trio.open_nursery() as receiving:
            first_result = trio.Event()

            def on_file(r: SyncResult) -> None:
                results.append(r)
                first_result.set()

            receiving.start_soon(functools.partial(receive_files, bob, dest, count=1, on_file=on_file))

            half = trio.Event()
            first_channel: list[str] = []

            def progress(p: Progress) -> None:
                if not first_channel:
                    first_channel.append(p.channel_id)
                if p.next_chunk >= total // 2:
                    half.set()

            async def killer() -> None:
                await half.wait()
                assert await proxy.kill() == 1

            nursery.start_soon(killer)
            with pytest.raises(MuxError) as broken:
                async with connect(proxy.url, "alice") as alice:
                    await send_file(alice, "bob", src, chunk_size=chunk, progress=progress)
            assert broken.value.code == "interrupted", broken.value

            # the node saw the socket drop and closed the channel: the receiver's end closed
            await first_result.wait()
            [cid] = first_channel
            state = m.channel_state(cid)
            assert state.close_reason == "ws_disconnect"
            assert state.extra["phase"] == "interrupted"
            kept = results[0].chunks_transferred
            assert results[0].error == "interrupted" and 0 < kept < total
            assert (dest / PARTIAL_DIR / f"{digest}.part").exists()

            async with agent(info.url, "alice") as alice:  # a new connection, straight to the node
                res = await send_file(alice, "bob", src, chunk_size=chunk)
    assert res.verified and res.sha256 == digest
    assert res.resumed_from == kept
    assert res.chunks_transferred == total - kept < total
    assert res.bytes_transferred == (total - kept) * chunk < size
    assert [r.error for r in results] == ["interrupted", None]
    assert results[1].resumed_from == kept and results[1].verified
    assert file_digest(dest / "big.bin") == digest
    assert sorted(os.listdir(dest)) == ["big.bin"]
    assert m.channel_state(res.channel_id).extra["resumed_from"] == kept


async def test_chunk_corrupted_in_flight_is_detected_then_resumed(nursery: trio.Nursery, tmp_path: Path) -> None:
    """One bit of the last chunk flips between the sender and the node; the node relays (and
    signs) what it got, the receiver's chunk hash refuses it (``chunk_hash_mismatch``),
    ``send_file`` raises that code, and a clean retry resends only that chunk, byte-identical.

    (The last chunk, so the sender is not mid-pump when the refusal arrives: see the report on
    ``send_file`` raising ``transfer_finished`` in that case.)"""
    size, chunk = 2 * MB, 64 << 10
    total = size // chunk
    bad_index = total - 1
    src = tmp_path / "c.bin"
    digest = make_file(src, size)
    data = src.read_bytes()
    dest = tmp_path / "inbox"
    results: list[SyncResult] = []
    with trio.fail_after(25):
        info = await start_node(nursery, [])
        m = info.node.require()
        corrupter = WsCorrupter(nth=bad_index, min_bytes=chunk)
        proxy = TcpProxy(int(info.url.rsplit(":", 1)[1]), corrupter)
        await nursery.start(proxy.run)
        async with agent(info.url, "bob") as bob, trio.open_nursery() as receiving:
            receiving.start_soon(functools.partial(receive_files, bob, dest, count=1, on_file=results.append))
            channel: list[str] = []
            async with connect(proxy.url, "alice") as alice:
                with pytest.raises(FileSyncError) as bad:
                    await send_file(
                        alice, "bob", src, chunk_size=chunk, progress=lambda p: channel.append(p.channel_id)
                    )
                assert bad.value.code == "chunk_hash_mismatch" and f"chunk {bad_index}:" in bad.value.detail
                assert corrupter.done
                state = m.channel_state(channel[0])
                assert state.close_reason == "chunk_hash_mismatch"
                assert state.extra["phase"] == "failed" and state.extra["error"]["code"] == "chunk_hash_mismatch"
                # the flipped bit is in the node's (signed, intact) ledger: it relayed what it got
                ledger = await m.export(channel[0])
                assert mux.verify_chain([f.to_dict() for f in ledger], m.public_key).closed
                chunks = [f.payload for f in ledger if isinstance(f.payload, bytes)]
                assert chunks[:bad_index] == [data[i * chunk : (i + 1) * chunk] for i in range(bad_index)]
                flipped = bytes(a ^ b for a, b in zip(chunks[bad_index], data[bad_index * chunk :], strict=True))
                assert flipped == bytes(chunk - 1) + b"\x01"  # exactly one bit differs
                # a clean retry on the same connection resumes at the refused chunk
                assert not alice.closed
                res = await send_file(alice, "bob", src, chunk_size=chunk)
    assert res.verified and (res.resumed_from, res.chunks_transferred) == (bad_index, 1)
    assert [r.error for r in results] == ["chunk_hash_mismatch", None]
    assert results[0].chunks_transferred == bad_index
    assert file_digest(dest / "c.bin") == digest
    assert sorted(os.listdir(dest)) == ["c.bin"]
