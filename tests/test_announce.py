"""Channels opened to an agent: queued for ``accept`` or taken as they come by its connection."""

from __future__ import annotations

import orjson
import pytest
import trio

import mux
from mux.outbox import CONTROL
from mux.session import WireSession

from .nodes import started_sessions


def _events(session: WireSession) -> list[dict[str, object]]:
    """Everything queued on ``session``'s outbox, taken off it in order."""
    out = []
    while (message := session.outbox.get_nowait()) is not None:
        out.append(orjson.loads(message))
    return out


async def test_accept_takes_queued_channels_in_order_then_waits_then_ends() -> None:
    async with mux.open_mux(agent="n") as m:
        ep = m.attach("bob")
        first, second = [await m.open("bob", "stream", agent=f"a{i}") for i in range(2)]
        assert [(await ep.accept()).id for _ in range(2)] == [first.id, second.id]
        assert ep.accept_nowait() is None
        got: list[str] = []
        async with trio.open_nursery() as nursery:

            async def accept() -> None:
                got.append((await ep.accept()).id)

            nursery.start_soon(accept)
            await trio.sleep(0.01)
            assert got == []  # parked until a channel comes
            third = await m.open("bob", "stream", agent="a2")
        assert got == [third.id]
        with trio.move_on_after(0.01) as waited:
            await ep.accept()
        assert waited.cancelled_caught  # a cancelled accept takes nothing
        fourth = await m.open("bob", "stream", agent="a3")
        ep._detach()
        assert (await ep.accept()).id == fourth.id  # what was announced before still comes out
        with pytest.raises(mux.ChannelClosed):
            await ep.accept()
        with pytest.raises(mux.ChannelClosed):
            ep.accept_nowait()


async def test_a_parked_accept_ends_when_the_endpoint_detaches() -> None:
    async with mux.open_mux(agent="n") as m:
        ep = m.attach("bob")
        with trio.fail_after(2):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.lowlevel.checkpoint)

                async def detach_soon() -> None:
                    await trio.sleep(0.01)
                    ep._detach()

                nursery.start_soon(detach_soon)
                with pytest.raises(mux.ChannelClosed):
                    await ep.accept()


async def test_take_channels_gets_the_waiting_ones_then_each_as_it_is_opened() -> None:
    async with mux.open_mux(agent="n", incoming_buffer_channels=2) as m:
        ep = m.attach("bob")
        waiting = [await m.open("bob", "stream", agent=f"a{i}") for i in range(2)]
        with pytest.raises(mux.ChannelFull):  # two wait to be accepted: the limit
            await m.open("bob", "stream", agent="a9")
        taken: list[str] = []
        room = True

        def take(ch: mux.Channel) -> bool:
            if room:
                taken.append(ch.id)
            return room

        ep.take_channels(take)
        assert taken == [c.id for c in waiting]
        live = await m.open("bob", "stream", agent="a2")
        assert taken[-1] == live.id  # handed over at once: nothing waits in accept()
        room = False  # the taker is full: this one queues
        left = await m.open("bob", "stream", agent="a3")
        room = True
        later = await m.open("bob", "stream", agent="a4")  # queues behind it: no overtaking
        assert later.id not in taken
        with pytest.raises(mux.ChannelFull):  # queued ones count against the limit
            await m.open("bob", "stream", agent="a5")
        assert [ep.accept_nowait().id for _ in range(2)] == [left.id, later.id]  # type: ignore[union-attr]


async def test_a_connection_announces_a_channel_the_moment_it_opens_with_no_task(node: mux.Mux) -> None:
    async with trio.open_nursery() as connection:
        (bob,) = started_sessions(node, connection, "bob")
        ch = await node.open("bob", "stream", agent="alice")
        (opened,) = _events(bob)  # queued by the open itself, before any scheduling turn
        assert opened["event"] == "channel_opened" and opened["channel_id"] == ch.id and opened["role"] == "target"
        assert not connection.child_tasks  # an idle connection runs no task of its own for this
        await ch.send({"n": 1})
        (frame,) = _events(bob)
        assert frame["channel_id"] == ch.id and frame["payload"] == {"n": 1}
        connection.cancel_scope.cancel()


async def test_announcements_wait_for_room_in_a_full_control_queue_in_order() -> None:
    async with mux.open_mux(agent="n", incoming_buffer_channels=3) as m, trio.open_nursery() as connection:
        bob = WireSession(m, m.attach("bob"), max_message_bytes=1 << 20)
        bob.outbox.control_limit = 2
        bob.start(connection)
        bob.outbox.put_nowait(CONTROL, 0, '{"event":"pong"}', '{"event":"pong"}')  # a peer not reading
        opened = [await m.open("bob", "stream", agent="a0")]
        await trio.sleep(0.01)
        assert len(connection.child_tasks) == 1  # one task announces them as room comes: it holds a0
        opened += [await m.open("bob", "stream", agent=f"a{i}") for i in range(1, 4)]
        with pytest.raises(mux.ChannelFull):  # three more wait for the control queue: the limit
            await m.open("bob", "stream", agent="a4")
        events = []
        with trio.fail_after(2):
            while len(events) < 6:
                message = bob.outbox.get_nowait()
                if message is None:
                    await trio.sleep(0.001)
                else:
                    events.append(orjson.loads(message))
        assert [e["event"] for e in events] == ["pong", "pong", *["channel_opened"] * 4]
        assert [e["channel_id"] for e in events[2:]] == [c.id for c in opened]
        await trio.sleep(0.01)
        assert not connection.child_tasks  # and ends once none is left
        late = await m.open("bob", "stream", agent="a5")
        (event,) = _events(bob)
        assert event["channel_id"] == late.id
        connection.cancel_scope.cancel()


async def test_a_channel_opened_as_room_comes_does_not_overtake_one_waiting_for_it() -> None:
    async with mux.open_mux(agent="n") as m, trio.open_nursery() as connection:
        bob = WireSession(m, m.attach("bob"), max_message_bytes=1 << 20)
        bob.outbox.control_limit = 1
        bob.start(connection)
        bob.outbox.put_nowait(CONTROL, 0, '{"event":"pong"}')
        first = await m.open("bob", "stream", agent="a0")
        await trio.sleep(0.01)  # the announcing task holds it, waiting for room
        assert orjson.loads(bob.outbox.get_nowait() or "")["event"] == "pong"  # room, before that task runs
        second = m.open_nowait("bob", "stream", None, "a1")
        got: list[dict[str, object]] = []
        with trio.fail_after(2):
            while len(got) < 2:
                await trio.sleep(0.001)
                got += _events(bob)
        assert [e["channel_id"] for e in got] == [first.id, second.id]
        connection.cancel_scope.cancel()
