"""``AsgiSocket``, a node's WebSocket, parses its clients' plain frames itself
(``mux.sockets``, ``mux.wsframes``) and leaves everything else to Hypercorn and wsproto,
which answer as they always did: each test runs on a real Hypercorn server with the fast
path on and off and expects the same."""

from __future__ import annotations

import contextlib
import gc
import weakref
from typing import Any

import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import CloseConnection, Message, Pong, Request
from wsproto.frame_protocol import FrameProtocol

from mux.fast_receive import FastReceive
from mux.sockets import AsgiSocket, Disconnected
from mux.wsframes import ClientFrames

from .wsutil import masked_frame, raw_client, serve_raw

pytestmark = pytest.mark.parametrize("fast", [True, False], ids=["fast", "stock"])


class _Echo:
    """An app that echoes every message (through ``AsgiSocket``) and remembers how its
    stream's data was handled."""

    def __init__(self, fast: bool) -> None:
        self.fast = fast
        self.handler = ""

    async def __call__(self, scope: dict[str, Any], receive: Any, send_: Any) -> None:
        sock = AsgiSocket(scope, receive, send_, fast_receive=self.fast)
        await sock.accept(None)
        while True:
            try:
                message = await sock.receive()
            except Disconnected:
                break
            assert sock._stream is not None
            handle = sock._stream.__dict__.get("handle")
            frames = getattr(handle, "_frames", None)
            fast_now = isinstance(handle, FastReceive) and not (frames and frames.off)
            self.handler = "fast" if fast_now else "off" if isinstance(handle, FastReceive) else "stock"
            await sock.send(message)


async def _exchange(url: str, *steps: tuple[bytes, int]) -> list[Any]:
    """Handshake with a raw client; then for each step write its bytes in one go and collect
    that many events (whole messages, pongs, the close), or until the node closes."""
    host, port = url.removeprefix("ws://").rstrip("/").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    ws = WSConnection(ConnectionType.CLIENT)
    await stream.send_all(ws.send(Request(host=host, target="/")))
    got: list[Any] = []
    parts: list[Any] = []
    wanted = 0
    pending = list(steps)
    with trio.fail_after(5):
        while pending or len(got) < wanted:
            if len(got) >= wanted and pending and ws.state.name == "OPEN":
                data, n = pending.pop(0)
                await stream.send_all(data)
                wanted += n
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            ws.receive_data(chunk)
            for event in ws.events():
                if isinstance(event, Message):
                    parts.append(event.data)
                    if event.message_finished:
                        got.append("".join(parts) if isinstance(event.data, str) else b"".join(parts))
                        parts = []
                elif isinstance(event, Pong):
                    got.append(("pong", bytes(event.payload)))
                elif isinstance(event, CloseConnection):
                    got.append(("close", event.code))
    await stream.aclose()
    return got


async def test_messages_pings_and_fragments_arrive_in_order(
    nursery: trio.Nursery, fast: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed: list[str | bytes] = []
    parse = ClientFrames.next

    def counted(self: ClientFrames) -> Any:
        item = parse(self)
        if isinstance(item, (str, bytes)):
            parsed.append(item)
        return item

    monkeypatch.setattr(ClientFrames, "next", counted)
    client = FrameProtocol(client=True, extensions=[])
    data = b"".join(
        bytes(f)
        for f in (
            client.send_data("a"),
            client.ping(b"hi"),
            client.send_data(b"\x00b"),
            client.send_data("é" * 100),
            client.send_data("c", fin=False),  # a fragmented message: wsproto's from here on
            client.send_data("d", fin=True),
            client.ping(b"again"),
            client.send_data("e"),
        )
    )
    app = _Echo(fast)
    got = await _exchange(await serve_raw(nursery, app), (data, 7))
    pongs = [g for g in got if isinstance(g, tuple)]  # answered by the server's reader, echoes by the app
    assert pongs == [("pong", b"hi"), ("pong", b"again")]
    assert [g for g in got if not isinstance(g, tuple)] == ["a", b"\x00b", "é" * 100, "cd", "e"]
    assert parsed == (["a", b"\x00b", "é" * 100] if fast else [])  # then wsproto's, from the fragment on
    assert app.handler == ("off" if fast else "stock")
    nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        # protocol errors: Hypercorn drops the connection without a close frame
        (masked_frame(0x81, b"\xff\xfe"), None),  # text that is not UTF-8
        (bytes([0x81, 0x01, ord("x")]), None),  # a client frame without a mask
        (masked_frame(0xC1, b"x"), None),  # an RSV bit without an extension
        (bytes([0x81, 0xFE, 0x00, 0x01]) + masked_frame(0x81, b"x")[2:], None),  # a length not in its shortest form
        (bytes(FrameProtocol(client=True, extensions=[]).send_data(b"x" * 2000)), 1009),  # over the size limit
    ],
    ids=["bad_utf8", "unmasked", "rsv", "long_length", "too_big"],
)
async def test_bad_frames_close_the_connection_as_wsproto_does(
    nursery: trio.Nursery, fast: bool, frame: bytes, code: int | None
) -> None:
    client = FrameProtocol(client=True, extensions=[])
    app = _Echo(fast)
    url = await serve_raw(nursery, app, max_message_size=1000)
    # the bad frame after the echo of the first: a close while the app sends trips Hypercorn
    got = await _exchange(url, (bytes(client.send_data("first")), 1), (frame + bytes(client.send_data("never")), 1))
    assert got == (["first"] if code is None else ["first", ("close", code)])  # and "never" is not echoed
    assert app.handler == ("fast" if fast else "stock")  # "first" came through the fast path
    nursery.cancel_scope.cancel()


