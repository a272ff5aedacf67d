"""Memory benchmark: 2,000 WebSocket connections holding 10,000 open channels.

Run: ``python -m tests.bench memory`` (part of ``nox -s bench``).

How this works: a fresh node subprocess (its open-file limit raised through ``preexec_fn``,
this process's with ``resource.setrlimit``) and ``CONNECTIONS`` raw WebSocket connections
from this process, one agent each. The node's default ``max_channels_per_agent`` is 32, so
the channels are spread: each of the first ``OPENERS`` agents opens ``PER_OPENER`` ``stream``
channels to its own partner among the next ``OPENERS`` agents (400 x 25 = 10,000 channels,
both ends attached). Every connection has a reader task that takes every event off its
socket. The node's resident memory (``VmRSS`` of ``/proc/PID/status``) is read after a
small warm-up (the baseline), with all connections open, with all channels open, after
every channel is closed, and after every connection is gone (each reading after the node's
``/status`` agrees and a short settle); the whole cycle runs three times, so the later ones
show whether memory is reused rather than grown, time allowing: a later cycle starts only if
the bench's budget (``common.BENCH_BUDGET_S``) has room for it and the sections after this
one, else the table says why it was skipped. Per-connection and
per-channel figures are the differences divided by the counts. The target (memory back within 5% after 10,000 channels
open and close) compares the RSS after the channels close with the RSS just before they
opened, the 2,000 connections open both times. The node's ``/status`` confirms the counts it holds,
and gives its live heap at each step: under jemalloc, jemalloc's own counts, which split
what RSS kept into the objects still held, the room left between them, the allocator's
metadata and free pages not yet given back. ``run_sqlite`` (``python -m tests.bench
memory-sqlite``) runs the same on the README's node, its ledger in SQLite.
"""

from __future__ import annotations

import collections
import itertools
import math
import sys
import tempfile
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import httpx
import orjson
import trio
import trio_websocket

from mux.client import open_ws

from .common import (
    BENCH_BUDGET_S,
    Proc,
    cpu_each,
    events,
    node_process,
    node_status,
    raise_nofile,
    seconds_left,
    target,
    toward_miss,
)
from .server import expect

__all__ = ["Cycle", "MemoryResult", "memory_run", "report", "run"]

CONNECTIONS = 2000
OPENERS = 400
PER_OPENER = 25
CONNECT_PARALLEL = 64
SETTLE_S = 1.0
SETTLE_MAX_S = 8.0
"""After counts agree, RSS is read until it stops falling (at most this long)."""
CYCLES = 3
PHASE_TIMEOUT_S = 90.0
KEEPALIVE_S = 20.0
MEMORY_TIMEOUT_S = 330.0
MORE_CYCLES_UNDER_S = 110.0
"""Another cycle starts only while the cycles so far took less than this (keeps the suite
bounded)."""
AFTER_MEMORY_S = 25.0
"""What the sections after this one take (transfer, durable: 17 to 19 s here), kept free of
the bench's budget (``common.BENCH_BUDGET_S``): another cycle starts only if the budget has
room for it (as long as the last one took) and for them."""


@attrs.define(eq=False)
class Conn:
    """One benchmark connection and what its reader saw."""

    agent: str
    ws: trio_websocket.WebSocketConnection | None = None
    expected: int = 0
    opened: list[str] = attrs.field(factory=list)
    answered: int = 0
    all_answered: trio.Event = attrs.field(factory=trio.Event)
    closed_mine: int = 0
    all_closed: trio.Event = attrs.field(factory=trio.Event)
    target_opened: int = 0
    target_closed: int = 0
    errors: collections.Counter[str] = attrs.field(factory=collections.Counter)

    def on_message(self, message: str | bytes) -> None:
        """Account for one message from the node."""
        for ev in events(message):
            name = ev.get("event")
            if name == "channel_opened":
                if ev.get("role") == "opener":
                    self.opened.append(str(ev["channel_id"]))
                    self._answer()
                else:
                    self.target_opened += 1
            elif name == "channel_closed":
                if ev.get("channel_id") in self.opened:
                    self.closed_mine += 1
                    if self.closed_mine >= len(self.opened):
                        self.all_closed.set()
                else:
                    self.target_closed += 1
            elif "error" in ev and name is None:
                self.errors[str(ev["error"])] += 1
                if ev.get("ref") == "open":
                    self._answer()

    def _answer(self) -> None:
        self.answered += 1
        if self.answered >= self.expected:
            self.all_answered.set()


