"""A node's own reads and writes over TLS (``mux.lean_read.LeanReader`` through the
SSLObject, ``mux.direct_writes.TLSWire``).

Over TLS the node reads its socket into the connection's own SSLObject and hands what it
decrypts straight to the WebSocket parser, and its connection writers encrypt with that
SSLObject and put the ciphertext on the socket themselves, past trio's ``SSLStream``
machinery and Hypercorn's read loop and send path. These tests run a real node with TLS 1.3
and real TLS clients: every frame arrives whole and in order (a record out of order or lost
would fail the client's TLS), a pong waits behind what a direct write left, and the node's
``SSLStream.receive_some`` is not used for the relay nor its ``send_all`` for most of the
writes (on the stock path they are, which the same count shows).
"""

from __future__ import annotations

import collections
import contextlib
import ssl
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio

import mux.direct_writes
import mux.hypercorn_conn

from .nodes import loopback_tls, serve_node
from .wsutil import RawClient, raw_client, ws_url


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[str, str, ssl.SSLContext]:
    """A self-signed certificate and key for 127.0.0.1, and a client context trusting it."""
    return loopback_tls(tmp_path)


def _count_server_tls_calls(monkeypatch: pytest.MonkeyPatch) -> collections.Counter[str]:
    """Count the node's (server-side) calls of trio's ``SSLStream.receive_some``/``send_all``,
    and its direct writes (``TLSWire.write``)."""
    calls: collections.Counter[str] = collections.Counter()
    for name in ("receive_some", "send_all"):
        stock = getattr(trio.SSLStream, name)

        def counted(self: Any, *args: Any, _stock: Any = stock, _name: str = name, **kwargs: Any) -> Any:
            if self._ssl_object.server_side:
                calls[_name] += 1
            return _stock(self, *args, **kwargs)

        monkeypatch.setattr(trio.SSLStream, name, counted)
    write = mux.direct_writes.TLSWire.write

    def direct(self: mux.direct_writes.TLSWire, data: bytes) -> bytes:
        calls["direct"] += 1
        return write(self, data)

    monkeypatch.setattr(mux.direct_writes.TLSWire, "write", direct)
    return calls


async def _tls_node(nursery: trio.Nursery, tls_files: tuple[str, str, ssl.SSLContext]) -> tuple[str, ssl.SSLContext]:
    """A node serving TLS 1.3 with ``tls_files``: its base URL (for :func:`ws_url`) and a
    client context trusting it."""
    certfile, keyfile, ctx = tls_files
    info = await serve_node(nursery, certfile=certfile, keyfile=keyfile)
    return info.url.replace("https", "http", 1), ctx


async def _events(client: RawClient, n: int) -> list[dict[str, Any]]:
    return [orjson.loads(m) for m in await client.messages(n)]


