"""Everything at once on one TLS node, then nothing left behind.

Each of the other tests drives one feature. Here they all run together through ``mux.client``
on a real node over TLS: a call with bulk in pieces beside it on the same connection (the
callee answers probes), a batching sender on several channels, durable chat to an agent
that connects later, channels opened and closed in a loop, a client sending malformed
messages, and agents that vanish mid-send (their TCP socket reset, no close frame). Every
frame the callee gets verifies with the node's key, each channel's frames come once and in
order, and nothing acknowledged is lost. Once every agent has left, the node holds no
connection, channel, unfinished send in pieces, reader budget or probe window, its mailbox
is empty, and it logged no error.
"""

from __future__ import annotations

import logging
import socket
import struct
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket

from mux.client import ClientChannel, MuxConnection, connect, open_ws
from mux.errors import ChannelClosed, ChannelThrottled
from mux.wire import CHUNK_BYTES, pack_binary

from .nodes import loopback_tls, serve_node
from .wsutil import recv, send, ws_url

VOICE_FRAMES = 100
"""The call: a 200-byte frame every 20 ms, 2 s."""
BULK_SENDS = 24
BULK_BYTES = 70_000
"""Beside the call on the caller's connection: sent in pieces (over ``mux.client``'s piece size)."""
BATCH_CHANNELS = 4
BATCH_SENDS = 60
"""A batching connection's senders, one per channel, all at once (so they go out in batches)."""
CHAT_SENDS = 40
"""Durable chat to an agent that is not connected yet."""
CHURN_CHANNELS = 30
VANISHING = 3
"""Agents that reset their socket in the middle of a send in pieces."""
BAD = [
    "{",
    "[]",
    "null",
    '{"action":"send"}',
    '{"action":"open","target":1}',
    '{"action":"probe","n":"x"}',
    '{"action":"send","channel_id":"ch-nope","payload":1}',
    '{"action":"batch","actions":[{}]}',
    '{"action":"no_such_action"}',
]


def numbered(i: int, size: int) -> bytes:
    """Payload ``i`` of ``size`` bytes: its number, then bytes that depend on it."""
    return i.to_bytes(8, "big") + bytes([i % 251]) * (size - 8)


async def send_all(ch: ClientChannel, payloads: list[Any], refused: list[str]) -> None:
    """Send each payload in turn; one refused for its budget goes again after the wait the
    node asked for (bounded)."""
    for payload in payloads:
        for _ in range(200):
            try:
                await ch.send(payload)
                break
            except ChannelThrottled as exc:
                refused.append(ch.intent)
                await trio.sleep((exc.retry_after_ms or 10) / 1000)
        else:
            raise AssertionError(f"{ch.intent}: a frame refused 200 times")


def reset(ws: trio_websocket.WebSocketConnection) -> None:
    """Close ``ws``'s TCP socket with a reset (SO_LINGER 0): no close frame, no FIN."""
    stream: Any = ws._stream  # trio's SSLStream over its SocketStream
    raw = stream.transport_stream.socket
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.close()


