"""Flow control per channel (docs/protocol.md), checked on random traffic (hypothesis): one
sender on one connection, two channels to a receiver that reads slowly or not at all and two
to one that keeps up. The slow receiver's channels are refused ``receiver_full`` exactly when
their queue is full, never closed, and its connection never holds more than its queues'
bound; the other channels never see a refusal; and once read, every acknowledged frame has
arrived, in order, and no refused one."""

from __future__ import annotations

import collections
from typing import Any

import orjson
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

import mux
from mux.session import WireSession

plans = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.integers(0, 3), st.integers(1, 6)),
        st.tuples(st.just("slow_reads"), st.just(0), st.integers(1, 8)),
    ),
    max_size=40,
)
"""Steps: ``send`` k frames on channel i (0 and 1 go to the slow receiver), or the slow
receiver reads k messages."""


def _events(messages: list[str | bytes]) -> list[dict[str, Any]]:
    return [orjson.loads(m) for m in messages]


def _drain(session: WireSession, limit: int | None = None) -> list[dict[str, Any]]:
    out: list[str | bytes] = []
    while (limit is None or len(out) < limit) and (m := session.outbox.get_nowait()) is not None:
        out.append(m)
    return _events(out)


@settings(max_examples=150, deadline=None)
@given(buffer=st.integers(1, 6), plan=plans)
async def test_a_slow_receiver_is_refused_per_channel_and_loses_nothing_acknowledged(
    buffer: int, plan: list[tuple[str, int, int]]
) -> None:
    async with mux.open_mux(agent="node", channel_buffer_frames=buffer) as node, trio.open_nursery() as nursery:
        sender, slow, quick = (
            WireSession(node, node.attach(name), max_message_bytes=1 << 20) for name in ("alice", "slow", "quick")
        )
        for session in (sender, slow, quick):
            session.start(nursery)
        channels: list[str] = []
        for target in ("slow", "slow", "quick", "quick"):
            (opened,) = _events(sender.handle(orjson.dumps({"action": "open", "target": target}).decode()))
            channels.append(opened["channel_id"])
        announced = [e for e in _drain(slow) if e.get("event") == "channel_opened"]
        assert len(announced) == 2  # the slow receiver reads these, then its channels' frames wait
        _drain(quick)

        acked: dict[str, list[int]] = collections.defaultdict(list)
        refused: dict[str, int] = collections.Counter()
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
                room = slow.outbox.has_room(cid) if i < 2 else True
                message = {"action": "send", "channel_id": cid, "ref": n, "payload": {"n": n}}
                (reply,) = _events(sender.handle(orjson.dumps(message).decode()))
                if room:
                    assert reply.get("event") == "frame_ack" and reply["ref"] == n, reply
                    acked[cid].append(n)
                else:
                    assert reply.get("error") == "receiver_full" and reply.get("channel_id") == cid, reply
                    refused[cid] += 1
                arrive(_drain(quick))  # the quick receiver reads each frame as it comes
            assert slow.outbox.queued <= 2 * buffer, "the slow connection holds at most its queues' bound"
            assert _drain(sender) == []  # nothing else for the sender: no close, no error event
        assert all(channels[i] not in refused for i in (2, 3)), "a slow receiver never refuses another's channel"
        assert {c["channel_id"] for c in node.channels()} >= set(channels), "no channel was closed"
        arrive(_drain(slow))
        for cid in channels:
            assert arrived[cid] == acked[cid], "every acknowledged frame arrived, in order, and no refused one"
        nursery.cancel_scope.cancel()