async def _open(tx: RawClient, rx: RawClient, target: str) -> str:
    await _events(tx, 1)  # connected
    await _events(rx, 1)
    await tx.burst(orjson.dumps({"action": "open", "target": target, "intent": "stream", "ref": "o"}).decode())
    (opened,) = await _events(tx, 1)
    assert opened["event"] == "channel_opened", opened
    await _events(rx, 1)
    return str(opened["channel_id"])


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "stock"])
async def test_over_tls_the_node_reads_and_writes_through_the_ssl_object_itself(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, tls_files: tuple[str, str, ssl.SSLContext], direct: bool
) -> None:
    """300 frames of 100 B to 15 KB, sent 10 to a write with pings among them (writes of
    several TLS records each way), arrive whole and in order with their acks and pongs.
    Directly, the node calls trio's ``SSLStream`` for none of the relay's reads, and writes
    its frames and acks itself (trio's ``send_all`` carries Hypercorn's pongs, and a write
    that found Hypercorn writing one); on the stock path (the TLS stream made unknown to
    ``mux.hypercorn_conn``) trio reads and writes every burst."""
    if not direct:
        monkeypatch.setattr(mux.hypercorn_conn, "tls_known", lambda tls: False)
    calls = _count_server_tls_calls(monkeypatch)
    url, ctx = await _tls_node(nursery, tls_files)
    async with raw_client(ws_url(url, "tlsd-tx"), ctx) as tx, raw_client(ws_url(url, "tlsd-rx"), ctx) as rx:
        cid = await _open(tx, rx, "tlsd-rx")
        sizes = [100, 3_000, 15_000, 9_000, 100]
        calls.clear()
        sent = 0
        for burst in range(30):
            items: list[str | None] = []
            for i in range(10):
                n = burst * 10 + i
                body = {"n": n, "p": chr(97 + n % 26) * sizes[n % len(sizes)]}
                items.append(orjson.dumps({"action": "send", "channel_id": cid, "ref": n, "payload": body}).decode())
            items.insert(5, None)  # a ping among the sends
            await tx.burst(*items)
            sent += 10
            acks = await _events(tx, 10)
            assert [a["ref"] for a in acks] == list(range(sent - 10, sent)), acks
            assert all(a["event"] == "frame_ack" and a["delivered"] for a in acks), acks
            got = await _events(rx, 10)
            for event in got:
                n = event["payload"]["n"]
                assert event["payload"]["p"] == chr(97 + n % 26) * sizes[n % len(sizes)]
            assert [e["payload"]["n"] for e in got] == list(range(sent - 10, sent))
        for client in (tx, rx):  # a WebSocket ping, then a ping action: its reply comes after the pong
            await client.burst(None, orjson.dumps({"action": "ping"}).decode())
            (reply,) = await _events(client, 1)
            assert reply["event"] == "pong", reply
        assert (tx.pongs, rx.pongs) == (31, 1)
    if direct:
        assert calls["receive_some"] <= 2, calls  # the read each side was already waiting in
        assert calls["direct"] >= 60, calls  # each burst's acks and frames, at least
        assert calls["send_all"] <= 2 * 32, calls  # Hypercorn's 32 pongs, and a write behind each
    else:
        assert calls["receive_some"] >= 30 and calls["send_all"] >= 60 and not calls["direct"], calls
    nursery.cancel_scope.cancel()


async def test_over_tls_a_direct_write_the_socket_takes_part_of_goes_out_first(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, tls_files: tuple[str, str, ssl.SSLContext]
) -> None:
    """Frames relayed over TLS to a receiver that reads nothing for a while fill its socket:
    an encrypted write of the connection's writer is then only partly taken, and the rest of
    its ciphertext goes out before anything else (a ping's pong waits behind it). Once the
    receiver reads, every delivered frame arrives whole and in order (its TLS would fail on
    a record out of place) and its ping is answered."""
    partial = 0
    held = trio.Event()
    write = mux.direct_writes.TLSWire.write

    def counted(self: mux.direct_writes.TLSWire, data: bytes) -> bytes:
        nonlocal partial
        rest = write(self, data)
        if rest:
            partial += 1
            held.set()
        return rest

    monkeypatch.setattr(mux.direct_writes.TLSWire, "write", counted)
    url, ctx = await _tls_node(nursery, tls_files)
    body = "x" * 12_000
    async with raw_client(ws_url(url, "tlsp-tx"), ctx) as tx, raw_client(ws_url(url, "tlsp-rx"), ctx) as rx:
        cid = await _open(tx, rx, "tlsp-rx")
        delivered: list[int] = []
        outcomes = 0

        async def sender() -> None:
            nonlocal outcomes
            for n in range(400):
                send = {"action": "send", "channel_id": cid, "ref": n, "payload": {"n": n, "p": body}}
                await tx.burst(orjson.dumps(send).decode())
            while outcomes < 400:
                for reply in await _events(tx, 1):
                    if reply.get("event") == "frame_ack":
                        outcomes += 1
                        if reply["delivered"]:
                            delivered.append(reply["ref"])
                    elif reply.get("error") == "receiver_full":
                        outcomes += 1

        async with trio.open_nursery() as inner:
            inner.start_soon(sender)  # every send is answered (receiver_full once its queue is full)
            with trio.fail_after(10):  # the receiver reads nothing: its socket fills
                await held.wait()
            await rx.burst(None)  # a ping, while the rest of a write is held
        got: list[int] = []
        with trio.fail_after(30):
            while len(got) < len(delivered):
                for message in await rx.messages(1):
                    event = orjson.loads(message)
                    assert event["event"] == "frame" and event["payload"]["p"] == body, str(message)[:200]
                    got.append(event["payload"]["n"])
    assert partial > 0  # some encrypted writes were only partly taken
    assert got == delivered and len(got) >= 64, (len(got), len(delivered))
    assert got == sorted(got)
    assert rx.pongs == 1
    nursery.cancel_scope.cancel()


