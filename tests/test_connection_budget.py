"""A connection's byte budget (``MuxConfig.connection_buffer_bytes``): however many channels a
slow or stuck receiver holds, the node holds at most that much for its connection.

Each channel's own queue is bounded (``channel_buffer_frames`` messages), but a receiver may
hold many channels (each opener may open ``max_channels_per_agent``), so without a budget the
node would hold their sum. These tests drive sessions by hand (no socket): the receiver's
outbox is read only when the test says so.
"""

from __future__ import annotations

import collections

import orjson
import trio
import trio.lowlevel

import mux
from mux.outbox import SharedBudget
from mux.wire import pack_binary, unpack_binary

from .nodes import outbox_events, started_sessions

BUDGET = 256 << 10
FRAME = 16_000
CHANNELS = 8


def _frames(messages: list[str | bytes]) -> dict[str, list[int]]:
    got: dict[str, list[int]] = collections.defaultdict(list)
    for m in messages:
        if isinstance(m, bytes):
            header, payload = unpack_binary(m)
            if header.get("event") == "frame":
                got[header["channel_id"]].append(int.from_bytes(payload[:4], "big"))
    return got


async def test_a_stuck_receiver_with_many_channels_is_held_to_the_budget() -> None:
    async with (
        mux.open_mux(agent="node", channel_buffer_frames=64, connection_buffer_bytes=BUDGET) as node,
        trio.open_nursery() as nursery,
    ):
        sender, receiver = started_sessions(node, nursery, "alice", "bob")
        channels = []
        for intent in ["stream"] * CHANNELS + ["call:voice"]:
            opening = {"action": "open", "target": "bob", "intent": intent}
            (opened,) = outbox_events(sender.handle(orjson.dumps(opening).decode()))
            channels.append(opened["channel_id"])
        *streams, call = channels
        acked: dict[str, list[int]] = collections.defaultdict(list)
        refused = set()
        n = 0
        while len(refused) < CHANNELS:  # round robin until every stream is refused (bounded)
            assert n < 10_000
            for cid in streams:
                n += 1
                header = {"action": "send", "channel_id": cid, "ref": n}
                (reply,) = outbox_events(sender.handle(pack_binary(header, n.to_bytes(4, "big") + bytes(FRAME - 4))))
                if reply.get("event") == "frame_ack":
                    acked[cid].append(n)
                else:
                    assert reply["error"] == "receiver_full" and reply["channel_id"] == cid, reply
                    refused.add(cid)
        held = receiver.outbox.bytes
        assert BUDGET <= held < BUDGET + FRAME + 1024  # the budget, and the frame that reached it
        assert all(len(acked[cid]) < 64 for cid in streams)  # no channel's own queue was full
        # a call's frame beside a full budget is dropped late, never refused
        (reply,) = outbox_events(sender.handle(pack_binary({"action": "send", "channel_id": call}, b"v" * 200)))
        assert reply["event"] == "frame_ack" and reply["disposition"] == "dropped"
        # the receiver reads: every acknowledged frame arrives, once, in order; room comes back
        got = _frames(list(iter(receiver.outbox.get_nowait, None)))
        assert got == acked and receiver.outbox.bytes == 0
        header = {"action": "send", "channel_id": streams[0], "ref": "again"}
        (reply,) = outbox_events(sender.handle(pack_binary(header, bytes(FRAME))))
        assert reply["disposition"] == "delivered"


async def test_senders_waiting_for_the_budget_all_go_on_once_it_has_room() -> None:
    """Library senders that wait for room (as a tunnel's backend does) on several channels are
    all woken when the connection's budget has room again, also those whose own queue held
    nothing (they wait on the budget, not on their queue)."""
    async with (
        mux.open_mux(agent="node", channel_buffer_frames=64, connection_buffer_bytes=BUDGET) as node,
        trio.open_nursery() as nursery,
        node.attach("alice") as alice,
    ):
        (receiver,) = started_sessions(node, nursery, "bob")
        channels = [await alice.open("bob", "stream") for _ in range(CHANNELS)]
        per_channel = 6  # 8 x 6 x 16 KB: about twice the budget
        done: list[str] = []

        async def send_all(ch: mux.Channel) -> None:
            for i in range(per_channel):
                await ch.send(i.to_bytes(4, "big") + bytes(FRAME - 4))  # waits while there is no room
            done.append(ch.id)

        taken: list[str | bytes] = []
        with trio.fail_after(10):
            async with trio.open_nursery() as senders:
                for ch in channels:
                    senders.start_soon(send_all, ch)
                await trio.sleep(0.05)
                assert len(done) < CHANNELS and receiver.outbox.bytes < BUDGET + FRAME + 1024
                while len(done) < CHANNELS:  # the receiver reads a message at a time
                    message = receiver.outbox.get_nowait()
                    if message is not None:
                        taken.append(message)
                    await trio.lowlevel.checkpoint()
        taken += list(iter(receiver.outbox.get_nowait, None))
        got = _frames(taken)
        assert all(got[ch.id] == list(range(per_channel)) for ch in channels)


