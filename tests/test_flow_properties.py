"""Flow control per channel (docs/protocol.md), checked on random traffic (hypothesis): one
sender on one connection, two ``stream`` channels and a call's (``call:voice``, binary media)
to a receiver that reads slowly or not at all, and two to one that keeps up. The slow
receiver's stream channels are refused ``receiver_full`` exactly when their queue is full;
the call's media is never refused but dropped late when its queue is full (acknowledged as
``dropped``, and counted); no channel is closed, and the slow connection never holds more
than its queues' bound; the quick receiver's channels never see a refusal; and once read,
every frame acknowledged as delivered has arrived, in order, and nothing else."""

from __future__ import annotations

import collections
from typing import Any

import orjson
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

import mux
from mux.session import WireSession

from .nodes import outbox_events, send_numbered, started_sessions

plans = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.integers(0, 4), st.integers(1, 6)),
        st.tuples(st.just("slow_reads"), st.just(0), st.integers(1, 8)),
    ),
    max_size=40,
)
"""Steps: ``send`` k frames on channel i (0, 1 and the call, 4, go to the slow receiver), or
the slow receiver reads k messages."""
SLOW = (0, 1, 4)
CALL = 4


def _drain(session: WireSession, limit: int | None = None) -> list[dict[str, Any]]:
    out: list[str | bytes] = []
    while (limit is None or len(out) < limit) and (m := session.outbox.get_nowait()) is not None:
        out.append(m)
    return outbox_events(out)


@settings(max_examples=150, deadline=None)
@given(buffer=st.integers(1, 6), plan=plans)
async def test_a_slow_receiver_is_refused_per_channel_and_loses_nothing_acknowledged(
    buffer: int, plan: list[tuple[str, int, int]]
) -> None:
    async with mux.open_mux(agent="node", channel_buffer_frames=buffer) as node, trio.open_nursery() as nursery:
        sender, slow, quick = started_sessions(node, nursery, "alice", "slow", "quick")
        channels: list[str] = []
        for target, intent in (
            ("slow", "stream"),
            ("slow", "stream"),
            ("quick", "stream"),
            ("quick", "stream"),
            ("slow", "call:voice"),
        ):
            opening = {"action": "open", "target": target, "intent": intent}
            (opened,) = outbox_events(sender.handle(orjson.dumps(opening).decode()))
            channels.append(opened["channel_id"])
        announced = [e for e in _drain(slow) if e.get("event") == "channel_opened"]
        assert len(announced) == 3  # the slow receiver reads these, then its channels' frames wait
        _drain(quick)

        acked: dict[str, list[int]] = collections.defaultdict(list)
        refused: dict[str, int] = collections.Counter()
        dropped = 0
        arrived: dict[str, list[int]] = collections.defaultdict(list)
        n = 0

        def arrive(events: list[dict[str, Any]]) -> None:
            for e in events:
                if e.get("event") == "frame":
                    arrived[e["channel_id"]].append(e["payload"]["n"])

        for step, i, k in plan:
            if step == "slow_reads":
                arrive(_drain(slow, k))
                continue
            cid = channels[i]
            for _ in range(k):
                n += 1
                room = slow.outbox.has_room(cid) if i in SLOW else True
                reply = send_numbered(sender, cid, n, binary=i == CALL)  # a call's media is binary
                if room:
                    assert reply.get("event") == "frame_ack" and reply["ref"] == n, reply
                    assert reply["disposition"] == "delivered", reply
                    acked[cid].append(n)
                elif i == CALL:  # dropped late, never refused: the call goes on
                    assert reply.get("event") == "frame_ack" and reply["disposition"] == "dropped", reply
                    dropped += 1
                else:
                    assert reply.get("error") == "receiver_full" and reply.get("channel_id") == cid, reply
                    refused[cid] += 1
                arrive(_drain(quick))  # the quick receiver reads each frame as it comes
            assert slow.outbox.queued <= len(SLOW) * buffer, "the slow connection holds at most its queues' bound"
            assert _drain(sender) == []  # nothing else for the sender: no close, no error event
        assert all(channels[i] not in refused for i in (2, 3)), "a slow receiver never refuses another's channel"
        assert channels[CALL] not in refused, "media is dropped late, never refused"
        states = {c["channel_id"]: c for c in node.channels()}
        assert set(states) >= set(channels), "no channel was closed"
        call_state = states[channels[CALL]]
        assert call_state["backend_state"]["media_dropped"] == call_state["dropped"] == dropped, "drops are counted"
        arrive(_drain(slow))
        for cid in channels:
            assert arrived[cid] == acked[cid], "every acknowledged frame arrived, in order, and no refused one"
        nursery.cancel_scope.cancel()
