"""Bulk beside a call on one connection (docs/protocol.md, ``window`` and ``pace_ms``), checked
on random bulk traffic (hypothesis) through real sessions on a virtual clock: a bulk sender
that keeps to the hints (one frame in flight, the next after ``pace_ms``, which is reckoned
for a frame of the same size: a file's chunks) is never refused, whatever the size and the
connection's bulk share, and the call's frames are never refused either; nor are two bulk
channels that keep to their own hints side by side."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import trio
import trio.testing
from hypothesis import event, given, settings
from hypothesis import strategies as st

import mux
from mux.session import WireSession
from mux.wire import pack_binary

from .nodes import started_sessions

CALL_PERIOD_S = 0.020


def _reply(session: WireSession, message: str | bytes) -> dict[str, Any]:
    (reply,) = session.handle(message)
    return dict(orjson.loads(reply))


def _drain(receiver: WireSession) -> None:
    """Take everything queued for the receiver (there is no socket here)."""
    while receiver.outbox.get_nowait() is not None:
        pass


async def _call(sender: WireSession, receiver: WireSession, call: str, refusals: list[dict[str, Any]]) -> None:
    """The call's frames, one every ``CALL_PERIOD_S`` (bounded; cancelled when the bulk is
    through); a refused one goes to ``refusals``."""
    for i in range(100_000):
        ack = _reply(sender, pack_binary({"action": "send", "channel_id": call, "ref": i}, bytes(200)))
        if ack.get("event") != "frame_ack":
            refusals.append(ack)
        _drain(receiver)
        await trio.sleep(CALL_PERIOD_S)


@asynccontextmanager
async def _beside_a_call(
    rate: int, gaps: bool, bulk_channels: int, refusals: list[dict[str, Any]]
) -> AsyncIterator[tuple[WireSession, WireSession, list[str]]]:
    """A node whose ``alice`` has a call going to ``bob`` (its frames sent by :func:`_call`, a
    refused one in ``refusals``) and ``bulk_channels`` stream channels beside it, shaped from
    their first frame; yields the two sessions and the bulk channels' ids."""
    async with (
        mux.open_mux(agent="node", realtime_bulk_rate=rate, realtime_bulk_gaps=gaps) as node,
        trio.open_nursery() as nursery,
    ):
        sender, receiver = started_sessions(node, nursery, "alice", "bob")
        call = _reply(sender, '{"action":"open","target":"bob","intent":"call:voice"}')["channel_id"]
        opened = [_reply(sender, '{"action":"open","target":"bob","intent":"stream"}') for _ in range(bulk_channels)]
        nursery.start_soon(_call, sender, receiver, call, refusals)
        await trio.sleep(0.1)  # the call is on: bulk is shaped from its first frame
        yield sender, receiver, [o["channel_id"] for o in opened]
        nursery.cancel_scope.cancel()


_bulk_beside_a_call = given(
    rate=st.integers(20_000, 2_000_000),
    size=st.integers(1, 40_000),
    count=st.integers(1, 25),
    gaps=st.booleans(),
)


@settings(max_examples=60, deadline=None)
@_bulk_beside_a_call
def test_bulk_that_keeps_to_the_hints_is_never_refused_beside_a_call(
    rate: int, size: int, count: int, gaps: bool
) -> None:
    refusals: list[dict[str, Any]] = []
    paces: list[int] = []

    async def scenario() -> None:
        async with _beside_a_call(rate, gaps, 1, refusals) as (sender, receiver, (bulk,)):
            for i in range(count):
                ack = _reply(sender, pack_binary({"action": "send", "channel_id": bulk, "ref": i}, bytes(size)))
                _drain(receiver)
                if ack.get("event") != "frame_ack":
                    refusals.append(ack)
                    break
                assert ack.get("window") == 1, ack  # beside a call: one bulk frame in flight
                pace = ack.get("pace_ms") or 0
                paces.append(pace)
                await trio.sleep(pace / 1000)

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
    event("paced", any(paces))
    assert refusals == [], f"refused while keeping to the hints: {refusals[0]}"


def _two_bulk_channels(rate: int, size: int, count: int, gaps: bool, late_ms: list[int]) -> list[dict[str, Any]]:
    """Two bulk channels beside a call, one sending ``count`` frames of ``size`` bytes, the
    other a file's way (a small chunk header, then the chunk), each keeping to its own hints
    (a frame larger than any its channel sent before is sent once more at its
    ``retry_after_ms``), each frame ``late_ms`` later than its hint said (taken in turn);
    returns the refusals."""
    refusals: list[dict[str, Any]] = []
    delays = itertools.cycle(late_ms)

    async def scenario() -> None:
        async with _beside_a_call(rate, gaps, 2, refusals) as (sender, receiver, channels):

            async def bulk(channel: str, sizes: list[int]) -> None:
                for i, n in enumerate(sizes):
                    message = pack_binary({"action": "send", "channel_id": channel, "ref": i}, bytes(n))
                    ack = _reply(sender, message)
                    _drain(receiver)
                    if ack.get("error") == "throttled" and n > max(sizes[:i], default=0):  # once more
                        await trio.sleep((ack["retry_after_ms"] + next(delays)) / 1000)
                        ack = _reply(sender, message)
                        _drain(receiver)
                    if ack.get("event") != "frame_ack":
                        refusals.append(ack)
                        return
                    await trio.sleep(((ack.get("pace_ms") or 0) + next(delays)) / 1000)

            async with trio.open_nursery() as senders:
                senders.start_soon(bulk, channels[0], [size] * count)
                senders.start_soon(bulk, channels[1], [100, size] * count)

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
    return refusals


@settings(max_examples=40, deadline=None)
@_bulk_beside_a_call
def test_bulk_channels_that_keep_to_the_hints_are_never_refused_together(
    rate: int, size: int, count: int, gaps: bool
) -> None:
    """Two bulk channels on the connection at once (``_two_bulk_channels``), each keeping to
    its own hints on time: neither is refused, as the hints leave room for what the other was
    promised. Only a frame larger than any its channel sent before (its first; a file's
    first chunk after its header) may find no room, the hint having been reckoned for the
    largest so far: its ``retry_after_ms`` then holds a slot, and the same frame sent again
    at it passes."""
    refusals = _two_bulk_channels(rate, size, count, gaps, [0])
    assert refusals == [], f"refused while keeping to the hints: {refusals[0]}"


@settings(max_examples=40, deadline=None)
@given(
    rate=st.integers(200_000, 2_000_000),
    size=st.integers(1_000, 16_384),
    count=st.integers(2, 25),
    gaps=st.booleans(),
    late_ms=st.lists(st.integers(0, 40), min_size=1, max_size=20),
)
def test_bulk_channels_that_keep_to_the_hints_late_are_never_refused_together(
    rate: int, size: int, count: int, gaps: bool, late_ms: list[int]
) -> None:
    """The same two channels as a client across a network sends them: each frame comes later
    than its hint said (the hint's way to the client, the frame's way back, the client's own
    delays: 0 to 40 ms, drawn), so a channel's promised time has often passed when the
    other's next slot is reckoned or its frame comes. Neither is refused all the same (bar a
    frame larger than any its channel sent before, as above): a frame sent at or after its
    slot passes however late it comes."""
    refusals = _two_bulk_channels(rate, size, count, gaps, late_ms)
    assert refusals == [], f"refused while keeping to the hints: {refusals[0]}"
