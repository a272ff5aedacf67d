"""Receive windows (``?window=N``, docs/protocol.md "Receive windows"), checked on random
traffic (hypothesis) through real sessions: a sender's ``stream`` channels and a call's
(``call:voice`` media) to a receiver whose connection has a window of N frames per channel.
The receiver's socket takes everything the node writes, but its application gives credit
back only now and then. However the steps interleave: no channel ever has more than N
frames at the client beyond the credit it gave; a stream frame is refused
``receiver_full`` only while that channel holds its bound of frames waiting, a call's media
is dropped then, never refused; what the node holds for the receiver stays within its
queues' bound; and once credit is given, every frame acknowledged as delivered arrives, in
order, once, followed by the channel's ``channel_closed`` when the sender closed it."""

from __future__ import annotations

import collections

import orjson
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

import mux

from .nodes import outbox_events, send_numbered, started_sessions

CHANNELS = ("stream", "stream", "call:voice")
CALL = 2

plans = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.integers(0, len(CHANNELS) - 1), st.integers(1, 6)),
        st.tuples(st.just("read"), st.just(0), st.integers(1, 8)),
        st.tuples(st.just("credit"), st.integers(0, len(CHANNELS) - 1), st.integers(1, 8)),
        st.tuples(st.just("close"), st.integers(0, len(CHANNELS) - 2), st.just(0)),
    ),
    max_size=50,
)
"""Steps: ``send`` k frames on channel i; the receiver's socket ``read``s k messages; its
application takes frames of channel i and gives ``credit`` for up to k; the sender
``close``s stream channel i."""


@settings(max_examples=150, deadline=None)
@given(window=st.integers(1, 5), buffer=st.integers(1, 6), plan=plans)
async def test_no_channel_goes_past_its_window_and_nothing_acknowledged_is_lost(
    window: int, buffer: int, plan: list[tuple[str, int, int]]
) -> None:
    async with mux.open_mux(agent="node", channel_buffer_frames=buffer) as node, trio.open_nursery() as nursery:
        (sender,) = started_sessions(node, nursery, "alice")
        (receiver,) = started_sessions(node, nursery, "bob", window=window)
        assert orjson.loads(receiver.hello())["window"] == window
        channels = []
        for intent in CHANNELS:
            opening = {"action": "open", "target": "bob", "intent": intent}
            (opened,) = outbox_events(sender.handle(orjson.dumps(opening).decode()))
            channels.append(opened["channel_id"])

        acked: dict[str, list[int]] = collections.defaultdict(list)
        arrived: dict[str, list[int]] = collections.defaultdict(list)
        taken: dict[str, int] = collections.Counter()  # frames the application took
        credited: dict[str, int] = collections.Counter()
        closed_at: dict[str, int] = {}  # channel -> frames that had arrived at its channel_closed
        closed: set[int] = set()
        n = 0

        def read(limit: int | None = None) -> None:
            count = 0
            while (limit is None or count < limit) and (m := receiver.outbox.get_nowait()) is not None:
                count += 1
                for e in outbox_events([m]):
                    cid = e.get("channel_id")
                    if e.get("event") == "frame":
                        assert cid not in closed_at, "no frame after the channel_closed"
                        arrived[cid].append(e["payload"]["n"])
                        assert len(arrived[cid]) - credited[cid] <= window, "never past the window"
                    elif e.get("event") == "channel_closed":
                        closed_at[cid] = len(arrived[cid])

        def credit(cid: str, most: int) -> None:
            k = min(most, len(arrived[cid]) - taken[cid])
            if k > 0:
                taken[cid] += k
                credited[cid] += k
                message = {"action": "credit", "channel_id": cid, "frames": k}
                assert receiver.handle(orjson.dumps(message).decode()) == []  # no answer

        for step, i, k in plan:
            cid = channels[i]
            if step == "read":
                read(k)
            elif step == "credit":
                credit(cid, k)
            elif step == "close":
                if i not in closed:
                    closed.add(i)
                    close = {"action": "close", "channel_id": cid}
                    assert outbox_events(sender.handle(orjson.dumps(close).decode()))[0]["event"] == "channel_closed"
            else:
                for _ in range(k):
                    if i in closed:
                        break
                    n += 1
                    room = receiver._sinks[cid].has_room()
                    reply = send_numbered(sender, cid, n, binary=i == CALL)  # a call's media is binary
                    if room:
                        assert reply.get("event") == "frame_ack" and reply["disposition"] == "delivered", reply
                        acked[cid].append(n)
                    elif i == CALL:  # dropped late, never refused
                        assert reply.get("event") == "frame_ack" and reply["disposition"] == "dropped", reply
                    else:
                        assert reply.get("error") == "receiver_full" and reply.get("channel_id") == cid, reply
            waiting = sum(len(s.pending or ()) for s in receiver._sinks.values())
            assert receiver.outbox.queued + waiting <= len(CHANNELS) * 2 * (buffer + 1), "bounded"
        for _ in range(len(acked) + sum(len(a) for a in acked.values()) + 2):  # the application catches up
            read()
            for cid in channels:
                credit(cid, window)
        read()
        for i, cid in enumerate(channels):
            assert arrived[cid] == acked[cid], "every acknowledged frame arrived, in order, once"
            if i in closed:
                assert closed_at.get(cid) == len(acked[cid]), "channel_closed follows the last frame"
        nursery.cancel_scope.cancel()