async def test_everything_at_once_arrives_once_in_order_and_leaves_nothing_behind(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    certfile, keyfile, ctx = loopback_tls(tmp_path)
    info = await serve_node(nursery, certfile=certfile, keyfile=keyfile)
    url = info.url
    got: dict[str, list[Any]] = {}  # bob's frames by channel id: payload numbers, in order
    closed: dict[str, str] = {}
    refused: list[str] = []
    vanished: set[str] = set()

    async def take(bob: MuxConnection, ch: ClientChannel) -> None:
        frames = got.setdefault(ch.id, [])
        try:
            async for frame in ch:
                bob.verify(frame)  # signed by the node, whole
                payload = frame["payload"]
                if isinstance(payload, bytes):
                    i = int.from_bytes(payload[:8], "big")
                    assert payload == numbered(i, len(payload)), f"frame {i} of {ch.intent} changed"
                    frames.append(i)
                else:
                    frames.append(payload["i"])
        except ChannelClosed:
            pass
        closed[ch.id] = ch.closed_reason or ""

    async def vanish(k: int) -> None:
        """Two whole frames, then the first piece of a send in three (confirmed, so the node
        holds it), then the socket is reset."""
        async with open_ws(ws_url(url, f"eve{k}"), ctx) as eve:
            assert (await recv(eve))["event"] == "connected"
            await send(eve, action="open", target="bob", intent="stream", ref="o")
            cid = (await recv(eve))["channel_id"]
            vanished.add(cid)
            for i in range(2):
                await eve.send_message(pack_binary({"action": "send", "channel_id": cid, "ref": i}, numbered(i, 1000)))
                assert (await recv(eve))["event"] == "frame_ack"
            piece = {"action": "send", "channel_id": cid, "ref": 2, "part": 0, "parts": 3, "part_ack": True}
            await eve.send_message(pack_binary(piece, numbered(2, 3 * CHUNK_BYTES)[:CHUNK_BYTES]))
            assert (await recv(eve))["event"] == "part_ack"
            reset(eve)

    with trio.fail_after(60):
        async with (
            connect(url, "bob", ssl_context=ctx) as bob,
            connect(url, "alice", ssl_context=ctx) as alice,
            connect(url, "carol", ssl_context=ctx, batch=True) as carol,
            connect(url, "dave", ssl_context=ctx) as dave,
            trio.open_nursery() as readers,
        ):

            async def accept_all() -> None:
                async for ch in bob.incoming():
                    readers.start_soon(take, bob, ch)

            readers.start_soon(accept_all)
            call = await alice.open("bob", "call:voice")
            bulk = await alice.open("bob", "stream")
            chat = await alice.open("zed", "chat")  # zed connects later: its mailbox keeps it
            batched = [await carol.open("bob", "stream") for _ in range(BATCH_CHANNELS)]

            async def talk() -> None:
                for i in range(VOICE_FRAMES):
                    await call.send(numbered(i, 200))  # a refusal would raise: none may come
                    await trio.sleep(0.020)

            async def churn() -> None:
                for k in range(CHURN_CHANNELS):
                    ch = await dave.open("bob", "stream" if k % 2 else "generic")
                    await send_all(ch, [{"i": i} for i in range(k % 4)], refused)
                    await ch.close()

            async def bad_client() -> None:
                async with open_ws(ws_url(url, "mallory"), ctx) as ws:
                    assert (await recv(ws))["event"] == "connected"
                    for message in BAD:
                        await ws.send_message(message)
                        assert "error" in await recv(ws), message
                    await send(ws, action="ping", ref="alive")
                    assert (await recv(ws))["event"] == "pong"

            async with trio.open_nursery() as work:
                work.start_soon(talk)
                work.start_soon(send_all, bulk, [numbered(i, BULK_BYTES) for i in range(BULK_SENDS)], refused)
                for ch in batched:
                    work.start_soon(send_all, ch, [numbered(i, 2000) for i in range(BATCH_SENDS)], refused)
                work.start_soon(send_all, chat, [{"i": i} for i in range(CHAT_SENDS)], refused)
                work.start_soon(churn)
                work.start_soon(bad_client)
                for k in range(VANISHING):
                    work.start_soon(vanish, k)
            expected = {call.id: VOICE_FRAMES, bulk.id: BULK_SENDS, **{ch.id: BATCH_SENDS for ch in batched}}
            churn_frames = sum(k % 4 for k in range(CHURN_CHANNELS))

            def settled() -> bool:
                """Every frame acknowledged has reached bob, and every channel that ended
                has closed for him."""
                churned = [cid for cid in got if cid not in expected and cid not in vanished]
                return (
                    all(len(got.get(cid, ())) >= n for cid, n in expected.items())
                    and sum(len(got[cid]) for cid in churned) >= churn_frames
                    and all(cid in closed for cid in churned if got[cid])
                    and all(cid in closed for cid in vanished)
                )

            while not settled():  # noqa: ASYNC110  (bounded by fail_after)
                await trio.sleep(0.01)  # acknowledged frames still on their way to bob
            probes = (await _status(url, ctx))["probes"]
            assert probes["sent"] > 0 and probes["lost"] == 0  # bob's bulk came beside his call
            readers.cancel_scope.cancel()

        # zed comes: its chat waited in its mailbox; it takes every frame and acknowledges it
        async with connect(url, "zed", ssl_context=ctx) as zed:
            theirs = await zed.accept()
            chat_got = []
            while len(chat_got) < CHAT_SENDS:
                frame = await theirs.receive()
                zed.verify(frame)
                chat_got.append(frame["payload"]["i"])
                await theirs.ack(frame["seq"])
            await theirs.close()
        assert chat_got == list(range(CHAT_SENDS))

        status: dict[str, Any] = {}
        for _ in range(100):  # every agent left: their connections end (bounded)
            status = await _status(info.url, ctx)
            if status["connections"] == 0 and status["channels_open"] == 0:
                break
            await trio.sleep(0.05)

    assert got[call.id] == list(range(VOICE_FRAMES)) and "call:voice" not in refused
    assert got[bulk.id] == list(range(BULK_SENDS))
    for ch in batched:
        assert got[ch.id] == list(range(BATCH_SENDS))
    churned = [cid for cid in got if cid not in vanished and cid not in (call.id, bulk.id, *(c.id for c in batched))]
    # a channel closed before bob took it, with no frame in it, is not handed to him
    assert sorted(n for cid in churned if (n := len(got[cid]))) == sorted(k % 4 for k in range(CHURN_CHANNELS) if k % 4)
    for cid in churned:
        assert got[cid] == list(range(len(got[cid])))
    assert len(vanished) == VANISHING
    for cid in vanished:  # the whole frames; the channel closed when its agent vanished
        assert got[cid] == [0, 1] and closed[cid] == "ws_disconnect"
    assert status["connections"] == 0 and status["channels_open"] == 0
    assert status["pieces"]["sends"] == 0 and status["pieces"]["bytes"] == 0
    assert status["readers"]["connections"] == 0 and status["probes"]["connections"] == 0
    assert status["mailboxes"]["frames"] == 0
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not errors, [r.getMessage() for r in errors]


async def _status(url: str, ctx: Any) -> dict[str, Any]:
    import httpx

    async with httpx.AsyncClient(verify=ctx) as http:
        status: dict[str, Any] = (await http.get(url + "/api/mux/status")).json()
    return status
