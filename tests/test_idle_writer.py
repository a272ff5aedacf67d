"""An idle connection keeps no writer task: it ends, and the next message starts it again."""

from __future__ import annotations

import os

import trio

from mux.client import connect
from mux.outbox import CONTROL, Outbox, Outgoing
from mux.server import ServeInfo

from .nodes import running_tasks, serve_node


def _writer_tasks() -> int:
    """The ``Writer.run`` tasks running in this trio run (the node is in-process)."""
    return running_tasks(lambda name: name.endswith(".Writer.run"))


async def _all_retired(info: ServeInfo, connections: int) -> None:
    def retired() -> bool:
        writers = list(info.node.sessions.values())
        return len(writers) == connections and all(w is not None and w.outbox.retired for w in writers)

    with trio.fail_after(5):
        while not retired():  # noqa: ASYNC110  (the watchdog's pass, polled; bounded)
            await trio.sleep(0.02)
    assert _writer_tasks() == 0


async def test_idle_writers_end_and_come_back_for_every_kind_of_write(nursery: trio.Nursery) -> None:
    info = await serve_node(nursery, writer_idle_s=0.1)
    async with connect(info.url, "alice") as alice, connect(info.url, "bob") as bob:
        await _all_retired(info, 2)
        ch = await alice.open("bob", "stream")  # the reply and bob's channel_opened: written directly
        theirs = await bob.accept()
        assert (await ch.send({"n": 1}))["event"] == "frame_ack"
        assert (await theirs.receive())["payload"] == {"n": 1}
        await _all_retired(info, 2)
        blob = os.urandom(700_000)  # many frame_parts: more than one write can take
        await ch.send(blob)
        with trio.fail_after(10):
            got = await theirs.receive()
        assert got["payload"] == blob and bob.verify(got).seq == 2
        await _all_retired(info, 2)
        with trio.fail_after(5):
            assert (await theirs.send({"back": True}))["event"] == "frame_ack"
            assert (await ch.receive())["payload"] == {"back": True}


async def test_a_node_shutting_down_reaches_connections_whose_writers_ended(nursery: trio.Nursery) -> None:
    info = await serve_node(nursery, writer_idle_s=0.1)
    async with connect(info.url, "alice") as alice, connect(info.url, "bob") as bob:
        ch = await alice.open("bob", "stream")
        theirs = await bob.accept()
        await _all_retired(info, 2)
        with trio.fail_after(10):
            await info.node.shutdown()
            for held in (ch, theirs):
                async for _ in held:
                    pass
                assert held.closed_reason == "node_shutdown"
        assert info.node.sessions == {}  # each socket was closed (1001) by its restarted writer


async def test_writers_never_end_with_writer_idle_s_zero(nursery: trio.Nursery) -> None:
    info = await serve_node(nursery, writer_idle_s=0)
    async with connect(info.url, "alice"), connect(info.url, "bob"):
        await trio.sleep(0.3)
        assert not any(w is not None and w.outbox.retired for w in info.node.sessions.values())
        assert _writer_tasks() == 2


async def test_outbox_retire_ends_a_waiting_writer_and_the_next_message_starts_it() -> None:
    box = Outbox()
    started: list[int] = []
    assert not box.retire()  # nobody can start a writer again: it is not asked to leave
    box.start_writer = lambda: started.append(1)
    assert not box.retire()  # no writer waits
    got: list[Outgoing | None] = []
    async with trio.open_nursery() as nursery:

        async def writer() -> None:
            while (message := await box.get()) is not None:
                got.append(message)
            got.append(None)

        nursery.start_soon(writer)
        await trio.sleep(0.01)
        box.put_nowait("k", 1, "a")
        await trio.sleep(0.01)
        assert box.retire()
        box.put_nowait("k", 1, "b")  # before the writer runs: it takes this and stays
        await trio.sleep(0.01)
        assert got == ["a", "b"] and not box.retired and started == []
        assert box.retire()
        await trio.sleep(0.01)
    assert got == ["a", "b", None] and box.retired
    assert not box.retire()
    box.put_nowait("k", 1, "c", "d")
    assert started == [1] and not box.retired  # started once, for both
    box.put_nowait("k", 1, "e")
    assert started == [1]
    box.put_nowait(CONTROL, 0, "x")
    assert box.get_nowait() == "x"  # a restarted writer takes what came, in order
    assert [box.get_nowait() for _ in range(3)] == ["c", "d", "e"]


async def test_a_new_connection_keeps_its_writer_for_writer_idle_s(nursery: trio.Nursery) -> None:
    info = await serve_node(nursery, writer_idle_s=0.6)
    async with connect(info.url, "alice"):
        await trio.sleep(0.3)  # connected, nothing written by its writer yet: not idle for long
        assert _writer_tasks() == 1
        await _all_retired(info, 1)  # once it has been
