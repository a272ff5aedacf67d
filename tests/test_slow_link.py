"""A call's frame to a slow reader overtakes the bulk the node holds for it, in the socket too.

The outbox sends the most urgent message first, but once bytes are in the socket's send
buffer their order is fixed, and for a reader that takes its data slowly (a phone on a slow
link) that buffer grows to megabytes: a voice frame written after them would wait for all
of them. The node lets only about one piece wait unsent in the socket
(``mux.direct_writes.UNSENT_BYTES``, ``TCP_NOTSENT_LOWAT``) and keeps the rest in the outbox.

How this works: a real node (in process, Hypercorn on loopback; plain TCP and TLS 1.3). The
receiver connects over a socket with a small receive buffer (what the node has sent and the
receiver not yet read stays small, as on a slow link) and reads nothing for a while. Alice
floods a ``stream`` channel to it with 16,000-byte frames until the node refuses one with
``receiver_full`` (the receiver's queue in the node is full: 32 frames). Carol then sends one
``call:voice`` frame to the same receiver, which only now reads: what arrives before the
voice frame is what was already in the socket. It must be a few pieces (measured: 2), not
the megabytes a socket takes when nothing bounds it (measured with the bound lifted: about
220 frames, 3.5 MB); and every frame acknowledged ``delivered`` still arrives, once and in
order.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import orjson
import pytest
import trio

from mux.client import open_ws
from mux.core import MuxConfig
from mux.wire import pack_binary, unpack_binary

from .nodes import loopback_tls, serve_node
from .wsutil import raw_client, recv, send, ws_url

PIECE = 16_000
QUEUE_FRAMES = 32
RECEIVE_BUFFER = 16 << 10
AHEAD_MOST = 12
"""Bulk frames that may arrive before the call's frame: what the receiver's buffer and the
socket's unsent bytes hold (a few pieces), with room for the kernel's rounding."""


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_a_call_frame_to_a_slow_reader_waits_behind_about_one_piece(
    nursery: trio.Nursery, tmp_path: Path, tls: bool
) -> None:
    ctx: ssl.SSLContext | None = None
    options: dict[str, object] = {}
    if tls:
        certfile, keyfile, ctx = loopback_tls(tmp_path)
        options = {"certfile": certfile, "keyfile": keyfile}
    info = await serve_node(nursery, mux=MuxConfig(channel_buffer_frames=QUEUE_FRAMES), **options)
    base = info.url.replace("https", "http", 1)
    with trio.fail_after(30):
        async with (
            raw_client(ws_url(base, "bob"), ctx, receive_buffer=RECEIVE_BUFFER) as bob,
            open_ws(ws_url(base, "alice").replace("ws", "wss", tls), ctx) as alice,
            open_ws(ws_url(base, "carol").replace("ws", "wss", tls), ctx) as carol,
        ):
            await recv(alice)
            await recv(carol)
            channels = {}
            for ws, intent in ((alice, "stream"), (carol, "call:voice")):
                await send(ws, action="open", target="bob", intent=intent)
                channels[intent] = (await recv(ws))["channel_id"]
            assert [orjson.loads(m)["event"] for m in await bob.messages(3)] == ["connected"] + ["channel_opened"] * 2

            acked: list[int] = []  # the frames acknowledged delivered, in the order sent
            full = False
            for batch in range(100):  # until the node holds a full queue for bob (bounded)
                for i in range(8):
                    n = batch * 8 + i
                    header = {"action": "send", "channel_id": channels["stream"], "ref": n}
                    await alice.send_message(pack_binary(header, n.to_bytes(4, "big") + os.urandom(PIECE - 4)))
                for _ in range(8):
                    reply = await recv(alice)
                    if reply.get("event") == "frame_ack":
                        # after a refusal, a later frame of the batch may find room again
                        assert reply["disposition"] == "delivered" and reply["ref"] > max(acked, default=-1)
                        acked.append(reply["ref"])
                    else:
                        assert reply["error"] == "receiver_full", reply
                        full = True
                if full:
                    break
            assert full and len(acked) >= QUEUE_FRAMES

            await carol.send_message(pack_binary({"action": "send", "channel_id": channels["call:voice"]}, b"v" * 200))
            assert (await recv(carol))["disposition"] == "delivered"

            ahead: list[int] = []
            voice_at = None
            for message in await bob.messages(len(acked) + 1):
                assert isinstance(message, bytes), message
                head, payload = unpack_binary(message)
                if head["channel_id"] == channels["call:voice"]:
                    assert voice_at is None and payload == b"v" * 200
                    voice_at = len(ahead)
                else:
                    ahead.append(int.from_bytes(payload[:4], "big"))
            print(f"{'tls' if tls else 'plain'}: {len(acked)} bulk frames delivered, {voice_at} before the call's")
            assert voice_at is not None and voice_at <= AHEAD_MOST
            assert ahead == acked  # every acknowledged frame, once, in order
