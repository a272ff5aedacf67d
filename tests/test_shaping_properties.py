"""Bulk beside a call on one connection (docs/protocol.md, ``window`` and ``pace_ms``), checked
on random bulk traffic (hypothesis) through real sessions on a virtual clock: a bulk sender
that keeps to the hints (one frame in flight, the next after ``pace_ms``, which is reckoned
for a frame of the same size: a file's chunks) is never refused, whatever the size and the
connection's bulk share, and the call's frames are never refused either."""

from __future__ import annotations

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


@settings(max_examples=60, deadline=None)
@given(
    rate=st.integers(20_000, 2_000_000),
    size=st.integers(1, 40_000),
    count=st.integers(1, 25),
    gaps=st.booleans(),
)
def test_bulk_that_keeps_to_the_hints_is_never_refused_beside_a_call(
    rate: int, size: int, count: int, gaps: bool
) -> None:
    refusals: list[dict[str, Any]] = []
    paces: list[int] = []

    async def scenario() -> None:
        async with (
            mux.open_mux(agent="node", realtime_bulk_rate=rate, realtime_bulk_gaps=gaps) as node,
            trio.open_nursery() as nursery,
        ):
            sender, receiver = started_sessions(node, nursery, "alice", "bob")
            call = _reply(sender, '{"action":"open","target":"bob","intent":"call:voice"}')["channel_id"]
            bulk = _reply(sender, '{"action":"open","target":"bob","intent":"stream"}')["channel_id"]

            def drain() -> None:
                while receiver.outbox.get_nowait() is not None:
                    pass

            async def caller() -> None:
                for i in range(100_000):  # bounded; cancelled when the bulk is through
                    ack = _reply(sender, pack_binary({"action": "send", "channel_id": call, "ref": i}, bytes(200)))
                    if ack.get("event") != "frame_ack":
                        refusals.append(ack)
                    drain()
                    await trio.sleep(CALL_PERIOD_S)

            nursery.start_soon(caller)
            await trio.sleep(0.1)  # the call is on: bulk is shaped from its first frame
            for i in range(count):
                ack = _reply(sender, pack_binary({"action": "send", "channel_id": bulk, "ref": i}, bytes(size)))
                drain()
                if ack.get("event") != "frame_ack":
                    refusals.append(ack)
                    break
                assert ack.get("window") == 1, ack  # beside a call: one bulk frame in flight
                pace = ack.get("pace_ms") or 0
                paces.append(pace)
                await trio.sleep(pace / 1000)
            nursery.cancel_scope.cancel()

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
    event("paced", any(paces))
    assert refusals == [], f"refused while keeping to the hints: {refusals[0]}"