async def test_over_tls_garbage_from_a_client_ends_its_connection_only(
    nursery: trio.Nursery, tls_files: tuple[str, str, ssl.SSLContext]
) -> None:
    """A client whose bytes stop being TLS (written under its TLS, straight onto the TCP
    socket) fails the node's decryption in the lean reader: trio's reader meets the same
    error and that connection ends. Another pair of clients relays on, before and after."""
    url, ctx = await _tls_node(nursery, tls_files)
    async with (
        raw_client(ws_url(url, "tlsg-a"), ctx) as a,
        raw_client(ws_url(url, "tlsg-b"), ctx) as b,
        raw_client(ws_url(url, "tlsg-bad"), ctx) as bad,
    ):
        cid = await _open(a, b, "tlsg-b")
        await _events(bad, 1)  # connected

        async def relay(n: int) -> None:
            await a.burst(orjson.dumps({"action": "send", "channel_id": cid, "ref": n, "payload": {"n": n}}).decode())
            (ack,) = await _events(a, 1)
            assert ack["event"] == "frame_ack" and ack["delivered"], ack
            (frame,) = await _events(b, 1)
            assert frame["payload"] == {"n": n}

        await relay(1)
        await bad.burst(orjson.dumps({"action": "ping"}).decode())  # the read Hypercorn was already waiting in
        (pong,) = await _events(bad, 1)
        assert pong["event"] == "pong"
        assert isinstance(bad.stream, trio.SSLStream)
        await bad.stream.transport_stream.send_all(b"\x17\x03\x03\x00\x20" + bytes(range(32)))  # a forged record
        with trio.fail_after(10):
            while await bad.stream.receive_some(1 << 16):
                pass  # the node answers with an alert at most, then ends the connection
        await relay(2)
    nursery.cancel_scope.cancel()


async def test_over_tls_a_write_the_tls_layer_refuses_closes_that_connection_only(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, tls_files: tuple[str, str, ssl.SSLContext]
) -> None:
    """When the node's SSLObject refuses a write (here: any write carrying a marked payload),
    the direct write writes nothing and hands the data to Hypercorn's own path, which meets
    the same failure and closes that connection's stream: its channel closes, its socket
    ends at its next read (as on Hypercorn's own path), and the sender's other channel goes
    on."""
    stock = ssl.SSLObject.write

    def write(self: ssl.SSLObject, data: Any) -> int:
        if self.server_side and b"refuse-me" in bytes(data):
            raise ssl.SSLError("refused by the test")
        return stock(self, data)

    monkeypatch.setattr(ssl.SSLObject, "write", write)
    url, ctx = await _tls_node(nursery, tls_files)
    async with (
        raw_client(ws_url(url, "tlsw-a"), ctx) as a,
        raw_client(ws_url(url, "tlsw-b"), ctx) as b,
        raw_client(ws_url(url, "tlsw-c"), ctx) as c,
    ):
        to_b = await _open(a, b, "tlsw-b")
        await _events(c, 1)  # connected
        await a.burst(orjson.dumps({"action": "open", "target": "tlsw-c", "intent": "stream", "ref": "o"}).decode())
        (opened,) = await _events(a, 1)
        await _events(c, 1)
        to_c = opened["channel_id"]
        send = {"action": "send", "channel_id": to_b, "ref": 1, "payload": {"p": "refuse-me"}}
        await a.burst(orjson.dumps(send).decode())
        ack, closed = await _events(a, 2)  # delivered to b's connection, whose write then fails
        assert ack["event"] == "frame_ack" and ack["ref"] == 1, ack
        assert closed["event"] == "channel_closed" and closed["channel_id"] == to_b, closed
        await b.burst(None)  # the node reads it on a connection whose stream is closed: the end
        with trio.fail_after(10), contextlib.suppress(trio.BrokenResourceError):
            while await b.stream.receive_some(1 << 16):
                pass
        send = {"action": "send", "channel_id": to_c, "ref": 2, "payload": {"p": "fine"}}
        await a.burst(orjson.dumps(send).decode())
        (ack,) = await _events(a, 1)
        assert ack["event"] == "frame_ack" and ack["ref"] == 2 and ack["delivered"], ack
        (frame,) = await _events(c, 1)
        assert frame["payload"] == {"p": "fine"}
    nursery.cancel_scope.cancel()