@pytest.mark.parametrize("graceful", [True, False], ids=["close_frame", "tcp_close"])
async def test_a_closed_connection_s_stream_is_freed_at_once(nursery: trio.Nursery, fast: bool, graceful: bool) -> None:
    """The fast handler and Hypercorn's stream refer to each other while the connection is
    open; once it closes (a close handshake, or the client just goes) the stream goes as
    soon as Hypercorn lets go, as without it (no garbage-collection pass needed)."""
    streams: list[weakref.ref[Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send_: Any) -> None:
        sock = AsgiSocket(scope, receive, send_, fast_receive=fast)
        streams.append(weakref.ref(sock._stream))
        await sock.accept(None)
        with contextlib.suppress(Disconnected):
            while True:
                await sock.send(await sock.receive())

    url = await serve_raw(nursery, app)
    client = FrameProtocol(client=True, extensions=[])
    gc.collect()
    gc.disable()
    try:
        steps = [(bytes(client.send_data("x")), 1)]
        if graceful:
            steps.append((bytes(client.close(1000, "done")), 1))
        assert await _exchange(url, *steps) == ["x", ("close", 1000)][: len(steps)]
        await trio.sleep(0.2)
        assert streams[0]() is None
    finally:
        gc.enable()
    nursery.cancel_scope.cancel()


@pytest.mark.parametrize("deflate", [False, True], ids=["plain", "permessage_deflate"])
async def test_the_parser_is_made_when_the_connection_is_accepted(
    nursery: trio.Nursery, fast: bool, deflate: bool
) -> None:
    """What a connection keeps for reading is made with it, before its first message (not
    amid whatever else the node makes then); a connection with an extension gets none, and
    its messages go through wsproto as before."""
    from wsproto.extensions import PerMessageDeflate

    seen: dict[str, Any] = {}

    async def app(scope: dict[str, Any], receive: Any, send_: Any) -> None:
        sock = AsgiSocket(scope, receive, send_, fast_receive=fast)
        await sock.accept(None)
        assert sock._stream is not None
        handle = sock._stream.__dict__.get("handle")
        seen["accepted"] = type(getattr(handle, "_frames", None)).__name__
        message = await sock.receive()
        handle = sock._stream.__dict__.get("handle")
        seen["after"] = type(getattr(handle, "_frames", None)).__name__
        await sock.send(message)
        await trio.sleep_forever()

    url = await serve_raw(nursery, app)
    async with raw_client(url, extensions=[PerMessageDeflate()] if deflate else None) as client:
        assert client.extensions == (["permessage-deflate"] if deflate else [])
        await client.burst("hello")
        assert await client.messages(1) == ["hello"]
    parser = "ClientFrames" if fast and not deflate else "NoneType"
    assert seen == {"accepted": parser, "after": parser}
    nursery.cancel_scope.cancel()