@attrs.define
class Cycle:
    """RSS readings (KiB) and timings of one open/close cycle."""

    rss_conns: int = 0
    rss_channels: int = 0
    rss_closed: int = 0
    rss_gone: int = 0
    heap_conns: int = 0
    """The node's live heap (:func:`_heap`) with every connection open, with every channel
    open too, after the channels closed, and after everything closed."""
    heap_channels: int = 0
    heap_closed: int = 0
    heap_gone: int = 0
    allocator: str = ""
    """Which allocators hold the node's memory (``/status`` ``memory.allocator``)."""
    jemalloc_conns: dict[str, int] = attrs.field(factory=dict)
    """jemalloc's counts (``/status`` ``memory.jemalloc``) with every connection open and
    after the channels closed; empty on another allocator."""
    jemalloc_closed: dict[str, int] = attrs.field(factory=dict)
    jemalloc_gone: dict[str, int] = attrs.field(factory=dict)
    """jemalloc's counts after everything closed (empty on another allocator)."""
    ledger_closed: dict[str, Any] = attrs.field(factory=dict)
    """The node's ``/status`` ``ledger`` after the channels closed (what it keeps by design)."""
    in_cycles: int = 0
    """Objects the node's garbage collector found in reference cycles from when every
    connection was open to when the channels had closed (``/status`` ``memory.gc_collected``)."""
    connect_s: float = 0.0
    connect_cpu_s: float = 0.0
    """The node's CPU while the connections were made (accept, handshake, hello)."""
    open_s: float = 0.0
    open_cpu_s: float = 0.0
    channels_open: int = 0
    connections: int = 0
    opened: int = 0
    errors: collections.Counter[str] = attrs.field(factory=collections.Counter)


def _progress(text: str) -> None:
    print(f"[bench]   memory: {text}", file=sys.stderr, flush=True)


def _memory(st: dict[str, Any]) -> dict[str, Any]:
    memory = st.get("memory")
    return memory if isinstance(memory, dict) else {}


def _jemalloc(st: dict[str, Any]) -> dict[str, int]:
    stats = _memory(st).get("jemalloc")
    return {k: int(v) for k, v in stats.items()} if isinstance(stats, dict) else {}


def _heap(st: dict[str, Any]) -> int:
    """The node's live heap: under jemalloc the KiB its objects hold (``memory.jemalloc``
    ``allocated``), else the live blocks of CPython's allocator (``memory.heap_blocks``)."""
    allocated = _jemalloc(st).get("allocated")
    return allocated >> 10 if allocated is not None else int(_memory(st).get("heap_blocks", 0))


def heap_unit(allocator: str) -> str:
    """What :func:`_heap` counts on this allocator."""
    return "KiB" if allocator == "jemalloc" else "blocks"


def _collected(st: dict[str, Any]) -> int:
    """Objects the node's garbage collector has found in reference cycles since it started."""
    return int(_memory(st).get("gc_collected", 0))


async def _settle(node: Proc, http: httpx.AsyncClient, *, connections: int, channels: int) -> int:
    """Wait (bounded) until the node reports these counts, then until its RSS stops falling
    (bounded); return RSS KiB."""
    st: dict[str, Any] = {}
    with trio.move_on_after(30) as waited:
        while True:
            st = await node_status(http)
            if st.get("connections") == connections and st.get("channels_open") == channels:
                break
            await trio.sleep(0.1)
    if waited.cancelled_caught:
        _progress(
            f"node still reports {st.get('connections')} connections, {st.get('channels_open')} channels"
            f" (expected {connections}, {channels})"
        )
    await trio.sleep(SETTLE_S)
    rss = node.rss_kib()
    for _ in range(int(SETTLE_MAX_S / SETTLE_S)):  # the node gives memory back after bursts of closes
        await trio.sleep(SETTLE_S)
        now = node.rss_kib()
        if now > rss - 1024:  # stable (within 1 MiB) for a whole SETTLE_S
            return min(now, rss)
        rss = now
    return rss


