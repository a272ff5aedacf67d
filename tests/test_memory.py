"""Memory goes back: closed channels keep no connection alive; the trimmer runs after bursts."""

from __future__ import annotations

import collections
import contextlib
import ctypes.util
import gc
import inspect
import logging
import os
import re
import sys
import tracemalloc
import weakref
from pathlib import Path

import httpx
import orjson
import pytest
import trio
import trio.testing

import mux
from mux import heap
from mux.client import open_ws, ws_url
from mux.errors import BadSetting
from mux.server import ServeInfo

from .nodes import running_tasks, serve_node, started_sessions
from .procs import node_process


async def test_closed_channels_keep_no_connection(node: mux.Mux) -> None:
    """After both connections leave, nothing (the closed-channel lookup included) holds them."""
    async with trio.open_nursery() as connections:  # as the socket handler runs them
        sessions = started_sessions(node, connections, "alice", "bob")
        alice, bob = sessions
        for _ in range(3):
            alice.handle('{"action":"open","target":"bob"}')
        await trio.sleep(0.05)
        assert len(node.channels(agent="bob")) == 3
        refs = [weakref.ref(s) for s in sessions]
        alice.close("ws_disconnect")  # closes the channels; bob's ends are shut, not detached
        bob.close("ws_disconnect")
        del sessions, alice, bob
        await trio.sleep(0.05)
        connections.cancel_scope.cancel()
    gc.collect()
    assert [r() for r in refs] == [None, None]
    assert len(node.channels(agent="bob", include_closed=True)) == 3  # still found as closed


async def test_a_closed_channel_is_freed_while_its_connections_stay(node: mux.Mux) -> None:
    """Nothing of a connection's last channel stays alive once it is closed and forgotten:
    announcing the channels opened to a connection holds on to none of them. It is freed as
    soon as it is forgotten, by reference counting alone: it leaves no cycle for a later
    garbage collection (its context's link back to it was one: freed only by a collection,
    10,000 closed channels' states, contexts, ends and chain heads waited for one)."""
    node.config.closed_retention = 0
    async with trio.open_nursery() as connections:
        alice, _bob = started_sessions(node, connections, "alice", "bob")
        alice.handle('{"action":"open","target":"bob"}')
        await trio.sleep(0.05)
        (info,) = node.channels(agent="bob")
        ref = weakref.ref(node._channels[info["channel_id"]])
        gc.collect()
        gc.disable()
        try:
            alice.handle(orjson.dumps({"action": "close", "channel_id": info["channel_id"]}).decode())
            await trio.sleep(0.05)
            assert node.channels(agent="bob", include_closed=True) == []
            assert ref() is None  # both sessions are still open; no collection ran
        finally:
            gc.enable()
        connections.cancel_scope.cancel()


async def test_a_connection_that_held_many_channels_shrinks_back(node: mux.Mux) -> None:
    """Once a connection's 25 channels have closed, its session's and both endpoints' maps
    of held channels are as small as an empty dict again (a dict otherwise keeps the table
    it grew to: about 1 KiB per connection and agent that once held many channels). They are
    the same dicts, emptied in place: a new dict made as a burst of closes goes on would
    outlive the burst among its memory and pin those pages (docs/performance.md)."""
    async with trio.open_nursery() as connections:
        alice, bob = started_sessions(node, connections, "alice", "bob")
        for _ in range(25):
            alice.handle('{"action":"open","target":"bob"}')
        await trio.sleep(0.1)
        held = node.channels(agent="bob")
        assert len(held) == 25
        maps = (alice._sinks, bob._sinks, alice.endpoint._held, bob.endpoint._held)
        assert min(sys.getsizeof(d) for d in maps) > sys.getsizeof({})
        for info in held:
            alice.handle(orjson.dumps({"action": "close", "channel_id": info["channel_id"]}).decode())
        await trio.sleep(0.1)
        assert node.channels(agent="bob") == []
        assert all(
            now is then
            for now, then in zip(
                (alice._sinks, bob._sinks, alice.endpoint._held, bob.endpoint._held), maps, strict=True
            )
        )
        for d in maps:
            assert (len(d), sys.getsizeof(d)) == (0, sys.getsizeof({}))
        alice.handle('{"action":"open","target":"bob"}')  # and they work as before
        await trio.sleep(0.05)
        assert len(node.channels(agent="bob")) == 1 == len(alice._sinks) == len(bob.endpoint._held)
        connections.cancel_scope.cancel()


