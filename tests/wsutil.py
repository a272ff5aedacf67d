"""Small helpers for driving a real node over raw WebSockets in tests."""

from __future__ import annotations

import socket
import ssl
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import trio
from trio_websocket import WebSocketConnection, wrap_client_stream
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Message, Pong, Request
from wsproto.extensions import Extension
from wsproto.frame_protocol import FrameProtocol

from mux.wire import unpack_binary

__all__ = [
    "RawClient",
    "masked_frame",
    "open_cuttable_ws",
    "raw_client",
    "recv",
    "recv_until",
    "send",
    "serve_raw",
    "ws_url",
]


def ws_url(base: str, agent: str) -> str:
    """``http://host:port`` -> ``ws://host:port/api/mux/ws?agent=AGENT``."""
    return base.replace("http", "ws", 1) + f"/api/mux/ws?agent={agent}"


async def send(ws: WebSocketConnection, **msg: Any) -> None:
    """Send one JSON action."""
    await ws.send_message(orjson.dumps(msg).decode())


async def recv(ws: WebSocketConnection, timeout: float = 5.0) -> dict[str, Any]:
    """Receive one message as a dict; binary frames get their bytes in ``payload``."""
    with trio.fail_after(timeout):
        raw = await ws.get_message()
    if isinstance(raw, bytes):
        header, payload = unpack_binary(raw)
        header["payload"] = payload
        return header
    out: dict[str, Any] = orjson.loads(raw)
    return out


async def recv_until(ws: WebSocketConnection, pred: Any, timeout: float = 5.0) -> dict[str, Any]:
    """Receive until a message satisfies ``pred``; return it."""
    with trio.fail_after(timeout):
        while True:
            msg = await recv(ws, timeout)
            if pred(msg):
                return msg


@asynccontextmanager
async def open_cuttable_ws(url: str) -> AsyncIterator[tuple[WebSocketConnection, trio.SocketStream]]:
    """A WebSocket whose TCP stream the test can cut abruptly (``aclose_forcefully``)."""
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    try:
        async with trio.open_nursery() as nursery:
            ws = await wrap_client_stream(
                nursery, stream, f"{parts.hostname}:{parts.port}", f"{parts.path}?{parts.query}"
            )
            try:
                yield ws, stream
            finally:
                await trio.aclose_forcefully(stream)
    finally:
        await trio.aclose_forcefully(stream)


async def serve_raw(
    nursery: trio.Nursery, ws_app: Any, *, max_message_size: int | None = None, read_timeout: int | None = None
) -> str:
    """Serve the raw ASGI WebSocket app ``ws_app`` on Hypercorn as the node does (its own read
    loop, ``mux.hypercorn_serve``; lifespan answered here);
    return its ``ws://`` URL. ``max_message_size``: Hypercorn's ``websocket_max_message_size``;
    ``read_timeout``: its ``read_timeout``."""
    from hypercorn.config import Config

    from mux.hypercorn_serve import serve as hypercorn_serve

    async def app(scope: dict[str, Any], receive: Any, send_: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send_({"type": "lifespan.startup.complete"})
            await send_({"type": "lifespan.shutdown.complete"})
            return
        await ws_app(scope, receive, send_)

    cfg = Config()
    cfg.bind = ["127.0.0.1:0"]
    if max_message_size is not None:
        cfg.websocket_max_message_size = max_message_size
    cfg.read_timeout = read_timeout
    urls = await nursery.start(lambda task_status: hypercorn_serve(app, cfg, task_status=task_status))
    return str(urls[0]).replace("http", "ws", 1) + "/"


def masked_frame(first: int, payload: bytes) -> bytes:
    """A masked client WebSocket frame with header byte ``first`` (FIN, RSV bits, opcode),
    built by hand: wsproto refuses to build some that tests need (bad UTF-8, RSV bits, long
    control frames)."""
    key = b"\x0f\xf0\x55\xaa"
    n = len(payload)
    size = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big")
    return bytes([first]) + size + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


class RawClient:
    """A WebSocket client on a TCP (or TLS) stream that writes whole bursts in one ``send``."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.frames = FrameProtocol(client=True, extensions=[])
        self.parts: list[Any] = []
        self.pongs = 0
        self.extensions: list[str] = []
        """The extensions the server accepted in its handshake."""

    async def burst(self, *messages: str | bytes | None) -> None:
        """All of ``messages`` in one write (so one read on the server, on loopback); None
        is a ping."""
        frames = (self.frames.ping(b"p") if m is None else self.frames.send_data(m) for m in messages)
        await self.stream.send_all(b"".join(bytes(f) for f in frames))

    async def messages(self, n: int) -> list[str | bytes]:
        """The next ``n`` whole messages."""
        got: list[str | bytes] = []
        with trio.fail_after(10):
            while len(got) < n:
                for event in self.ws.events():
                    if isinstance(event, Pong):
                        self.pongs += 1
                    elif isinstance(event, Message):
                        self.parts.append(event.data)
                        if event.message_finished:
                            whole = self.parts
                            self.parts = []
                            got.append("".join(whole) if isinstance(whole[0], str) else b"".join(whole))
                if len(got) < n:
                    chunk = await self.stream.receive_some(1 << 16)
                    assert chunk, "the server closed the connection"
                    self.ws.receive_data(bytes(chunk))
        return got


def _accepted(ws: WSConnection) -> AcceptConnection | None:
    """The server's handshake answer, if it came; the events after it stay for ``messages``."""
    for event in ws.events():
        if isinstance(event, AcceptConnection):
            return event
    return None


@asynccontextmanager
async def raw_client(
    url: str,
    ssl_context: ssl.SSLContext | None = None,
    *,
    receive_buffer: int | None = None,
    extensions: list[Extension] | None = None,
) -> AsyncIterator[RawClient]:
    """A :class:`RawClient` connected (handshake done) to ``url``; over TLS with ``ssl_context``;
    with ``receive_buffer``, its socket's ``SO_RCVBUF`` set before it connects (a small one
    keeps what the node has sent but the client not yet read small, as a slow link does);
    offering ``extensions`` in its handshake (it sends its own messages uncompressed)."""
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    stream: trio.abc.Stream
    if receive_buffer is None:
        stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    else:
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        await sock.connect((parts.hostname, parts.port))
        stream = trio.SocketStream(sock)
    if ssl_context is not None:
        stream = trio.SSLStream(stream, ssl_context, server_hostname=parts.hostname, https_compatible=True)
    client = RawClient(stream)
    try:
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        await stream.send_all(client.ws.send(Request(host=parts.netloc, target=target, extensions=extensions or [])))
        with trio.fail_after(5):
            while (accepted := _accepted(client.ws)) is None:
                client.ws.receive_data(bytes(await stream.receive_some(1 << 16)))
        client.extensions = [extension.name for extension in accepted.extensions]
        yield client
    finally:
        await stream.aclose()