Observer = Callable[[str, str], Awaitable[None]]
"""Called after each RSS reading of a cycle with the cycle's tag and the step: ``connections``
(all connected), ``channels`` (all open), ``closed`` (the channels closed), ``gone`` (the
connections closed too); ``tests.bench.census`` takes its census then."""


async def _observed(observe: Observer | None, tag: str, step: str) -> None:
    if observe is not None:
        await observe(tag, step)


async def _cycle(
    node: Proc,
    http: httpx.AsyncClient,
    tag: str,
    connections: int,
    openers: int,
    per_opener: int,
    observe: Observer | None = None,
) -> Cycle:
    """Connect, open, hold, close and disconnect once; read RSS at each step (and call
    ``observe`` after each reading)."""
    cyc = Cycle()
    conns = [Conn(f"{tag}-{i:05d}") for i in range(connections)]
    for i in range(openers):
        conns[i].expected = per_opener
    ready = trio.Semaphore(CONNECT_PARALLEL)
    connected = 0
    all_connected = trio.Event()
    release = trio.Event()

    async def hold(conn: Conn) -> None:
        nonlocal connected
        await ready.acquire()
        released = False
        try:
            async with open_ws(node.ws(conn.agent), connect_timeout=30) as ws:
                await expect(ws, "connected", timeout=30)
                conn.ws = ws
                ready.release()
                released = True
                connected += 1
                if connected == connections:
                    all_connected.set()
                async with trio.open_nursery() as nursery:

                    async def read() -> None:
                        try:
                            while True:
                                conn.on_message(await ws.get_message())
                        except trio_websocket.ConnectionClosed as exc:
                            conn.errors[f"connection_closed_{exc.reason.code if exc.reason else None}"] += 1

                    nursery.start_soon(read)
                    nursery.start_soon(keepalive, ws)
                    await release.wait()
                    nursery.cancel_scope.cancel()
        finally:
            if not released:
                ready.release()

    async def keepalive(ws: trio_websocket.WebSocketConnection) -> None:
        # As a client keeping its connection warm would (the node needs none: it sets no read
        # timeout on WebSockets). Measured: without these pings the channel phase's RSS figure
        # is the same (+25.8% against +25.6%).
        while True:
            await trio.sleep(KEEPALIVE_S)
            await ws.send_message('{"action":"ping"}')

    async def open_all(i: int) -> None:
        conn = conns[i]
        assert conn.ws is not None
        msg = orjson.dumps(
            {"action": "open", "target": conns[openers + i].agent, "intent": "stream", "ref": "open"}
        ).decode()
        for _ in range(per_opener):
            await conn.ws.send_message(msg)
        await conn.all_answered.wait()

    async def close_all(conn: Conn) -> None:
        assert conn.ws is not None
        for cid in conn.opened:
            await conn.ws.send_message(orjson.dumps({"action": "close", "channel_id": cid}).decode())
        await conn.all_closed.wait()

    async with trio.open_nursery() as nursery:
        t0, c0 = trio.current_time(), node.cpu_s()
        with trio.fail_after(PHASE_TIMEOUT_S):
            for conn in conns:
                nursery.start_soon(hold, conn)
            await all_connected.wait()
        cyc.connect_s, cyc.connect_cpu_s = trio.current_time() - t0, node.cpu_s() - c0
        _progress(f"{tag}: {connections} connected in {cyc.connect_s:.1f} s")
        cyc.rss_conns = await _settle(node, http, connections=connections, channels=0)
        await _observed(observe, tag, "connections")
        st = await node_status(http)
        cyc.connections, cyc.heap_conns, cyc.jemalloc_conns = st.get("connections", 0), _heap(st), _jemalloc(st)
        cyc.allocator = str(_memory(st).get("allocator", "not reported"))
        collected = _collected(st)

        t0, c0 = trio.current_time(), node.cpu_s()
        with trio.fail_after(PHASE_TIMEOUT_S):
            async with trio.open_nursery() as openers_nursery:
                for i in range(openers):
                    openers_nursery.start_soon(open_all, i)
        cyc.open_s, cyc.open_cpu_s = trio.current_time() - t0, node.cpu_s() - c0
        _progress(f"{tag}: {sum(len(c.opened) for c in conns)} channels opened in {cyc.open_s:.1f} s")
        cyc.opened = sum(len(c.opened) for c in conns)
        cyc.rss_channels = await _settle(node, http, connections=connections, channels=cyc.opened)
        await _observed(observe, tag, "channels")
        st = await node_status(http)
        cyc.channels_open, cyc.heap_channels = st.get("channels_open", 0), _heap(st)

        with trio.fail_after(PHASE_TIMEOUT_S):
            async with trio.open_nursery() as closers:
                for conn in conns[:openers]:
                    if conn.opened:
                        closers.start_soon(close_all, conn)
        _progress(f"{tag}: channels closed")
        cyc.rss_closed = await _settle(node, http, connections=connections, channels=0)
        await _observed(observe, tag, "closed")
        st = await node_status(http)
        cyc.heap_closed, cyc.ledger_closed = _heap(st), dict(st.get("ledger") or {})
        cyc.jemalloc_closed = _jemalloc(st)
        cyc.in_cycles = _collected(st) - collected
        release.set()
    _progress(f"{tag}: disconnected")
    cyc.rss_gone = await _settle(node, http, connections=0, channels=0)
    await _observed(observe, tag, "gone")
    st = await node_status(http)
    cyc.heap_gone, cyc.jemalloc_gone = _heap(st), _jemalloc(st)
    for conn in conns:
        cyc.errors.update(conn.errors)
    return cyc