async def test_trimmer_runs_once_per_burst_of_closes(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    calls: list[int] = []
    closed = 0
    monkeypatch.setattr(heap, "release_memory", lambda **_: calls.append(closed) or True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: heap.trimmer(lambda: closed, threshold=100, interval_s=1.0))
        await trio.sleep(2.5)
        closed = 99
        await trio.sleep(2)
        assert calls == []  # under the threshold
        closed = 250
        await trio.sleep(2)
        assert calls == [250]  # no trim for min_gap_s yet: at once
        await trio.sleep(5)
        assert calls == [250]  # nothing new closed: no more trims
        for _ in range(20):  # steady churn: closes every second, never settled
            closed += 200
            await trio.sleep(1)
        assert len(calls) == 1  # within min_gap_s of the first trim: no pause
        for _ in range(15):
            closed += 200
            await trio.sleep(1)
        assert len(calls) == 2  # once min_gap_s passed
        nursery.cancel_scope.cancel()


async def test_the_trimmer_shrinks_the_nodes_tables_before_it_hands_pages_back(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    order: list[str] = []
    closed = 0
    monkeypatch.setattr(heap, "release_memory", lambda **_: order.append("release") or True)
    monkeypatch.setattr(heap, "settle", lambda: order.append("settle"))
    caplog.set_level(logging.INFO, logger="mux.heap")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: heap.trimmer(lambda: closed, threshold=10, compact=lambda: order.append("compact") or 40960)
        )
        await trio.sleep(1.5)
        closed = 10
        await trio.sleep(3)
        nursery.cancel_scope.cancel()
    assert order == ["settle", "compact", "release"]
    assert "pages handed back: True; tables shrunk by 40 KiB)" in caplog.text


def test_shrink_rebuilds_a_grown_table_in_place() -> None:
    """A dict that grew to 20,000 entries and kept 10 is rebuilt as the same object with the
    same entries in the same order; an OrderedDict keeps its order, a Counter its counts; a
    table near its contents' size, or small, is left alone."""
    plain: dict[str, int] = {f"k{i}": i for i in range(20_000)}
    ordered = collections.OrderedDict(plain)
    counts = collections.Counter(plain)
    for table in (plain, ordered, counts):
        for i in range(20_000):
            if i % 2000:
                del table[f"k{i}"]
        if isinstance(table, collections.OrderedDict):
            table.move_to_end("k0")
        before, items, grown = table, list(table.items()), sys.getsizeof(table)
        freed = heap.shrink(table)
        assert table is before and list(table.items()) == items and len(items) == 10
        assert freed > 100_000 and sys.getsizeof(table) < grown / 10
        assert heap.shrink(table) == 0  # nothing more to give back
    small = {i: i for i in range(100)}
    for i in range(95):
        del small[i]
    assert heap.shrink(small) == 0 and len(small) == 5  # under SHRINK_MIN_BYTES: not worth a rebuild
    full = {i: i for i in range(20_000)}
    assert heap.shrink(full) == 0 and len(full) == 20_000


async def test_the_node_gives_back_the_table_a_burst_of_channels_grew(node: mux.Mux) -> None:
    """2,000 channels opened and closed leave the node's table of channels as small as an
    empty dict once compacted (512 KiB stayed after 10,000 in the bench), and the node works
    on with it."""
    node.config.max_channels_per_agent = node.config.incoming_buffer_channels = 10_000
    alice, _bob = node.attach("alice"), node.attach("bob")
    handles = [alice.open_nowait("bob") for _ in range(2000)]
    grown = sys.getsizeof(node._channels)
    for handle in handles:
        await handle.close()
    assert node._channels == {} and sys.getsizeof(node._channels) == grown
    assert node.compact() > 50_000
    assert sys.getsizeof(node._channels) == sys.getsizeof({}) and len(node._closed) == node.config.closed_retention
    again = alice.open_nowait("bob")
    assert node.channel_state(again.id).is_open and len(node._channels) == 1


async def test_a_running_node_shrinks_its_tables_after_a_burst_of_closes(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """The node's trimmer is given the node's compact: after 1,500 channels close, its log
    line says the tables gave memory back, and the node's table of channels is small again."""
    caplog.set_level(logging.INFO, logger="mux.heap")
    info = await serve_node(nursery, trim_after_closes=1000)
    node = info.node.mux
    node.config.max_channels_per_agent = node.config.incoming_buffer_channels = 10_000
    alice, _bob = node.attach("alice"), node.attach("bob")
    handles = [alice.open_nowait("bob") for _ in range(1500)]
    for handle in handles:
        await handle.close()
    for _ in range(100):  # the trimmer checks every second, once the closes settle
        if "released memory after" in caplog.text:
            break
        await trio.sleep(0.1)
    shrunk = re.search(r"tables shrunk by (\d+) KiB", caplog.text)
    assert shrunk is not None and int(shrunk[1]) > 16, caplog.text
    assert sys.getsizeof(node._channels) == sys.getsizeof({})


async def test_the_node_gives_back_the_table_a_burst_of_connections_grew(nursery: trio.Nursery) -> None:
    """The node's compact (the trimmer's) also rebuilds its table of live connections, which
    2,000 connections grew to 72 KiB in the bench and which stays so once they are gone."""
    info = await serve_node(nursery)
    node = info.node
    node.sessions.update((object(), None) for _ in range(3000))  # as many connections came ...
    grown = sys.getsizeof(node.sessions)
    for gone in list(node.sessions):  # ... and went, one by one
        del node.sessions[gone]
    node.sessions[live := object()] = None  # one still connected
    assert sys.getsizeof(node.sessions) == grown
    assert node.compact() >= grown - 1024
    assert list(node.sessions) == [live] and sys.getsizeof(node.sessions) < 1024


def test_release_memory_collects_and_trims() -> None:
    class Cycle:
        def __init__(self) -> None:
            self.me = self

    ref = weakref.ref(Cycle())
    assert isinstance(heap.release_memory(), bool)
    assert ref() is None


def _channel_tasks() -> int:
    return running_tasks(lambda name: name.startswith("mux-channel-"))


async def test_only_backends_with_background_work_get_a_task(node: mux.Mux) -> None:
    """Stream channels run no task; a call (its backend has background work) runs one."""
    async with node.attach("alice") as alice, node.attach("bob"):
        before = _channel_tasks()
        for _ in range(5):
            await alice.open("bob", "stream")
        await trio.sleep(0.01)
        assert _channel_tasks() == before
        await alice.open("bob", "call:voice")
        await trio.sleep(0.01)
        assert _channel_tasks() == before + 1


def test_freeze_startup_takes_live_objects_out_of_collections() -> None:
    """What is alive at start-up goes into the permanent generation (a full collection
    skips it); garbage is collected first, not frozen."""
    garbage: list[object] = []
    garbage.append(garbage)  # a cycle only the collector frees
    ref = weakref.ref(cycle_holder := _Holder(garbage))
    del garbage, cycle_holder
    try:
        frozen = heap.freeze_startup()
        assert frozen == gc.get_freeze_count() > 10_000
        assert ref() is None  # collected before the freeze, not kept forever
        gc.collect()
        assert gc.get_freeze_count() == frozen  # a collection leaves the frozen objects frozen
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0


class _Holder:
    def __init__(self, inner: list[object]) -> None:
        self.inner = inner
        inner.append(self)


async def test_a_connections_protocol_state_stays_small(node: mux.Mux, nursery: trio.Nursery) -> None:
    """An idle connection's session and endpoint take under 2.5 KiB (measured: 1.9). Guards
    the instance dicts' layout too: CPython shares an instance dict's keys with its class
    only up to 30 attributes, and one more made every session 1.3 KiB larger (3.2 KiB)."""
    import tracemalloc

    from mux.session import WireSession

    sessions = []
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(200):
            session = WireSession(node, node.attach(f"idle-{i}"), max_message_bytes=1 << 20)
            session.start(nursery)
            sessions.append(session)
        gc.collect()
        per_session = (tracemalloc.get_traced_memory()[0] - before) / len(sessions)
    finally:
        tracemalloc.stop()
    assert per_session < 2560, f"{per_session:.0f} bytes per idle connection's session and endpoint"


async def test_channels_leave_no_garbage_cycles(node: mux.Mux) -> None:
    """Channels of several backends, opened, used and closed, and an open the backend
    refuses, are freed by reference counting alone once forgotten: with the garbage
    collector off, a collection afterwards finds nothing of mux's in cycles."""
    node.config.closed_retention = 0
    async with node.attach("a") as a, node.attach("b") as b:

        async def lifecycle(intent: str) -> None:
            ch = await a.open("b", intent)
            theirs = await b.accept()
            await ch.send({"n": 1})
            await theirs.receive()
            await ch.close()

        await lifecycle("stream")  # the first of each kind warms caches up
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for intent in ("stream", "chat", "session", "call:voice"):
                await lifecycle(intent)
            with pytest.raises(mux.MuxError):
                await a.open("b", "file:sync", {"name": "f.bin", "size": 1})  # no sha256: refused
            await trio.sleep(0.05)
            gc.collect()
            ours = sorted(
                {type(o).__qualname__ for o in gc.garbage if type(o).__module__.startswith(("mux", "backends"))}
            )
        finally:
            gc.garbage.clear()
            gc.set_debug(0)
            gc.enable()
        assert ours == []


async def test_channels_to_a_connected_agent_share_its_name(node: mux.Mux) -> None:
    """Every channel opened to a connected agent keeps that agent's one name string, not a
    copy made from each open's ``target`` (about 57 bytes per channel, and pieces of memory
    that a burst's survivors pin); a stream channel has no dict of backend notes."""
    async with trio.open_nursery() as connections:
        alice, bob = started_sessions(node, connections, "alice", "bob")
        for target in ("bob", "Bob", " BOB.aint"):
            alice.handle(orjson.dumps({"action": "open", "target": target}).decode())
        await trio.sleep(0.05)
        states = [node._channels[info["channel_id"]] for info in node.channels(agent="bob")]
        assert len(states) == 3
        assert all(s.target is bob.endpoint.agent and s.agent is alice.endpoint.agent for s in states)
        # nor a dict for backend notes its backend never writes (64 bytes each)
        assert all(s._extra is None and "backend_state" not in s.info() for s in states)
        connections.cancel_scope.cancel()


async def test_a_connection_keeps_nothing_of_its_connected_log_line(server: ServeInfo) -> None:
    """Logging "connected" keeps no memory for as long as the connection lives: logging's
    caller lookup gives the caller's frame a frame object, which the connection's handler
    (a coroutine as long-lived as the connection) kept, about 300 bytes each."""
    app_log = logging.getLogger("mux.app")
    level, propagate = app_log.level, app_log.propagate
    app_log.setLevel(logging.INFO)  # the caller lookup runs only for a record that is made
    app_log.propagate = False  # and no handler keeps the records
    lines, first = inspect.getsourcelines(logging.Logger.findCaller)
    in_lookup = [tracemalloc.Filter(True, logging.__file__, lineno=n) for n in range(first, first + len(lines))]
    tracemalloc.start()
    try:
        async with contextlib.AsyncExitStack() as stack:
            for i in range(20):
                ws = await stack.enter_async_context(open_ws(ws_url(server.url, f"logged-{i}")))
                assert orjson.loads(await ws.get_message())["event"] == "connected"
            kept = tracemalloc.take_snapshot().filter_traces(in_lookup)
            held = sum(stat.size for stat in kept.statistics("filename"))
    finally:
        tracemalloc.stop()
        app_log.setLevel(level)
        app_log.propagate = propagate
    assert held < 20 * 100, f"{held} bytes kept by logging's caller lookup for 20 connections"


def test_allocator_names_pymalloc_over_the_c_library_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert heap.allocator() == "pymalloc over malloc"  # this test process: no LD_PRELOAD, no PYTHONMALLOC
    assert heap.jemalloc_stats() is None
    monkeypatch.setenv("PYTHONMALLOC", "malloc")  # as a process started with it would say
    assert heap.allocator() == "malloc"


JEMALLOC = ctypes.util.find_library("jemalloc")


def _need_jemalloc() -> None:
    if JEMALLOC is None:
        if os.environ.get("CI") == "true":
            pytest.fail("libjemalloc2 is missing: .ci/run installs it")
        pytest.skip("jemalloc is not installed (apt-get install libjemalloc2)")


@pytest.mark.parametrize("flags", [("--jemalloc",), ()], ids=["--jemalloc", "by-default"])
async def test_serve_runs_the_node_under_jemalloc_which_it_purges_after_a_burst_of_closes(
    tmp_path: Path, flags: tuple[str, ...]
) -> None:
    """docs/performance.md, "Memory": ``serve`` (and ``serve --jemalloc``) executes the node
    again under jemalloc where it is installed; ``/status`` says so and, after a burst of
    closes, the node hands free pages back with jemalloc's purge (glibc's ``malloc_trim``
    would not reach jemalloc's pages)."""
    _need_jemalloc()
    log = tmp_path / "node.log"
    env = {"MUX_TRIM_AFTER_CLOSES": "20"}
    async with (
        node_process(tmp_path / "data", *flags, env=env, log=log) as node,
        httpx.AsyncClient(base_url=node.url) as http,
    ):
        memory = (await http.get("/api/mux/status")).json()["memory"]
        assert memory["allocator"] == "jemalloc"
        assert memory["heap_blocks"] == 0  # no object in pymalloc's blocks: jemalloc holds them all
        stats = memory["jemalloc"]  # jemalloc's own counts stand for them
        assert set(stats) == set(heap.JEMALLOC_STATS)
        assert 0 < stats["allocated"] <= stats["active"] <= stats["resident"] <= memory["rss_bytes"]
        opened = []
        for i in range(25):
            reply = await http.post("/api/mux/open", json={"agent": "alice", "target": f"bob{i}", "intent": "stream"})
            assert reply.status_code == 200, reply.text
            opened.append(reply.json()["channel_id"])
        for cid in opened:
            reply = await http.post("/api/mux/close", json={"channel_id": cid, "agent": "alice"})
            assert reply.status_code == 200, reply.text
        with trio.fail_after(15):  # the trimmer checks every second, once the closes settle
            while "released memory after" not in log.read_text():  # noqa: ASYNC110  (another process's log)
                await trio.sleep(0.2)
    lines = log.read_text().splitlines()
    assert sum("running under jemalloc (executed again with LD_PRELOAD=" in line for line in lines) == 1
    released = next(line for line in lines if "released memory after" in line)
    assert "(jemalloc; pages handed back: True; tables shrunk by 0 KiB)" in released  # 25 channels: too few


async def test_serve_no_jemalloc_stays_on_cpythons_allocator(tmp_path: Path) -> None:
    _need_jemalloc()  # else every node runs on CPython's allocator anyway: nothing to tell apart
    log = tmp_path / "node.log"
    async with (
        node_process(tmp_path / "data", "--no-jemalloc", log=log) as node,
        httpx.AsyncClient(base_url=node.url) as http,
    ):
        memory = (await http.get("/api/mux/status")).json()["memory"]
    assert memory["allocator"] == "pymalloc over malloc" and memory["heap_blocks"] > 0
    assert memory["jemalloc"] is None
    text = log.read_text()
    assert "under jemalloc" not in text and "not jemalloc" not in text


def test_without_jemalloc_serve_says_so_and_runs_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """By default (not ``--jemalloc``) a missing jemalloc is a warning, not an error: the node
    runs on CPython's allocator."""
    monkeypatch.delenv("MUX_JEMALLOC_REEXECUTED", raising=False)
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    caplog.set_level(logging.WARNING, logger="mux.heap")
    heap.run_under_jemalloc(required=False)
    assert "running on CPython's allocator, not jemalloc: jemalloc is not installed (Debian" in caplog.text
    assert "serve --no-jemalloc says this is meant" in caplog.text
    monkeypatch.setenv("MUX_JEMALLOC_REEXECUTED", "1")
    heap.run_under_jemalloc(required=False)
    assert "but its allocator is 'pymalloc over malloc', not 'jemalloc'" in caplog.text


def test_the_jemalloc_environment_keeps_what_the_caller_set() -> None:
    env = heap.jemalloc_environment({"LD_PRELOAD": "libother.so", "HOME": "/h"}, "libjemalloc.so.2")
    assert env["LD_PRELOAD"] == "libjemalloc.so.2 libother.so"  # first, so its malloc is the one
    assert env["PYTHONMALLOC"] == "malloc" and env["MALLOC_CONF"] == heap.JEMALLOC_CONF and env["HOME"] == "/h"
    mine = heap.jemalloc_environment({"LD_PRELOAD": "libjemalloc.so.2", "MALLOC_CONF": "narenas:2"}, "libjemalloc.so.2")
    assert mine["LD_PRELOAD"] == "libjemalloc.so.2" and mine["MALLOC_CONF"] == "narenas:2"


def test_serve_jemalloc_without_jemalloc_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MUX_JEMALLOC_REEXECUTED", raising=False)
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    with pytest.raises(BadSetting, match=r"not installed \(Debian and Ubuntu: apt-get install libjemalloc2\)"):
        heap.run_under_jemalloc()
    monkeypatch.setenv("MUX_JEMALLOC_REEXECUTED", "1")  # executed again, and still not under jemalloc
    with pytest.raises(BadSetting, match="but its allocator is 'pymalloc over malloc', not 'jemalloc'"):
        heap.run_under_jemalloc()


def test_python_m_mux_serve_goes_to_jemalloc_before_it_parses_its_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    """``python -m mux serve`` executes itself again under jemalloc before the command line
    is parsed (``heap.early_jemalloc``, quietly: the node says which allocator it runs on
    once its settings are checked), unless the arguments turn it off, abbreviated too, or
    ask for help; other commands never do."""
    calls: list[dict[str, bool]] = []
    monkeypatch.setattr(heap, "run_under_jemalloc", lambda **kw: calls.append(kw))
    for argv in (
        [],
        ["token", "issue"],
        ["serve", "--no-jemalloc"],
        ["serve", "--port", "1", "--no-jem"],
        ["serve", "-h"],
        ["serve", "--help"],
    ):
        heap.early_jemalloc(argv)
    assert calls == []
    heap.early_jemalloc(["serve", "--port", "8443", "--jemalloc"])
    assert calls == [{"required": False, "quiet": True}]
