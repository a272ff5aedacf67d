"""Bulk channels of ``mux.client`` beside a call, on a real node over a real WebSocket: the
client keeps to the node's hints (docs/protocol.md, ``window`` and ``pace_ms``), its frames
come later than the hints said (the way back to the node, the client's own turns), and after
each channel's first frame of a size none is refused. The call's frames are never refused."""

from __future__ import annotations

import collections
from typing import Any

import pytest
import trio

from mux.client import ClientChannel, connect
from mux.errors import ChannelThrottled
from mux.server import ServeInfo

BULK_BYTES = 16_000
"""One bulk frame: 16 kB (under ``mux.client``'s piece size, so each is one ``send``)."""
FRAMES = 40
"""Per bulk channel: 40 x 16 kB at the node's 2 MB/s beside a call, both channels, 0.7 s."""


async def _talk(call: ClientChannel) -> None:
    """The call: its offer, then a 200-byte frame every 20 ms (bounded; cancelled when the
    test's bulk is through)."""
    await call.send({"type": "offer", "sdp": "v=0"})
    for i in range(1000):
        await call.send(i.to_bytes(4, "big") + bytes(196))
        await trio.sleep(0.020)


async def test_bulk_that_keeps_to_the_hints_is_not_refused_beside_a_call(server: ServeInfo) -> None:
    """Two bulk channels, one of 16 kB frames and one a file's way (a 100-byte chunk header,
    then the chunk), each sent one frame at a time by ``mux.client``: only a frame larger
    than any its channel sent before may be refused (its slot was reckoned for the largest so
    far), and it passes when sent again."""
    refused: collections.Counter[str] = collections.Counter()
    late: list[tuple[str, int]] = []
    with trio.fail_after(30):
        async with connect(server.url, "alice") as alice, connect(server.url, "bob") as bob:
            call = await alice.open("bob", "call:voice")
            stream = await alice.open("bob", "stream")
            files = await alice.open("bob", "stream")
            theirs = [await bob.accept() for _ in range(3)]
            received = 0

            async def read(ch: ClientChannel) -> None:
                nonlocal received
                while True:
                    payload = (await ch.receive()).get("payload")
                    if isinstance(payload, bytes) and len(payload) == BULK_BYTES:
                        received += 1

            async def bulk(ch: ClientChannel, name: str, sizes: list[int]) -> None:
                largest = 0
                for n in sizes:
                    for _ in range(3):  # a refused frame is sent again at its retry_after_ms
                        try:
                            await ch.send(bytes(n))
                            break
                        except ChannelThrottled:
                            refused[name] += 1
                            if n <= largest:  # not a frame larger than any its channel sent before
                                late.append((name, n))
                    largest = max(largest, n)

            async with trio.open_nursery() as nursery:
                for ch in theirs:
                    nursery.start_soon(read, ch)
                nursery.start_soon(_talk, call)
                await trio.sleep(0.2)  # the call is on: bulk is shaped from its first frame
                async with trio.open_nursery() as senders:
                    senders.start_soon(bulk, stream, "stream", [BULK_BYTES] * FRAMES)
                    senders.start_soon(bulk, files, "file", [100, BULK_BYTES] * FRAMES)  # header, chunk
                with trio.move_on_after(5):
                    while received < 2 * FRAMES:  # noqa: ASYNC110  (bounded)
                        await trio.sleep(0.02)
                nursery.cancel_scope.cancel()
            assert received == 2 * FRAMES
            assert stream.window == 1  # shaped all along: the call was active
    assert late == [], f"refused while keeping to the hints: {late} (refusals {dict(refused)})"


@pytest.mark.parametrize(("intent", "most"), [("stream", 1), ("chat", 8)])
async def test_concurrent_sends_beside_a_call_wait_for_the_first_hint(
    server: ServeInfo, intent: str, most: int
) -> None:
    """Several tasks sending on one channel at once, beside a call. On a preemptible channel
    (``stream``) ``mux.client`` keeps one frame in flight until the node's first answer (the
    node shapes the channel from its first frame, and a burst sent before the hint came would
    be refused), so none of the burst is refused; a channel the node does not shape (``chat``)
    sends its burst at once."""
    refused: list[str] = []
    in_flight = peak = 0
    with trio.fail_after(30):
        async with connect(server.url, "alice") as alice, connect(server.url, "bob") as bob:
            call = await alice.open("bob", "call:voice")
            burst = await alice.open("bob", intent)
            theirs = [await bob.accept() for _ in range(2)]
            request = alice._request

            async def counting(message: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
                nonlocal in_flight, peak
                counted = message.get("channel_id") == burst.id
                if counted:
                    in_flight += 1
                    peak = max(peak, in_flight)
                try:
                    return await request(message, **kwargs)
                finally:
                    if counted:
                        in_flight -= 1

            alice._request = counting  # type: ignore[method-assign]

            async def drain(ch: ClientChannel) -> None:
                while True:
                    await ch.receive()

            async def send(i: int) -> None:
                try:
                    await burst.send(bytes(BULK_BYTES) if intent == "stream" else {"i": i})
                except ChannelThrottled:
                    refused.append(f"send {i}")

            async with trio.open_nursery() as nursery:
                for ch in theirs:
                    nursery.start_soon(drain, ch)
                nursery.start_soon(_talk, call)
                await trio.sleep(0.1)  # the call is active now
                async with trio.open_nursery() as senders:
                    for j in range(8):
                        senders.start_soon(send, j)
                nursery.cancel_scope.cancel()
    assert refused == []
    assert peak == most