@attrs.define
class MemoryResult:
    """The baseline and every cycle."""

    baseline: int = 0
    heap_baseline: int = 0
    jemalloc_baseline: dict[str, int] = attrs.field(factory=dict)
    cycles: list[Cycle] = attrs.field(factory=list)
    skipped: str = ""
    """Why fewer than ``CYCLES`` cycles ran (empty when all did)."""


async def memory_run(
    node: Proc,
    connections: int = CONNECTIONS,
    openers: int = OPENERS,
    per_opener: int = PER_OPENER,
    *,
    cycles: int = CYCLES,
    observe: Observer | None = None,
) -> MemoryResult:
    """Warm up, read the baseline, run ``cycles`` cycles (the later ones as the bench's
    budget allows); ``observe`` is called after each RSS reading."""
    res = MemoryResult()
    with trio.fail_after(MEMORY_TIMEOUT_S):
        await _memory_cycles(node, res, connections, openers, per_opener, cycles, observe)
    return res


async def _memory_cycles(
    node: Proc,
    res: MemoryResult,
    connections: int,
    openers: int,
    per_opener: int,
    cycles: int,
    observe: Observer | None,
) -> None:
    async with httpx.AsyncClient(base_url=node.url + "/api/mux", timeout=10) as http:
        await _cycle(node, http, "warm", 20, 10, 2, observe)  # imports, caches, first allocations
        res.baseline = await _settle(node, http, connections=0, channels=0)
        st = await node_status(http)
        res.heap_baseline, res.jemalloc_baseline = _heap(st), _jemalloc(st)
        started = last = trio.current_time()
        for c in range(cycles):
            now = trio.current_time()
            if c and now - started > MORE_CYCLES_UNDER_S:
                res.skipped = f"the cycles so far took {now - started:.0f} s"
            elif c and seconds_left() < (now - last) + AFTER_MEMORY_S:
                res.skipped = f"the bench's {BENCH_BUDGET_S:.0f} s would not hold another {now - last:.0f} s cycle"
            if res.skipped:
                _progress(f"cycles {c + 1}-{cycles} skipped: {res.skipped}")
                break
            last = now
            res.cycles.append(await _cycle(node, http, f"m{c}", connections, openers, per_opener, observe))


def _growth(now: int, start: int) -> float:
    """The growth from ``start`` to ``now`` in percent, rounded away from zero to 0.1 (toward
    missing "within 5%"): the figure that target is judged on."""
    pct = (now - start) / max(1, start) * 100
    return math.copysign(toward_miss(abs(pct), 1, at_most=True), pct)