async def test_frames_waiting_for_credit_count_and_closing_their_channel_gives_room() -> None:
    """On a windowed connection frames waiting for credit count against the budget; when the
    client closes their channel they are dropped, and a sender waiting on the budget for
    another channel goes on (no message leaves the outbox to tell it)."""
    async with (
        mux.open_mux(agent="node", channel_buffer_frames=64, connection_buffer_bytes=BUDGET) as node,
        trio.open_nursery() as nursery,
        node.attach("alice") as alice,
    ):
        (receiver,) = started_sessions(node, nursery, "bob", window=1)
        hoarded, other = [await alice.open("bob", "stream") for _ in range(2)]
        list(iter(receiver.outbox.get_nowait, None))  # the announcements
        sent = 0
        with trio.move_on_after(0.2):  # bob gives no credit: past the first, frames wait for it
            while True:
                await hoarded.send(bytes(FRAME))
                sent += 1
        # the budget is full, nearly all of it frames waiting for credit, no channel's queue full
        assert receiver.outbox.bytes + receiver.outbox.held >= BUDGET and sent < 64
        assert receiver.outbox.bytes < 2 * FRAME
        got_through = trio.Event()

        async def send_other() -> None:
            await other.send(b"after")  # waits: the budget is full of hoarded frames
            got_through.set()

        nursery.start_soon(send_other)
        await trio.sleep(0.05)
        assert not got_through.is_set()
        close = {"action": "close", "channel_id": hoarded.id}
        receiver.handle(orjson.dumps(close).decode())  # bob closes it: what waited is dropped
        with trio.fail_after(5):
            await got_through.wait()
        assert receiver.outbox.held == 0


def test_connections_share_the_readers_budget_once_there_are_many() -> None:
    budget = SharedBudget(16 << 20, 1 << 30)
    assert budget.limit == 16 << 20
    for _ in range(64):
        budget.join()
    assert budget.limit == 16 << 20  # 64 x 16 MiB fit the total
    budget.join()
    assert budget.limit == (1 << 30) // 65
    for _ in range(10_000 - 65):
        budget.join()
    assert budget.limit == (1 << 30) // 10_000 and budget.limit * budget.connections <= 1 << 30
    for _ in range(10_001):  # one more leave than joins: never below none
        budget.leave()
    assert (budget.connections, budget.limit) == (0, 16 << 20)
    unbounded = SharedBudget(4096, 0)
    for _ in range(1000):
        unbounded.join()
    assert unbounded.limit == 4096


async def test_many_connections_share_the_readers_budget() -> None:
    """``readers_buffer_bytes`` bounds what all connections hold together: with four
    connections on a node whose readers may hold 4 x 64 KiB, a stuck receiver is held to
    64 KiB though its own budget is 256 KiB; when two connections leave, the share grows
    and it takes more; ``/status`` says what each connection gets."""
    async with (
        mux.open_mux(
            agent="node", channel_buffer_frames=64, connection_buffer_bytes=BUDGET, readers_buffer_bytes=4 * (64 << 10)
        ) as node,
        trio.open_nursery() as nursery,
    ):
        sender, receiver, carol, dave = started_sessions(node, nursery, "alice", "bob", "carol", "dave")
        assert node.status()["readers"] == {"connections": 4, "budget_per_connection": 64 << 10, "max_bytes": 4 << 16}
        opened = {"action": "open", "target": "bob", "intent": "stream"}
        cids = [outbox_events(sender.handle(orjson.dumps(opened).decode()))[0]["channel_id"] for _ in range(4)]
        n = 0

        def flood() -> None:
            nonlocal n
            while True:
                n += 1
                assert n < 10_000
                header = {"action": "send", "channel_id": cids[n % len(cids)], "ref": n}
                (reply,) = outbox_events(sender.handle(pack_binary(header, bytes(FRAME))))
                if reply.get("error") == "receiver_full":
                    return
                assert reply["event"] == "frame_ack", reply

        flood()
        assert 64 << 10 <= receiver.outbox.bytes < (64 << 10) + FRAME + 1024  # its share, not BUDGET
        carol.close()
        dave.close()
        assert node.readers.limit == 128 << 10  # two connections left: a bigger share
        flood()
        assert 128 << 10 <= receiver.outbox.bytes < (128 << 10) + FRAME + 1024


async def test_senders_waiting_on_a_full_share_go_on_when_the_share_grows() -> None:
    """A library sender waiting for room on a stuck receiver whose share of the readers'
    budget is full goes on as soon as another connection leaves and the share grows, though
    the receiver takes nothing (it waited for the receiver's next drained message before)."""
    async with (
        mux.open_mux(
            agent="node", channel_buffer_frames=64, connection_buffer_bytes=BUDGET, readers_buffer_bytes=3 * (64 << 10)
        ) as node,
        trio.open_nursery() as nursery,
        node.attach("alice") as alice,
    ):
        receiver, carol, _dave = started_sessions(node, nursery, "bob", "carol", "dave")
        ch = await alice.open("bob", "stream")
        sent = 0

        async def send_all() -> None:
            nonlocal sent
            while True:
                await ch.send(bytes(FRAME))  # waits while there is no room
                sent += 1

        nursery.start_soon(send_all)
        await trio.sleep(0.05)
        stuck_at = sent
        assert 64 << 10 <= receiver.outbox.bytes < (64 << 10) + FRAME + 1024
        carol.close()  # the share grows from 64 to 96 KiB
        with trio.fail_after(5):
            while receiver.outbox.bytes < 96 << 10:  # noqa: ASYNC110  (the sender runs meanwhile)
                await trio.sleep(0.005)
        assert sent > stuck_at and node.readers.full == {receiver: receiver.budget_room}
        nursery.cancel_scope.cancel()