def _pct(now: int, start: int) -> str:
    return f"{_growth(now, start):+.1f}%" if start else "n/a"


def _kept(before: dict[str, int], after: dict[str, int]) -> str:
    """jemalloc's growth from ``before`` to ``after``, split into the objects the node still
    holds, the room left between them, the allocator's metadata, and pages not yet given back."""
    if not before or not after:
        return ""
    mib = 2**20

    def grew(name: str) -> float:
        return (after[name] - before[name]) / mib

    room_before, room_after = before["active"] - before["allocated"], after["active"] - after["allocated"]
    idle = (after["resident"] - after["active"] - after["metadata"]) - (
        before["resident"] - before["active"] - before["metadata"]
    )
    return (
        f"{grew('allocated'):+8.1f} MiB held by objects, {(room_after - room_before) / mib:+.1f} MiB of room between"
        f" them in pages in use, {grew('metadata'):+.1f} MiB allocator metadata, {idle / mib:+.1f} MiB free pages"
        " not yet given back"
    )


def run(connections: int = CONNECTIONS, openers: int = OPENERS, per_opener: int = PER_OPENER) -> list[tuple[str, str]]:
    """Start a node with a raised open-file limit, run the memory benchmark, return rows."""
    return _run(None, connections, openers, per_opener)


def run_sqlite(
    connections: int = CONNECTIONS, openers: int = OPENERS, per_opener: int = PER_OPENER
) -> list[tuple[str, str]]:
    """The same on the README's node: its ledger in SQLite in a data directory (a new one,
    removed after), not ``--memory``."""
    with tempfile.TemporaryDirectory(prefix="mux-bench-") as data_dir:
        return _run(data_dir, connections, openers, per_opener)


def _run(data_dir: str | None, connections: int, openers: int, per_opener: int) -> list[tuple[str, str]]:
    need = connections + 1024
    soft, _ = raise_nofile(need)
    if soft < need:
        return [("(e) memory", f"n/a: open-file limit {soft} < {need} (raise the hard limit: ulimit -Hn)")]
    with node_process(nofile=need, data_dir=data_dir) as node:
        r = trio.run(memory_run, node, connections, openers, per_opener)
    return report(r, connections, openers, per_opener, store="SQLite store" if data_dir else "")


def report(
    r: MemoryResult, connections: int, openers: int, per_opener: int, *, store: str = ""
) -> list[tuple[str, str]]:
    """The printable rows of a memory run; records its targets (``common.target``, their
    names and the rows' labels naming ``store`` when it is not the bench's usual node)."""
    rows = _rows(r, connections, openers, per_opener, f" ({store})" if store else "")
    return [(label.replace("(e)", f"(e, {store})", 1), value) for label, value in rows] if store else rows


def _rows(r: MemoryResult, connections: int, openers: int, per_opener: int, named: str) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    base = r.baseline
    c = r.cycles[0]
    per_conn = (c.rss_conns - base) * 1024 / max(1, connections)
    per_chan = (c.rss_channels - c.rss_conns) * 1024 / max(1, c.opened)
    chan_kib = toward_miss(per_chan / 1024, 2, at_most=True)
    errors = f"; errors: {dict(c.errors)}" if c.errors else ""
    rows += [
        (
            f"(e) {connections} WS connections held (node /status: {c.connections})",
            f"{per_conn / 1024:8.1f} KiB/connection  RSS {base / 1024:.1f} -> {c.rss_conns / 1024:.1f} MiB,"
            f" connected in {c.connect_s:.1f} s, node {cpu_each(c.connect_cpu_s, c.connections, 'ms')}"
            f" CPU/connection; allocator: {c.allocator}",
        ),
        (
            f"(e) + {c.opened} channels ({openers} agents x {per_opener}; node /status: {c.channels_open})",
            f"{chan_kib:8.2f} KiB/channel     RSS -> {c.rss_channels / 1024:.1f} MiB, opened in"
            f" {c.open_s:.1f} s, node {cpu_each(c.open_cpu_s, c.opened, 'us')} CPU/open{errors}",
        ),
        (
            "(e) RSS after the channels close, connections still open",
            f"{c.rss_closed / 1024:8.1f} MiB = {_pct(c.rss_closed, c.rss_conns)} vs {c.rss_conns / 1024:.1f} MiB"
            f" before they opened (target within 5%); live heap {_pct(c.heap_closed, c.heap_conns)}",
        ),
        (
            "(e) RSS after the connections close too",
            f"{c.rss_gone / 1024:8.1f} MiB = {_pct(c.rss_gone, base)} vs baseline {base / 1024:.1f} MiB;"
            f" live heap {_pct(c.heap_gone, r.heap_baseline)}",
        ),
    ]
    unit = heap_unit(c.allocator)
    rows.append(
        (
            f"(e) live heap, {unit} (node /status): baseline / connections / + channels / channels closed / all closed",
            f"{r.heap_baseline:8d} / {c.heap_conns} / {c.heap_channels} / {c.heap_closed} / {c.heap_gone} (objects"
            " freed, bounded ledger and closed-channel lookups kept)",
        )
    )
    kept = _kept(c.jemalloc_conns, c.jemalloc_closed)
    if kept:
        rows.append(("(e) what the RSS after the channels close keeps, under jemalloc (node /status)", kept))
    kept = _kept(r.jemalloc_baseline, c.jemalloc_gone)
    if kept:
        rows.append(("(e) what the RSS after the connections close too keeps, against the baseline", kept))
    rows.append(
        (
            "(e) objects found in reference cycles while the channels opened and closed (node /status)",
            f"{c.in_cycles:8d} (tens: a closed channel leaves no cycle; each left about 8 when it did)",
        )
    )
    ledger = c.ledger_closed
    if ledger.get("store") == "memory":
        rows.append(
            (
                "(e) the in-memory ledger after the channels close (node /status ledger)",
                f"{ledger['chains']:8d} chains, {ledger['frames']} frames, {ledger['bytes'] / 2**20:.1f} MiB"
                f" as the frames hold it, of its {ledger['max_bytes'] / 2**20:.0f} MiB bound (kept for export"
                " and resume)",
            )
        )
    target(f"under 4 KiB per idle open channel{named}", f"{chan_kib:.2f} KiB", chan_kib < 4)
    after = _growth(c.rss_closed, c.rss_conns)
    again = "".join(f", cycle {i + 2} {_pct(x.rss_closed, x.rss_conns)}" for i, x in enumerate(r.cycles[1:]))
    target(
        f"memory within 5% after 10,000 channels open and close{named}", f"{after:+.1f}% (RSS){again}", abs(after) <= 5
    )
    if len(r.cycles) > 1:
        later = r.cycles[1:]
        errors = "".join(f"; cycle {i + 2} errors: {dict(x.errors)}" for i, x in enumerate(later) if x.errors)
        peaks = " / ".join(f"{x.rss_channels / 1024:.1f}" for x in r.cycles)
        gone = " / ".join(f"{x.rss_gone / 1024:.1f}" for x in r.cycles)
        kept = ", ".join(f"{(b.rss_gone - a.rss_gone) / 1024:+.1f}" for a, b in itertools.pairwise(r.cycles))
        rows.append(
            (
                f"(e) {_cycles(1, len(r.cycles))}, the same again: peak RSS; RSS after all closed",
                f"{peaks} MiB; {gone} MiB: {kept} MiB kept by each later cycle{errors}",
            )
        )
        rows.append(
            (
                f"(e) {_cycles(2, len(r.cycles))}: RSS after the channels close, vs just before they opened",
                ", ".join(f"{_pct(x.rss_closed, x.rss_conns)} ({x.rss_closed / 1024:.1f} MiB)" for x in later)
                + " (a later burst reuses what the allocator kept of the one before, or takes again what it gave back)",
            )
        )
        if r.skipped:
            rows.append((f"(e) {_cycles(len(r.cycles) + 1, CYCLES)}", f"skipped: {r.skipped}"))
    else:
        rows.append((f"(e) {_cycles(2, CYCLES)}", f"skipped: {r.skipped}"))
    return rows


def _cycles(first: int, last: int) -> str:
    """``cycle 2`` or ``cycles 2-3``."""
    return f"cycle {first}" if first == last else f"cycles {first}-{last}"
